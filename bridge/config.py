"""Typed, frozen configuration loaded from YAML.

Every problem is reported as one line naming the key path and the fix, e.g.
`whatsapp.app_secret: missing; set it or whatsapp.app_secret_file`.
Secrets may be given inline, through a `<key>_file` sibling, or through the
environment variable `CIVIC_BRIDGE_<SECTION>_<KEY>` (which wins).
Relative paths (`*_file`, `appservice.store_dir`, an SQLite `database.url`) are taken
relative to the config file's directory, so the bridge finds the same files whatever
directory it is started from.
"""

from __future__ import annotations

import base64
import ipaddress
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from bridge.errors import ConfigError

ENV_PREFIX = "CIVIC_BRIDGE_"
# Values copied from config.example.yaml must not reach production.
# `<...>` only as the whole value: a notice text may well contain "<https://...>".
PLACEHOLDER = re.compile(r"CHANGE[_-]?ME|^\s*<[^>]*>\s*$|EXAMPLE_SECRET", re.IGNORECASE)
# What pydantic's lax mode reads as true; `_required` must agree with the model.
_TRUE = frozenset({"1", "on", "t", "true", "y", "yes"})

# (section, key) pairs that are secrets: accepted from `<key>_file` and the environment.
SECRET_KEYS: tuple[tuple[str, str], ...] = (
    ("appservice", "as_token"),
    ("appservice", "hs_token"),
    ("privacy", "data_key"),
    ("privacy", "index_key"),
    ("whatsapp", "access_token"),
    ("whatsapp", "app_secret"),
    ("whatsapp", "verify_token"),
    ("admin", "token"),
    ("invites", "registration_shared_secret"),
    ("moderation", "synapse_admin_token"),
    ("audit", "key"),
)


