"""Logging setup and the redaction filter, the last line of defence.

Code must not log phone numbers, WhatsApp ids, tokens or message bodies in the
first place (log pseudonyms and lazy ``%`` arguments instead). `RedactingFilter`
catches what slips through anyway: it runs on the handler, after all formatting
inputs are known, and rewrites the record so every formatter and later handler
sees the redacted text. It errs towards over-redaction: a lost digit in a log
line costs little; a leaked phone number is a reportable breach.

It cannot recognise message bodies or profile names in free text; keeping
those out of logs is the caller's job (third-party loggers that dump payloads
at DEBUG are capped at WARNING for that reason).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sys
import traceback
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any, TextIO

import phonenumbers

from bridge.config import LoggingConfig

__all__ = ["JsonFormatter", "RedactingFilter", "TextFormatter", "redact", "setup_logging"]

# Numbers without a country code are read as Spanish ones (the agencies' own).
PHONE_REGION = "ES"

# Strings shorter than this are not treated as secrets: redacting every "a" or
# "1234" would destroy the log, and real tokens/keys are far longer.
MIN_SECRET_LEN = 8

# Libraries that log payloads, SQL parameters or decrypted events at DEBUG.
QUIET_LOGGERS = ("nio", "peewee", "aiosqlite", "sqlalchemy.engine")

# --------------------------------------------------------------------------- patterns

_Q = r"""["']"""
# Keys whose value identifies a citizen, in JSON / Python repr / key=value form.
_ID_KEYS = r"wa_id|from|user_id|recipient_id|recipient_user_id|phone|phone_number|input"
_ID_FIELD = re.compile(
    rf"""(?P<key>(?<=["'])(?:{_ID_KEYS})["']\s*:\s*|(?<![\w.])(?:{_ID_KEYS})=)"""
    rf"""(?P<val>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|[^\s,;&}}\]\)]+)"""
)
# A WhatsApp contact's profile object holds their chosen name.
_PROFILE = re.compile(r"""(?P<key>(?<=["'])profile["']\s*:\s*)\{[^{}]*\}""")
_BEARER = re.compile(r"(?P<key>(?<![\w])[Bb](?i:earer)\s+)[A-Za-z0-9._~+/=\-]+")
# Any key naming a credential (access_token=, "hs_token": ..., X-Hub-Signature-256: ...);
# matched from the keyword on, since whatever precedes it is kept anyway.
_TOKEN_FIELD = re.compile(
    r"(?P<key>(?i:token|secret|password|signature)[\w\-]{0,10}"
    r"""["']?\s*[=:]\s*["']?)(?P<val>[^\s"'&,;}\]]+)"""
)
_NOT_NAME = re.compile(r"[^a-z_]")
_ID_HINTS = ("wa_id", "from", "user_id", "recipient", "phone", "input", "profile")
_TOKEN_HINTS = ("token", "secret", "password", "signature")
_DIGIT = re.compile(r"\d")  # any script: fullwidth or Arabic-Indic digits too
# Meta's message ids are base64 that embeds the sender's wa_id ("wamid.HBgL<b64 of digits>").
_WAMID = re.compile(r"wamid\.[A-Za-z0-9+/=_\-]+")

# Spans kept verbatim even though they contain digits (listed first so they win
# at any position they start): Matrix event ids ($...), room ids (!...:server),
# ISO 8601 timestamps, UUIDs and long hex digests.
_DATE = r"(?:19|20)[0-9]{2}-(?:0[1-9]|1[0-2])-(?:0[1-9]|[12][0-9]|3[01])"
# Ids must contain a letter, so "$34600112233" is still a phone number.
_KEEP = (
    r"\$(?=[^\s:]*[A-Za-z])[A-Za-z0-9+/=_\-]+(?::[A-Za-z0-9.\-]+(?::[0-9]+)?)?"
    r"|!(?=[^\s:]*[A-Za-z])[A-Za-z0-9+/=_\-.]+:[A-Za-z0-9.\-]+(?::[0-9]+)?"
    rf"|(?<![0-9])(?<![0-9][\-.]){_DATE}(?!-?[0-9])"
    r"(?:[T ][0-9]{2}:[0-9]{2}(?::[0-9]{2}(?:[.,][0-9]{1,9})?)?(?:Z|[+-][0-9]{2}:?[0-9]{2})?)?"
    r"|(?<![A-Za-z0-9])[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}"
    r"-[0-9a-fA-F]{12}(?![A-Za-z0-9])"
    r"|(?<![A-Za-z0-9])(?=[0-9a-f]*[a-f])[0-9a-f]{32,}(?![A-Za-z0-9])"
)
_BSUID = r"(?<![A-Za-z0-9])[A-Z]{2}\.[A-Za-z0-9]{8,}"
# Phones (digits of any script): 7+ consecutive digits anywhere (URLs, ids,
# glued to words); or 7+ digits written with + ( ) space dash dot slash underscore
# middle-dot comma separators, not starting inside a word, and never swallowing a
# following ISO date. `phonenumbers`' own matcher then looks at what is left.
_SEP = r"[\s.\-()\u00a0/_\u00b7,]{0,3}"
_PHONE = (
    r"\d{7,}"
    rf"|(?<![A-Za-z0-9_])\+?\(?\d(?:{_SEP}(?!{_DATE})\d){{6,}}"
)
_BSUID_HINT = re.compile(r"[A-Z]{2}\.")
_SCAN = re.compile(rf"(?P<keep>{_KEEP})|(?P<bsuid>{_BSUID})|(?P<phone>{_PHONE})")


def _mark(kind: str) -> str:
    return f"[redacted:{kind}]"


def _scan_sub(match: re.Match[str]) -> str:
    kind = match.lastgroup
    if kind == "keep" or kind is None:
        return match.group()
    return _mark(kind)


def _id_field_sub(match: re.Match[str]) -> str:
    key, val = match.group("key"), match.group("val")
    quote = val[0] if val[:1] in ("'", '"') else ""
    name = _NOT_NAME.sub("", key.lower()) or "id"
    return f"{key}{quote}{_mark(name)}{quote}"


def redact(text: str) -> str:
    """Replace identifiers and credentials in ``text`` with ``[redacted:<kind>]``.

    Kinds: ``wa_id``/``from``/``user_id``/... (identifier fields), ``profile``,
    ``token`` (Bearer/access_token=/secret fields), ``wamid``, ``bsuid`` and
    ``phone`` (7+ digits, consecutive or with phone punctuation). Matrix
    event/room ids, ISO timestamps, UUIDs and hex digests are kept.
    Registered secrets are handled by `RedactingFilter`.
    """
    # Cheap substring checks first: most lines have none of the keywords, and
    # `in` is far faster than a regex that cannot start with a literal.
    low = text.lower()
    if any(k in low for k in _ID_HINTS):
        text = _ID_FIELD.sub(_id_field_sub, text)
        if "profile" in low:
            text = _PROFILE.sub(lambda m: m.group("key") + '"' + _mark("profile") + '"', text)
    if "bearer" in low:
        text = _BEARER.sub(lambda m: m.group("key") + _mark("token"), text)
    if any(k in low for k in _TOKEN_HINTS):
        text = _TOKEN_FIELD.sub(lambda m: m.group("key") + _mark("token"), text)
    if "wamid." in text:
        text = _WAMID.sub(_mark("wamid"), text)
    # Only a BSUID can match with fewer than 7 digits in the whole text.
    if len(_DIGIT.findall(text)) < 7 and not _BSUID_HINT.search(text):
        return text
    return _phonenumbers_sub(_SCAN.sub(_scan_sub, text))


def _phonenumbers_sub(text: str) -> str:
    """Numbers `phonenumbers` recognises (any format it knows, Spanish or international)
    in what the patterns above left: a second opinion from a library that tracks the
    numbering plans, not a replacement (it wants valid numbers; a log line may hold a
    truncated or mistyped one, which the patterns catch)."""
    if len(_DIGIT.findall(text)) < 7:
        return text
    spans = [(m.start, m.end) for m in phonenumbers.PhoneNumberMatcher(
        text, PHONE_REGION, leniency=phonenumbers.Leniency.POSSIBLE, max_tries=200)]
    for start, end in reversed(spans):
        text = text[:start] + _mark("phone") + text[end:]
    return text


# --------------------------------------------------------------------------- filter

_RECORD_ATTRS = frozenset(
    logging.LogRecord("", 0, "", 0, "", (), None).__dict__
) | {"message", "asctime", "taskName"}
_SENSITIVE_EXTRA = re.compile(rf"^(?:{_ID_KEYS}|profile|name|body|text)$", re.IGNORECASE)
_MAX_DEPTH = 6


def _safe_str(value: object) -> str:
    try:
        return str(value)
    except Exception:
        return f"<unprintable {type(value).__name__}>"


class RedactingFilter(logging.Filter):
    """Redacts secrets and personal identifiers from every record passing a handler.

    Formats ``msg % args`` itself (so an identifier passed as an argument is
    caught), stores the result in ``record.msg`` with ``record.args = ()``, and
    also cleans the exception/stack text and ``extra`` fields. Extra fields
    (also nested in dicts/lists) whose key names an identifier or content
    (``wa_id``, ``from``, ``user_id``, ``phone``, ``profile``, ``name``,
    ``body``, ``text``, ...) are replaced whole; integers of 7+ digits count as
    phone numbers; other objects become redacted strings. It never raises and
    never drops a record: if something cannot be cleaned, the content is
    replaced rather than let through.
    """

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        usable = sorted({s for s in secrets if len(s) >= MIN_SECRET_LEN}, key=len, reverse=True)
        self._secrets = (
            re.compile("|".join(re.escape(s) for s in usable)) if usable else None
        )

    def redact(self, text: str) -> str:
        """`redact` plus this filter's registered secrets."""
        if self._secrets is not None:
            text = self._secrets.sub(_mark("secret"), text)
        return redact(text)

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            self._clean(record)
        except Exception:  # a filter that raises loses the line; lose only the content
            record.msg = "[redacted: log record could not be cleaned]"
            record.args = ()
            record.exc_text = None
            record.exc_info = None
            record.stack_info = None
        return True

    def _clean(self, record: logging.LogRecord) -> None:
        record.msg = self.redact(self._message(record))
        record.args = ()
        if record.exc_info and not record.exc_text:
            record.exc_text = "".join(traceback.format_exception(*record.exc_info)).rstrip("\n")
        if record.exc_text:
            record.exc_text = self.redact(record.exc_text)
        if record.stack_info:
            record.stack_info = self.redact(record.stack_info)
        for key, value in list(record.__dict__.items()):
            if key not in _RECORD_ATTRS:
                record.__dict__[key] = self._clean_extra(key, value, 0)

    @staticmethod
    def _message(record: logging.LogRecord) -> str:
        try:
            return record.getMessage()
        except Exception:
            # Wrong %-args: keep everything for debugging, but redacted.
            return f"{_safe_str(record.msg)} [bad log args: {_safe_str(record.args)}]"

    def _clean_extra(self, key: object, value: Any, depth: int) -> Any:
        if isinstance(key, str) and _SENSITIVE_EXTRA.match(key) and value is not None:
            return _mark(key.lower())
        if isinstance(value, bool) or value is None or isinstance(value, float):
            return value
        if isinstance(value, int):
            return value if len(str(abs(value))) < 7 else _mark("phone")
        if isinstance(value, str):
            return self.redact(value)
        if depth < _MAX_DEPTH:
            if isinstance(value, dict):
                return {
                    self.redact(_safe_str(k)): self._clean_extra(k, v, depth + 1)
                    for k, v in value.items()
                }
            if isinstance(value, list | tuple | set | frozenset):
                return [self._clean_extra(None, v, depth + 1) for v in value]
        return self.redact(_safe_str(value))


# --------------------------------------------------------------------------- formatters


def _timestamp(record: logging.LogRecord) -> str:
    moment = datetime.fromtimestamp(record.created, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _RECORD_ATTRS}


class TextFormatter(logging.Formatter):
    """``<UTC time> LEVEL logger: message key=value ...`` plus any traceback."""

    def format(self, record: logging.LogRecord) -> str:
        line = f"{_timestamp(record)} {record.levelname} {record.name}: {record.getMessage()}"
        extras = _extras(record)
        if extras:
            line += " " + " ".join(
                f"{k}={json.dumps(v, default=_safe_str, ensure_ascii=False)}"
                for k, v in sorted(extras.items())
            )
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line += "\n" + record.exc_text
        if record.stack_info:
            line += "\n" + record.stack_info
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, extra fields, exc, stack."""

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in _extras(record).items():
            payload.setdefault(key, value)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            payload["exc"] = record.exc_text
        if record.stack_info:
            payload["stack"] = record.stack_info
        # default=str for odd extras; the filter already turned them into redacted text.
        return json.dumps(payload, default=_safe_str, ensure_ascii=False)


# --------------------------------------------------------------------------- setup


class ShutdownRollbackFilter(logging.Filter):
    """Shutdown cancels tasks, and one cancelled while its session rolls back makes
    SQLAlchemy's pool log "Exception during reset" at ERROR with a traceback. Nothing is
    lost (the transaction was not committed; the pool discards the connection): one
    INFO line says so. Any other failure of the pool keeps its error and traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if record.name.startswith("sqlalchemy.pool") and isinstance(exc, asyncio.CancelledError):
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.msg, record.args = ("a database connection's rollback was interrupted by "
                                       "shutdown; the connection is discarded"), ()
            record.exc_info = record.exc_text = None
            return logging.getLogger().isEnabledFor(logging.INFO)
        return True


class _BridgeHandler(logging.StreamHandler[TextIO]):
    """Marks the handler this module installed, so setup can be re-run safely."""


def setup_logging(
    cfg: LoggingConfig, secrets: Iterable[str] = (), *, stream: TextIO | None = None
) -> None:
    """Configure the root logger: one stderr handler with `RedactingFilter` and the
    configured format and level. ``secrets`` (tokens, keys) are redacted verbatim.

    Calling it again replaces the handler it installed earlier and leaves other
    handlers (e.g. pytest's) alone.
    """
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _BridgeHandler)]:
        root.removeHandler(old)
        old.close()
    handler = _BridgeHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if cfg.format == "json" else TextFormatter())
    handler.addFilter(ShutdownRollbackFilter())
    handler.addFilter(RedactingFilter(secrets))
    root.addHandler(handler)
    root.setLevel(cfg.level)
    quiet = max(logging.WARNING, logging.getLevelNamesMapping()[cfg.level])
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(quiet)
