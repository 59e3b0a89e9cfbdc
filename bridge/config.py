"""Typed, frozen configuration loaded from YAML.

Every problem is reported as one line naming the key path and the fix, e.g.
`whatsapp.app_secret: missing; set it or whatsapp.app_secret_file`.
Secrets may be given inline, through a `<key>_file` sibling, or through the
environment variable `CIVIC_BRIDGE_<SECTION>_<KEY>` (which wins).
"""

from __future__ import annotations

import base64
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from bridge.errors import ConfigError

ENV_PREFIX = "CIVIC_BRIDGE_"
# Values copied from config.example.yaml must not reach production.
PLACEHOLDER = re.compile(r"CHANGE[_-]?ME|<[^>]*>|EXAMPLE_SECRET", re.IGNORECASE)

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
)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


Secret = Annotated[str, Field(min_length=16)]
Localpart = Annotated[str, Field(pattern=r"^[a-z0-9._=\-/]+$")]


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
    listen_host: str = "127.0.0.1"
    listen_port: Annotated[int, Field(ge=1, le=65535)] = 29340
    url: str | None = None
    as_token: Secret
    hs_token: Secret
    # The registration's sender_localpart; Synapse gives it no device (see notes),
    # so the encrypting bot is `{ghost_prefix}bot`.
    bot_localpart: Localpart = "civicbridge"
    ghost_prefix: Localpart = "cb_"
    store_dir: str = "./store"

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
    pseudonym_template: str = "Ciudadano/a {code}"

    _keys = field_validator("data_key", "index_key")(_key32)

    @field_validator("previous_data_keys")
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
            raise ValueError("data_key and index_key must be different keys")
        return self


class WhatsAppConfig(_Section):
    enabled: bool = False
    api_base: str = "https://graph.facebook.com/v23.0"
    phone_number_id: str = ""
    access_token: str = ""
    app_secret: str = ""
    verify_token: str = ""

    _url = field_validator("api_base")(_http_url)

    @model_validator(mode="after")
    def _required_when_enabled(self) -> WhatsAppConfig:
        # Secrets are checked (with their _file/env hints) before validation.
        if self.enabled and not self.phone_number_id:
            raise ValueError("phone_number_id: required when whatsapp.enabled is true")
        return self


DEFAULT_NOTICE = (
    "Hola. Este es el canal de WhatsApp de {agency}. Si quiere que el personal le "
    "atienda aquí, sus mensajes se reenviarán a una sala cifrada de la entidad con un "
    "seudónimo; su número no se muestra a nadie. Responda ACEPTO para continuar o BAJA "
    "para no recibir más mensajes. Puede darse de baja en cualquier momento escribiendo BAJA."
)


class ConsentConfig(_Section):
    agency_name: str = "la entidad"
    notice_text: str = DEFAULT_NOTICE
    notice_version: str = "1"
    opt_in_words: list[str] = ["ACEPTO", "SI", "SÍ", "YES"]
    opt_out_words: list[str] = ["BAJA", "STOP", "CANCELAR"]
    hold_hours: Annotated[int, Field(ge=1, le=720)] = 72

    @model_validator(mode="after")
    def _disjoint(self) -> ConsentConfig:
        from bridge.text import fold

        overlap = {fold(w) for w in self.opt_in_words} & {fold(w) for w in self.opt_out_words}
        if overlap:
            raise ValueError("opt_in_words and opt_out_words overlap: "
                             + ", ".join(sorted(overlap)))
        return self


MXID = Annotated[str, Field(pattern=r"^@[^:\s]+:[A-Za-z0-9.\-]+(:\d+)?$")]


class PortalsConfig(_Section):
    staff: list[MXID] = []


class AdminConfig(_Section):
    token: Secret
    users: list[MXID] = []


class RoomsConfig(_Section):
    federate: bool = False
    confirm_above: Annotated[int, Field(ge=1)] = 25


class LoggingConfig(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["text", "json"] = "text"


class MetricsConfig(_Section):
    enabled: bool = True


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
    logging: LoggingConfig = LoggingConfig()
    metrics: MetricsConfig = MetricsConfig()

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
                problems.append(f"{section}.{file_key}: cannot read {path}: {exc.strerror}")
        elif key not in sect and _required(section, key, sect):
            problems.append(f"{section}.{key}: missing; set it or {section}.{file_key} "
                            f"or ${ENV_PREFIX}{section.upper()}_{key.upper()}")


def _required(section: str, key: str, sect: dict[str, Any]) -> bool:
    if section == "whatsapp":
        return bool(sect.get("enabled"))
    return True


def _placeholders(node: Any, path: str, problems: list[str]) -> None:
    if isinstance(node, dict):
        for k, v in node.items():
            _placeholders(v, f"{path}.{k}" if path else str(k), problems)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            _placeholders(v, f"{path}[{i}]", problems)
    elif isinstance(node, str) and PLACEHOLDER.search(node):
        problems.append(f"{path}: still the placeholder from config.example.yaml; "
                        "replace it with a real value (civic-bridge init generates one)")


def _format(error: ValidationError) -> list[str]:
    lines = []
    for err in error.errors():
        loc = ".".join(str(p) if not isinstance(p, int) else f"[{p}]" for p in err["loc"])
        loc = loc.replace(".[", "[")
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "missing":
            msg = "missing; add it (see config.example.yaml)"
        elif err["type"] == "extra_forbidden":
            msg = "unknown key; remove it or check its spelling"
        lines.append(f"{loc}: {msg}" if loc else msg)
    return lines


def parse_config(raw: Any, base: Path = Path(".")) -> Config:
    """Validate a parsed YAML document; raises ConfigError with every problem."""
    if not isinstance(raw, dict):
        raise ConfigError(["(top level): must be a mapping of sections"])
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    problems: list[str] = []
    _resolve_secrets(raw, base, problems)
    _placeholders(raw, "", problems)
    try:
        config = Config.model_validate(raw)
    except ValidationError as exc:
        reported = {p.split(":", 1)[0] for p in problems}
        problems.extend(p for p in _format(exc) if p.split(":", 1)[0] not in reported)
        config = None
    if problems:
        raise ConfigError(sorted(set(problems), key=problems.index))
    assert config is not None
    return config


def load_config(path: str | Path) -> Config:
    """Read, resolve and validate a YAML config file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror}"]) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise ConfigError([f"{path}: not valid YAML{where}"]) from None
    return parse_config(raw, path.parent)