class FieldProblem(ValueError):
    """Raised by a model validator about one of the model's fields, so that the
    reported key path names that field (`whatsapp.phone_number_id: ...`), not the section."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


Secret = Annotated[str, Field(min_length=16)]
Localpart = Annotated[str, Field(pattern=r"^[a-z0-9._=\-/]+$")]


Port = Annotated[int, Field(ge=1, le=65535)]
_HOSTNAME = re.compile(r"(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                       r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*")


def _listen_host(value: str) -> str:
    """An address to bind: an IP address (`0.0.0.0`, `::`, `127.0.0.1`) or a host name."""
    try:
        ipaddress.ip_address(value)
    except ValueError:
        if not _HOSTNAME.fullmatch(value):
            raise ValueError("must be an IP address (e.g. 127.0.0.1, 0.0.0.0, ::) or a "
                             "host name, without scheme or port") from None
    return value


ListenHost = Annotated[str, AfterValidator(_listen_host)]


def local_url(host: str, port: int) -> str:
    """The URL a client on this host uses for a listener bound to `host`."""
    host = "127.0.0.1" if host in ("0.0.0.0", "::") else host  # noqa: S104
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{port}"


def _http_url(value: str) -> str:
    if not re.match(r"^https?://[^\s/]+", value):
        raise ValueError("must be an http(s) URL")
    return value.rstrip("/")


class HomeserverConfig(_Section):
    url: str
    domain: Annotated[str, Field(pattern=r"^[A-Za-z0-9.\-]+(:\d+)?$")]

    _url = field_validator("url")(_http_url)


class AppserviceConfig(_Section):
    id: Localpart = "civic-bridge"
    # The public listener: the appservice API, the WhatsApp webhook, invite pages, probes.
    listen_host: ListenHost = "127.0.0.1"
    listen_port: Port = 29340
    # Where the public listener runs: a process of its own (the webhook's answer does not
    # wait for the bridge's interpreter lock; bridge.web.ingest_process) or a thread of
    # the bridge's process (one process fewer; bridge.web.ingest_thread).
    ingest: Literal["process", "thread"] = "process"
    url: str | None = None
    as_token: Secret
    hs_token: Secret
    # The registration's sender_localpart; Synapse gives it no device (see notes),
    # so the encrypting bot is `{ghost_prefix}bot`.
    bot_localpart: Localpart = "civicbridge"
    ghost_prefix: Localpart = "cb_"
    # Legacy (before revision 0016 the devices' E2EE state was one nio file per device
    # here): only read at start, to move such files into the database
    # (bridge.matrix.crypto.legacy). Nothing is written here any more.
    store_dir: str = "./store"
    # Legacy: the journal mode of those files. Accepted, no longer used.
    store_journal: Literal["wal", "delete"] = "wal"
    # Ghost devices open in memory at most (least recently used closed first; their state
    # stays in the database) and how long an unused one stays open.
    max_open_devices: Annotated[int, Field(ge=1)] = 500
    device_idle_seconds: Annotated[float, Field(gt=0)] = 600.0
    # A staff event whose room key has not reached the bot waits aside and is retried
    # after each of these delays (with a key request); after the last, staff are told.
    undecryptable_retry_seconds: Annotated[
        list[Annotated[float, Field(gt=0, le=86400)]], Field(min_length=1, max_length=20)
    ] = [2, 10, 30, 60, 120, 300]

    _url = field_validator("url")(lambda v: None if v is None else _http_url(v))

    @property
    def public_url(self) -> str:
        """How the homeserver reaches the bridge (written into the registration)."""
        return self.url or f"http://{self.listen_host}:{self.listen_port}"


class DatabaseConfig(_Section):
    url: str = "sqlite+aiosqlite:///civic-bridge.db"

    @field_validator("url")
    @classmethod
    def _driver(cls, value: str) -> str:
        if not value.startswith(("sqlite+aiosqlite://", "postgresql+asyncpg://")):
            raise ValueError(
                "must start with sqlite+aiosqlite:// or postgresql+asyncpg:// "
                "(an SQLAlchemy async URL)"
            )
        # Imported here: SQLAlchemy is heavy, and `civic-bridge --help` need not load it.
        from sqlalchemy import make_url
        from sqlalchemy.exc import ArgumentError

        try:
            make_url(value)
        except (ArgumentError, ValueError):
            # Not echoed: the URL may hold a password.
            raise ValueError("is not a valid SQLAlchemy URL") from None
        return value


def _key32(value: str) -> str:
    try:
        raw = base64.b64decode(value, validate=True)
    except ValueError:
        raise ValueError("must be base64 of 32 random bytes (civic-bridge init generates "
                         "one; or: openssl rand -base64 32)") from None
    if len(raw) != 32:
        raise ValueError(f"must decode to 32 bytes, got {len(raw)}")
    return value


class PrivacyConfig(_Section):
    data_key: str
    index_key: str
    # Keys retired by rotation: still decrypt old rows until `civic-bridge rekey` runs.
    previous_data_keys: list[str] = []
    # Retired index keys: rows hashed with them are still found until `rekey` rehashes.
    previous_index_keys: list[str] = []
    pseudonym_template: str = "Ciudadano/a {code}"

    _keys = field_validator("data_key", "index_key")(_key32)

    @field_validator("previous_data_keys", "previous_index_keys")
    @classmethod
    def _old_keys(cls, value: list[str]) -> list[str]:
        return [_key32(v) for v in value]

    @field_validator("pseudonym_template")
    @classmethod
    def _template(cls, value: str) -> str:
        if "{code}" not in value:
            raise ValueError("must contain {code}")
        if re.search(r"\{(?!code\})", value):
            raise ValueError("only the {code} placeholder is allowed")
        return value

    @model_validator(mode="after")
    def _separate(self) -> PrivacyConfig:
        if self.data_key == self.index_key:
            raise FieldProblem("index_key", "must be a different key from data_key "
                               "(generate one: openssl rand -base64 32)")
        # A key used both ways would let one leak serve two purposes.
        data = {self.data_key, *self.previous_data_keys}
        if data & {self.index_key, *self.previous_index_keys}:
            raise FieldProblem("previous_index_keys", "a data key is listed as an index key "
                               "(or the other way round): keep the two kinds apart")
        return self


# Meta's limits for an approved template: its body is at most 1,024 characters; a
# named parameter is lowercase letters, digits and underscores.
TEMPLATE_PARAMETER = r"^[a-z_][a-z0-9_]{0,19}$"
_PLACEHOLDER_RE = re.compile(r"\{\{\s*([^{}\s]+)\s*\}\}")


class TemplateConfig(_Section):
    """An approved WhatsApp template staff may send (`whatsapp.templates`): the body as
    Meta approved it, so the room can show what was sent, and its parameters in order."""

    name: Annotated[str, Field(pattern=r"^[a-z0-9_]{1,512}$")]
    language: Annotated[str, Field(pattern=r"^[a-z]{2,3}(_[A-Z]{2})?$")] = "es"
    category: Literal["utility", "marketing", "authentication"] = "utility"
    description: Annotated[str, Field(min_length=1, max_length=300)]
    body: Annotated[str, Field(min_length=1, max_length=1024)]
    # `named`: {{nombre}} placeholders, sent with parameter_name; `positional`: {{1}}, {{2}}.
    parameter_format: Literal["named", "positional"] = "named"
    # Named: the placeholders' names. Positional: a label per {{n}}, in order, for staff.
    parameters: list[Annotated[str, Field(pattern=TEMPLATE_PARAMETER)]] = []

    @model_validator(mode="after")
    def _placeholders_match(self) -> TemplateConfig:
        found = _PLACEHOLDER_RE.findall(self.body)
        if len(set(self.parameters)) != len(self.parameters):
            raise FieldProblem("parameters", "names must be unique")
        if self.parameter_format == "named":
            expected = set(self.parameters)
            shown = "{{" + "}}, {{".join(self.parameters) + "}}" if self.parameters else "none"
        else:
            expected = {str(i) for i in range(1, len(self.parameters) + 1)}
            shown = f"{{{{1}}}} to {{{{{len(self.parameters)}}}}}" if self.parameters \
                else "none"
        if set(found) != expected:
            raise FieldProblem("body", f"placeholders {sorted(set(found)) or 'none'} do not "
                               f"match parameters (expected {shown})")
        return self


class WhatsAppConfig(_Section):
    enabled: bool = False
    api_base: str = "https://graph.facebook.com/v23.0"
    phone_number_id: str = ""
    access_token: str = ""
    app_secret: str = ""
    verify_token: str = ""
    # How long a send cut short after it reached Graph (a crash or stop before the answer
    # was read) waits for a delivery status echoing its callback data before it is sent
    # again (bridge.whatsapp.outbox). Meta reports `sent` within seconds; the margin
    # covers webhook retries and a restart.
    outbox_confirm_window_seconds: int = 600
    # A staff read receipt marks the citizen's message read (blue ticks), staff typing
    # shows "escribiendo…" (bridge.whatsapp.receipts).
    send_read_receipts: bool = True
    # Approved templates staff may send with `!plantilla` or the admin API.
    templates: list[TemplateConfig] = []
    # Meta's rate limits (bridge.whatsapp.pacing): sends per second from this business
    # number (Cloud API default 80; higher tiers up to 1000; 0 = no limit), and the least
    # time between two sends to the same citizen (0 = none; Meta's pair limit is about
    # one message every 6 s, and answers 131056 beyond its burst, which is retried).
    max_sends_per_second: Annotated[float, Field(ge=0, le=1000)] = 80
    # The agency's WhatsApp number as citizens dial it (e.g. "+34 900 000 000"): invite
    # links then offer "join by WhatsApp" (a wa.me link with a one-time join code);
    # "" = not offered.
    display_phone_number: Annotated[str, Field(pattern=r"^(\+?[0-9][0-9 ]{5,20})?$")] = ""
    recipient_interval_seconds: Annotated[float, Field(ge=0, le=60)] = 0
    # Sends the outbox makes at once, each to a different citizen (a citizen's own
    # messages always go one after another, in order). 1 = strictly one at a time.
    outbox_concurrency: Annotated[int, Field(ge=1, le=64)] = 1

    _url = field_validator("api_base")(_http_url)

    @field_validator("outbox_confirm_window_seconds")
    @classmethod
    def _confirm_window(cls, value: int) -> int:
        if value < 60:
            raise ValueError("must be at least 60: a window shorter than delivery statuses "
                             "take to arrive would resend messages WhatsApp already "
                             "accepted; raise it (default 600)")
        if value > 86400:
            raise ValueError("must be at most 86400 (a day): a message cut short would wait "
                             "that long before it is sent again; lower it (default 600)")
        return value

    @field_validator("templates")
    @classmethod
    def _unique_templates(cls, value: list[TemplateConfig]) -> list[TemplateConfig]:
        names = [t.name for t in value]
        if len(set(names)) != len(names):
            raise ValueError("template names must be unique (staff pick a template by name)")
        return value

    @model_validator(mode="after")
    def _required_when_enabled(self) -> WhatsAppConfig:
        # Secrets are checked (with their _file/env hints) before validation.
        if self.enabled and not self.phone_number_id:
            raise FieldProblem("phone_number_id", "missing; required when whatsapp.enabled is true")
        return self


# The first layer of the information GDPR art. 13 asks for (who, why, rights) and the
# minimum age to consent alone in Spain (LOPDGDD art. 7: 14).
DEFAULT_NOTICE = (
    "Hola. Este es el canal de WhatsApp de {agency}, responsable del tratamiento. Si "
    "quiere que el personal le atienda aquí, sus mensajes se reenviarán a una sala cifrada "
    "de la entidad con un seudónimo; su número no se muestra a nadie. Solo se usan para "
    "atender su consulta. Debe tener 14 años o más. Puede pedir el acceso a sus datos o su "
    "supresión aquí o en la sede electrónica de {agency}. Responda ACEPTO para continuar "
    "o BAJA para no recibir más mensajes. Puede darse de baja en cualquier momento "
    "escribiendo BAJA."
)


class ConsentConfig(_Section):
    agency_name: str = "la entidad"
    notice_text: str = DEFAULT_NOTICE
    notice_version: str = "2"
    opt_in_words: list[str] = ["ACEPTO", "SI", "SÍ", "YES"]
    opt_out_words: list[str] = ["BAJA", "STOP", "CANCELAR"]
    hold_hours: Annotated[int, Field(ge=1, le=720)] = 72
    # The language notice_text is written in: every mirroring consent record carries it
    # (evidence of what the citizen was shown, issue 15 point 7).
    notice_language: Annotated[str, Field(pattern=r"^[a-z]{2,3}(-[A-Z]{2})?$")] = "es"

    @model_validator(mode="after")
    def _disjoint(self) -> ConsentConfig:
        from bridge.text import fold

        overlap = {fold(w) for w in self.opt_in_words} & {fold(w) for w in self.opt_out_words}
        if overlap:
            raise FieldProblem(
                "opt_out_words", "overlaps opt_in_words (compared ignoring case and accents): "
                + ", ".join(sorted(overlap)))
        return self


DEFAULT_NOTICES_CONSENT = (
    "Avisos de {issuer}: si lo acepta, le avisaremos por WhatsApp cuando tenga una "
    "notificación a su disposición en la sede electrónica ({sede}). El aviso no contiene "
    "la notificación ni da acceso a ella: para leerla tendrá que identificarse en la sede. "
    "Es solo informativo. Pulse «Acepto» o vuelva a escribir AVISOS para aceptar; escriba "
    "BAJA AVISOS en cualquier momento para dejar de recibirlos."
)
NOTICES_PLACEHOLDERS = ("{agency}", "{issuer}", "{sede}")
MAX_INTERACTIVE_BODY = 1024  # WhatsApp's limit for a message with reply buttons


def _generic_https_url(value: str) -> str:
    """A link to the sede electrónica that cannot carry a token: https, no credentials,
    no query string, no fragment."""
    if value == "":
        return value
    from urllib.parse import urlsplit

    parts = urlsplit(value)
    if parts.scheme != "https" or not parts.hostname or re.search(r"\s", value):
        raise ValueError("must be an https:// URL (the sede electrónica's generic page)")
    if parts.query or parts.fragment or "?" in value or "#" in value:
        raise ValueError("must be a generic link without ?query or #fragment: a notice "
                         "never carries a link that grants access without identification")
    if parts.username or parts.password:
        raise ValueError("must not contain credentials")
    return value


class NoticesConfig(_Section):
    """Notices of availability (aviso de puesta a disposición): see docs/notices.md."""

    enabled: bool = False
    # The template approved at Meta: fixed text and sede link, one variable ({{1}}) for
    # the issuing body. Bump template_version whenever the approved text changes.
    template_name: Annotated[str, Field(pattern=r"^[a-z0-9_]{1,512}$")] = \
        "aviso_puesta_disposicion"
    template_language: Annotated[str, Field(pattern=r"^[a-z]{2,3}(_[A-Z]{2})?$")] = "es"
    template_version: Annotated[str, Field(min_length=1, max_length=64)] = "1"
    issuer: Annotated[str, Field(max_length=120)] = ""
    sede_url: Annotated[str, Field(max_length=200)] = ""
    consent_text: str = DEFAULT_NOTICES_CONSENT
    consent_version: Annotated[str, Field(min_length=1, max_length=64)] = "1"
    opt_in_words: Annotated[list[str], Field(min_length=1)] = ["AVISOS"]
    opt_out_words: Annotated[list[str], Field(min_length=1)] = ["BAJA AVISOS"]
    log_retention_days: Annotated[int, Field(ge=1, le=3650)] = 365

    _sede = field_validator("sede_url")(_generic_https_url)

    @field_validator("consent_text")
    @classmethod
    def _placeholders(cls, value: str) -> str:
        unknown = set(re.findall(r"\{[^}]*\}", value)) - set(NOTICES_PLACEHOLDERS)
        if unknown:
            raise ValueError(f"unknown placeholder {sorted(unknown)[0]}; only "
                             + ", ".join(NOTICES_PLACEHOLDERS) + " are replaced")
        return value

    @model_validator(mode="after")
    def _complete(self) -> NoticesConfig:
        from bridge.text import fold_words

        overlap = {fold_words(w) for w in self.opt_in_words} & \
            {fold_words(w) for w in self.opt_out_words}
        if overlap:
            raise FieldProblem("opt_out_words", "overlaps opt_in_words (compared ignoring "
                               "case and accents): " + ", ".join(sorted(overlap)))
        if self.enabled and not self.issuer.strip():
            raise FieldProblem("issuer", "missing; the issuing body's name is required when "
                               "notices.enabled is true")
        if self.enabled and not self.sede_url:
            raise FieldProblem("sede_url", "missing; the sede electrónica's generic https "
                               "link is required when notices.enabled is true")
        return self


MXID = Annotated[str, Field(pattern=r"^@[^:\s]+:[A-Za-z0-9.\-]+(:\d+)?$")]


class PortalsConfig(_Section):
    staff: list[MXID] = []


# What a named admin API token may do (bridge.admin.auth maps every route to one).
ADMIN_SCOPES = ("rooms", "moderation", "invites", "notices", "citizens.export",
                "citizens.erase", "reidentify", "audit.read")
AdminScope = Literal["rooms", "moderation", "invites", "notices", "citizens.export",
                     "citizens.erase", "reidentify", "audit.read"]
LEGACY_TOKEN_NAME = "admin"
# Who acts through an admin token (`civic-bridge admin --as`); here, not in bridge.admin,
# so the CLI stays light to import.
ADMIN_ACTOR_HEADER = "X-Civic-Bridge-Actor"


class AdminTokenConfig(_Section):
    """One named API token (`admin.tokens[]`): the audit names the caller by `name`."""

    name: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$")]
    # `token_file` is read into `token` before validation (see _resolve_token_files).
    token: Annotated[str, Field(min_length=32)]
    scopes: Annotated[list[AdminScope], Field(min_length=1)]


class AdminConfig(_Section):
    # The admin API's own listener (/admin/v1 and the probes); loopback by default.
    listen_host: ListenHost = "127.0.0.1"
    listen_port: Port = 29341
    # Legacy: the all-scopes token, named "admin" in the audit log.
    token: Secret
    users: list[MXID] = []
    # Where the bridge posts operational notices that concern no agency room (e.g. a
    # dead letter of a citizen without a portal yet): a room the bot is in, such as an
    # admin's DM with it. None: such events are only logged, counted and listed.
    management_room: Annotated[str, Field(pattern=r"^![^\s]+$")] | None = None
    tokens: list[AdminTokenConfig] = []
    # Re-identifications (POST /admin/v1/citizens/{id}/reveal) per token and hour.
    reveal_per_hour: Annotated[int, Field(ge=1, le=1000)] = 10

    @field_validator("tokens")
    @classmethod
    def _distinct(cls, value: list[AdminTokenConfig]) -> list[AdminTokenConfig]:
        names = [t.name for t in value]
        if LEGACY_TOKEN_NAME in names:
            raise ValueError(f"the name {LEGACY_TOKEN_NAME!r} is the legacy admin.token's; "
                             "pick another")
        if len(set(names)) != len(names):
            raise ValueError("token names must be unique (the audit log names the caller)")
        if len({t.token for t in value}) != len(value):
            raise ValueError("two tokens are the same; give each system its own")
        return value

    @model_validator(mode="after")
    def _not_the_legacy_token(self) -> AdminConfig:
        if any(t.token == self.token for t in self.tokens):
            raise FieldProblem("tokens", "a named token equals admin.token; give it its own")
        return self


class RoomsConfig(_Section):
    federate: bool = False
    confirm_above: Annotated[int, Field(ge=1)] = 25
    # WhatsApp members of agency rooms (bridge.rooms_wa, docs/rooms-over-whatsapp.md).
    # The approved template sent once per closed 24 h window: body parameters {{1}} the
    # number of new messages, {{2}} the room's name; "" = no template (the backlog
    # still waits for the citizen's next message).
    digest_template: Annotated[str, Field(pattern=r"^([a-z0-9_]{1,512})?$")] = ""
    digest_language: Annotated[str, Field(pattern=r"^[a-z]{2,3}(_[A-Z]{2})?$")] = "es"
    # The approved template (no parameters, nothing of the room) that asks a citizen
    # whose 24 h window is closed to answer, so that a waiting invitation can reach them;
    # at most one per closed window. "" = none: the invitation waits for their next
    # message, and the inviter is told so.
    invite_template: Annotated[str, Field(pattern=r"^([a-z0-9_]{1,512})?$")] = ""
    invite_language: Annotated[str, Field(pattern=r"^[a-z]{2,3}(_[A-Z]{2})?$")] = "es"
    # At most this many queued messages are delivered when the window opens again;
    # older ones are summed up in one line.
    backlog_max: Annotated[int, Field(ge=1, le=200)] = 20
    # Room messages still waiting for a member who has not written back are deleted
    # after this many days (the scheduled retention purge).
    backlog_days: Annotated[int, Field(ge=1, le=90)] = 14
    # How staff (power >= 50) are named to WhatsApp members; {name} is their display
    # name in the room (e.g. "Ayuntamiento · {name}").
    staff_label: Annotated[str, Field(min_length=1, max_length=100)] = "{name}"
    # Defaults of the per-room switches (POST /admin/v1/rooms/{id}/whatsapp-settings);
    # `team` rooms never allow WhatsApp members unless switched on for that room.
    whatsapp_members: bool = True
    relay_media: bool = True

    @field_validator("staff_label")
    @classmethod
    def _label_has_name(cls, value: str) -> str:
        if "{name}" not in value:
            raise ValueError("must contain {name}")
        return value


class InvitesConfig(_Section):
    """Invite links for pseudonymous citizens (bridge.invites); "" means "not set"."""

    # Base URL of the bridge as citizens' browsers reach it; "" = appservice.url.
    public_url: str = ""
    # The homeserver URL citizens sign in to; "" = homeserver.url.
    homeserver_url: str = ""
    # A web client the success page links to (e.g. the agency's Element); optional.
    web_client_url: str = ""
    default_expiry_hours: Annotated[int, Field(ge=1, le=720)] = 72
    # Accounts are @{localpart_prefix}{16 random letters}: outside the ghost namespace,
    # which is exclusive to the appservice and would block password login.
    localpart_prefix: Localpart = "v_"
    # Synapse's registration_shared_secret: creates the accounts. Invite links are
    # refused (503) while it is empty.
    registration_shared_secret: str = ""
    notice_version: str = "1"
    min_password_length: Annotated[int, Field(ge=8, le=128)] = 10

    _urls = field_validator("public_url", "homeserver_url", "web_client_url")(
        lambda v: v if v == "" else _http_url(v))

    @field_validator("registration_shared_secret")
    @classmethod
    def _secret(cls, value: str) -> str:
        if value and len(value) < 16:
            raise ValueError("must be at least 16 characters (Synapse's own secret)")
        return value


# Words a citizen's display name may not contain (compared ignoring case and accents):
# names that pass for the agency or its staff. Staff display names and consent.agency_name
# are added at run time.
DEFAULT_RESERVED_NAMES = [
    "Ayuntamiento", "Administración", "Administrador", "Administradora", "Admin",
    "Moderador", "Moderadora", "Alcalde", "Alcaldesa", "Concejal", "Concejala",
    "Funcionario", "Funcionaria", "Policía", "Soporte", "Oficial",
]
# The built-in flag list (`moderation.flag_terms: default`): insults, slurs and threats
# that are worth a moderator's look in a public agency's room. Matched as whole words,
# ignoring case and accents. Flagging never deletes anything.
DEFAULT_FLAG_TERMS = [
    "idiota", "imbécil", "gilipollas", "subnormal", "retrasado", "cabrón", "cabrona",
    "hijo de puta", "hija de puta", "puta", "zorra", "maricón", "mierda", "capullo",
    "te voy a matar", "os voy a matar", "te mato", "te voy a encontrar", "sé dónde vives",
    "panchito", "sudaca", "moro de mierda", "negrata",
]
FlagTerms = list[str] | Literal["default"]


class ModerationConfig(_Section):
    """Reports, flags and watched display names (bridge.moderation; docs/moderation.md)."""

    # The access token of a Synapse admin account: reads the client's event reports
    # (/_synapse/admin/v1/event_reports), sends server notices to Matrix reporters and
    # resets invite-link citizens' display names. "" = those three are off.
    synapse_admin_token: str = ""
    reports_poll_seconds: Annotated[float, Field(ge=1, le=3600)] = 30
    # Revert citizens' display names that hold a phone number, an e-mail address or a
    # reserved word, and tell the management room.
    watch_display_names: bool = True
    reserved_names: list[str] = DEFAULT_RESERVED_NAMES
    # [] = no flagging; `default` = DEFAULT_FLAG_TERMS; or your own list.
    flag_terms: FlagTerms = []
    # Per room: {"!room:server": [...] | default | []} replaces flag_terms in that room.
    room_flag_terms: dict[str, FlagTerms] = {}
    # Handled reports (who reported what, the encrypted reason) are deleted after this;
    # open ones stay until a moderator acts.
    reports_retention_days: Annotated[int, Field(ge=1, le=3650)] = 365

    @field_validator("room_flag_terms")
    @classmethod
    def _room_ids(cls, value: dict[str, FlagTerms]) -> dict[str, FlagTerms]:
        for room_id in value:
            if not re.match(r"^![^\s:]+:\S+$", room_id):
                raise ValueError(f"{_shown(room_id)[:80]}: keys must be room IDs like !abc:server")
        return value

    def terms_for(self, room_id: str) -> list[str]:
        """The flag terms of one room (empty: flagging off there)."""
        terms = self.room_flag_terms.get(room_id, self.flag_terms)
        return list(DEFAULT_FLAG_TERMS) if terms == "default" else list(terms)
class AuditConfig(_Section):
    """The audit trail's integrity (bridge.db.audit, docs/data-protection.md).

    `key` keys the chain (HMAC-SHA256): without it nobody can rewrite an entry and
    recompute the chain. Required: a bridge without it would write a trail anyone with
    write access to the database can rewrite, so it refuses to start instead.
    """

    key: str
    # Keys retired by rotation: entries keyed with them still verify.
    previous_keys: list[str] = []
    # Run once a day with the chain's head (one JSON line) on stdin, e.g.
    # ["logger", "-t", "civic-bridge-audit"]; [] = off. An argv list, no shell.
    anchor_command: list[str] = []

    _key = field_validator("key")(_key32)

    @field_validator("previous_keys")
    @classmethod
    def _old_keys(cls, value: list[str]) -> list[str]:
        return [_key32(v) for v in value]

    @model_validator(mode="after")
    def _current_not_retired(self) -> AuditConfig:
        if self.key in self.previous_keys:
            raise FieldProblem("previous_keys", "contains audit.key itself; list only "
                               "retired keys")
        return self


Days = Annotated[int, Field(ge=1, le=3650)]


class RetentionConfig(_Section):
    """Days each kind of kept data lives (bridge.retention; documented key by key in
    config.example.yaml). Older periods stay where they were: consent.hold_hours,
    notices.log_retention_days, moderation.reports_retention_days."""

    outbox_days: Days = 30  # settled sends, from their last change
    message_map_days: Days = 90
    never_consented_days: Days = 30  # from the contact's last message
    invite_links_days: Days = 30  # after expiry, revocation or last use
    unused_invite_accounts_days: Days = 30  # needs moderation.synapse_admin_token
    dead_letters_days: Days = 90  # from the last failure


class LoggingConfig(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["text", "json"] = "text"


class MetricsConfig(_Section):
    enabled: bool = True
    # The metrics listener (/metrics and the probes), bound only when enabled.
    listen_host: ListenHost = "127.0.0.1"
    listen_port: Port = 29342


class E2EEConfig(_Section):
    """End-to-end encryption policy of the bridge's devices (docs/e2ee.md)."""

    # Which staff devices a ghost sends the keys of messages sent before the device
    # appeared: only those their owner cross-signed (verified from another session), or
    # any device of a member. A phished password must not open every portal's history.
    forward_keys_to: Literal["cross-signed", "all"] = "cross-signed"


class Config(_Section):
    """The whole configuration; build it with `load_config`."""

    homeserver: HomeserverConfig
    appservice: AppserviceConfig
    database: DatabaseConfig = DatabaseConfig()
    privacy: PrivacyConfig
    whatsapp: WhatsAppConfig = WhatsAppConfig()
    consent: ConsentConfig = ConsentConfig()
    portals: PortalsConfig = PortalsConfig()
    admin: AdminConfig
    rooms: RoomsConfig = RoomsConfig()
    invites: InvitesConfig = InvitesConfig()
    notices: NoticesConfig = NoticesConfig()
    moderation: ModerationConfig = ModerationConfig()
    retention: RetentionConfig = RetentionConfig()
    audit: AuditConfig
    logging: LoggingConfig = LoggingConfig()
    metrics: MetricsConfig = MetricsConfig()
    e2ee: E2EEConfig = E2EEConfig()

    @model_validator(mode="after")
    def _invite_prefix(self) -> Config:
        ours, theirs = self.invites.localpart_prefix, self.appservice.ghost_prefix
        if ours.startswith(theirs) or theirs.startswith(ours):
            raise ValueError("invites.localpart_prefix: must not overlap "
                             "appservice.ghost_prefix (that namespace is the bridge's)")
        return self

    @model_validator(mode="after")
    def _listeners_apart(self) -> Config:
        taken = {self.appservice.listen_port: "appservice.listen_port"}
        ours = [("admin.listen_port", self.admin.listen_port)]
        if self.metrics.enabled:
            ours.append(("metrics.listen_port", self.metrics.listen_port))
        for key, port in ours:
            if port in taken:
                raise ValueError(f"{key}: {port} is {taken[port]} already; each listener "
                                 "needs a port of its own")
            taken[port] = key
        return self

    @model_validator(mode="after")
    def _audit_key_separate(self) -> Config:
        if self.audit.key in (self.privacy.data_key, self.privacy.index_key):
            raise ValueError("audit.key: must be a different key from privacy.data_key and "
                             "privacy.index_key (generate one: openssl rand -base64 32)")
        return self

    @model_validator(mode="after")
    def _notices_need_whatsapp(self) -> Config:
        if self.notices.enabled and not self.whatsapp.enabled:
            raise ValueError("notices.enabled: requires whatsapp.enabled (notices are sent "
                             "through the WhatsApp Cloud API)")
        from bridge.text import fold_words

        notices = {fold_words(w) for w in [*self.notices.opt_in_words,
                                           *self.notices.opt_out_words]}
        chat = {fold_words(w) for w in [*self.consent.opt_in_words,
                                        *self.consent.opt_out_words]}
        if notices & chat:
            raise ValueError("notices.opt_in_words: a notices keyword is also a consent "
                             "keyword (compared ignoring case and accents): "
                             + ", ".join(sorted(notices & chat)) + "; make them distinct")
        shown = self.notices_consent_text
        if len(shown) > MAX_INTERACTIVE_BODY:
            raise ValueError(f"notices.consent_text: {len(shown)} characters once its "
                             f"placeholders are filled in; WhatsApp allows "
                             f"{MAX_INTERACTIVE_BODY}: shorten it")
        return self

    @property
    def notices_consent_text(self) -> str:
        """The notices consent text as citizens are shown it (placeholders filled in)."""
        n = self.notices
        return (n.consent_text.replace("{agency}", self.consent.agency_name)
                .replace("{issuer}", n.issuer).replace("{sede}", n.sede_url))

    def secret_values(self) -> list[str]:
        """Every configured secret, for the logs' redaction (bridge.logsetup)."""
        return [s for s in (self.appservice.as_token, self.appservice.hs_token,
                            self.admin.token, self.privacy.data_key, self.privacy.index_key,
                            *self.privacy.previous_data_keys, *self.privacy.previous_index_keys,
                            self.whatsapp.access_token, self.whatsapp.app_secret,
                            self.whatsapp.verify_token,
                            self.invites.registration_shared_secret, self.audit.key,
                            *self.audit.previous_keys,
                            *(t.token for t in self.admin.tokens)) if s]

    def listeners(self) -> list[tuple[str, str, int]]:
        """(name, host, port) of every HTTP listener to bind: public, admin, metrics."""
        found = [("public", self.appservice.listen_host, self.appservice.listen_port),
                 ("admin", self.admin.listen_host, self.admin.listen_port)]
        if self.metrics.enabled:
            found.append(("metrics", self.metrics.listen_host, self.metrics.listen_port))
        return found

    @property
    def bot_mxid(self) -> str:
        return f"@{self.appservice.ghost_prefix}bot:{self.homeserver.domain}"


def _resolve_secrets(raw: dict[str, Any], base: Path, problems: list[str]) -> None:
    """Fill secrets from `<key>_file` or the environment, in place."""
    for section, key in SECRET_KEYS:
        sect = raw.get(section)
        if sect is None:
            sect = raw[section] = {}
        if not isinstance(sect, dict):
            continue  # the model reports the wrong type
        env = os.environ.get(f"{ENV_PREFIX}{section}_{key}".upper())
        file_key = f"{key}_file"
        file_name = sect.pop(file_key, None)
        if env:
            sect[key] = env
        elif file_name:
            path = Path(str(file_name))
            path = path if path.is_absolute() else base / path
            try:
                sect[key] = path.read_text(encoding="utf-8").strip()
            except OSError as exc:
                problems.append(f"{section}.{file_key}: cannot read {_shown(path)}: "
                                f"{exc.strerror}")
            except UnicodeDecodeError:
                problems.append(f"{section}.{file_key}: {_shown(path)} is not UTF-8 text "
                                "(keys are stored base64-encoded)")
            except ValueError:  # e.g. a NUL byte in the name
                problems.append(f"{section}.{file_key}: not a valid file name")
        elif not sect.get(key) and _required(section, key, sect):
            # An empty value counts as missing: the example ships `app_secret: ""`.
            problems.append(f"{section}.{key}: missing; set it or {section}.{file_key} "
                            f"or ${ENV_PREFIX}{section.upper()}_{key.upper()}"
                            + _MISSING_HINTS.get((section, key), ""))


# What to do about a missing secret, where the key name alone does not say it.
_MISSING_HINTS = {
    ("audit", "key"): " (keys the audit chain; generate one with `openssl rand -base64 32`; "
                      "existing audit entries stay verifiable, see docs/data-protection.md)",
}


def _resolve_token_files(raw: dict[str, Any], base: Path, problems: list[str]) -> None:
    """`admin.tokens[i].token_file`, read like the other secret files, in place."""
    admin = raw.get("admin")
    tokens = admin.get("tokens") if isinstance(admin, dict) else None
    if not isinstance(tokens, list):
        return  # absent, or the model reports the wrong type
    for i, item in enumerate(tokens):
        if not isinstance(item, dict) or "token_file" not in item:
            continue
        item = tokens[i] = dict(item)
        where = f"admin.tokens[{i}].token_file"
        path = Path(str(item.pop("token_file")))
        path = path if path.is_absolute() else base / path
        try:
            item["token"] = path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            problems.append(f"{where}: cannot read {_shown(path)}: {exc.strerror}")
        except (UnicodeDecodeError, ValueError):
            problems.append(f"{where}: not a readable UTF-8 text file name")


def _required(section: str, key: str, sect: dict[str, Any]) -> bool:
    if section in ("invites", "moderation"):
        return False  # optional: invite links, or reports from the client, are off without it
    if section == "whatsapp":
        enabled = sect.get("enabled")
        if isinstance(enabled, str):
            return enabled.strip().lower() in _TRUE
        return enabled is True or (type(enabled) is int and enabled == 1)
    return True


def _shown(name: object) -> str:
    """A key or file name as it may appear in a problem line: one printable line."""
    text = str(name)
    return text if text.isprintable() else repr(text)


def _placeholders(node: Any, path: str, problems: list[str]) -> None:
    if isinstance(node, dict):
        for k, v in node.items():
            _placeholders(v, f"{path}.{_shown(k)}" if path else _shown(k), problems)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            _placeholders(v, f"{path}[{i}]", problems)
    elif isinstance(node, str) and PLACEHOLDER.search(node):
        problems.append(f"{path}: still the placeholder from config.example.yaml; "
                        "replace it with a real value (civic-bridge init generates one)")


def _format(error: ValidationError) -> list[str]:
    lines = []
    for err in error.errors():
        loc = ".".join(_shown(p) if not isinstance(p, int) else f"[{p}]" for p in err["loc"])
        loc = loc.replace(".[", "[")
        msg = err["msg"].removeprefix("Value error, ")
        problem = err.get("ctx", {}).get("error")
        if isinstance(problem, FieldProblem):
            loc = f"{loc}.{problem.field}" if loc else problem.field
            msg = problem.message
        elif err["type"] == "missing":
            msg = "missing; add it (see config.example.yaml)"
        elif err["type"] == "extra_forbidden":
            msg = "unknown key; remove it or check its spelling"
        elif err["type"] == "string_type" and isinstance(err.get("input"), bool):
            msg += " (YAML reads unquoted yes/no/on/off/true/false as booleans: quote it)"
        lines.append(f"{loc}: {msg}" if loc else msg)
    return lines


def parse_config(raw: Any, base: Path = Path(".")) -> Config:
    """Validate a parsed YAML document; raises ConfigError with every problem."""
    if not isinstance(raw, dict):
        raise ConfigError(["(top level): must be a mapping of sections"])
    # An empty section (`logging:` with every line commented out) is an empty mapping.
    raw = {k: (dict(v) if isinstance(v, dict) else {} if v is None else v)
           for k, v in raw.items()}
    problems: list[str] = []
    _resolve_secrets(raw, base, problems)
    _resolve_token_files(raw, base, problems)
    _placeholders(raw, "", problems)
    try:
        config = Config.model_validate(raw)
    except ValidationError as exc:
        # A failed `<key>_file` already explains why `<key>` is missing.
        reported = {p.split(":", 1)[0].removesuffix("_file") for p in problems}
        problems.extend(p for p in _format(exc) if p.split(":", 1)[0] not in reported)
        config = None
    if problems:
        raise ConfigError(sorted(set(problems), key=problems.index))
    assert config is not None
    return _anchor_paths(config, base)


def _anchor_paths(config: Config, base: Path) -> Config:
    """Make relative file paths relative to the config file's directory."""
    store = Path(config.appservice.store_dir)
    update: dict[str, Any] = {}
    if not store.is_absolute():
        update["appservice"] = config.appservice.model_copy(
            update={"store_dir": str(base / store)})
    from sqlalchemy import make_url

    url = make_url(config.database.url)
    name = url.database
    if (url.get_backend_name() == "sqlite" and name and name != ":memory:"
            and not name.startswith("file:") and not Path(name).is_absolute()):
        update["database"] = config.database.model_copy(update={
            "url": url.set(database=str(base / name)).render_as_string(hide_password=False)})
    return config.model_copy(update=update) if update else config


def load_config(path: str | Path) -> Config:
    """Read, resolve and validate a YAML config file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{_shown(path)}: cannot read: {exc.strerror}"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{_shown(path)}: not UTF-8 text"]) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise ConfigError([f"{_shown(path)}: not valid YAML{where}"]) from None
    return parse_config(raw, path.parent)
