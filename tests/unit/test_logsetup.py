"""Logging setup and the redaction filter (the last line of defence)."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import time
import unicodedata
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.config import LoggingConfig
from bridge.logsetup import QUIET_LOGGERS, RedactingFilter, redact, setup_logging

PHONE = "+34 600 11 22 33"
PHONE_DIGITS = "600112233"
SECRET = "syt_Y2l2aWMtYnJpZGdl_s3cr3tT0kenValue"
BSUID = "US.13491208655302741918"
EVENT_ID = "$Rqnc-F-dvnEYJTyHq_iKxU2bZ1CI92-kuZq3eOt3XI4"
EVENT_ID_DIGITS = "$Rqnc-F-dvnEYJTyHq_iKxU2bZ1234567890kuZq3eOt3XI4"
ROOM_ID = "!OGEhHVWSdvArJzumhm:example.org"
ROOM_ID_DIGITS = "!OGE12345678dvArJzumhm:example.org"
ISO = "2026-11-27T21:00:00"

Setup = Callable[..., io.StringIO]


@pytest.fixture
def configure() -> Iterator[Setup]:
    """Run setup_logging into a buffer; restore the root logger afterwards.

    pytest's own capture handlers are detached meanwhile: they would see (and
    raise on) the raw record before ours, which production does not have.
    """
    root = logging.getLogger()
    saved = (root.level, list(root.handlers))
    saved_quiet = {n: logging.getLogger(n).level for n in QUIET_LOGGERS}

    def run(fmt: str = "text", level: str = "DEBUG", secrets: tuple[str, ...] = ()) -> io.StringIO:
        buf = io.StringIO()
        cfg = LoggingConfig.model_validate({"format": fmt, "level": level})
        setup_logging(cfg, secrets, stream=buf)
        for handler in list(root.handlers):
            if not any(isinstance(f, RedactingFilter) for f in handler.filters):
                root.removeHandler(handler)
        return buf

    yield run
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    for handler in saved[1]:
        root.addHandler(handler)
    root.setLevel(saved[0])
    for name, level in saved_quiet.items():
        logging.getLogger(name).setLevel(level)


log = logging.getLogger("civic.test")


def without_separators(text: str) -> str:
    return re.sub(r"[\s\-.()+]", "", text)


def assert_clean(out: str) -> None:
    assert PHONE_DIGITS not in without_separators(out)
    assert SECRET not in out
    assert BSUID not in out
    assert BSUID.split(".")[1] not in out


# --------------------------------------------------------------------------- what is redacted


def test_phone_in_message(configure: Setup) -> None:
    out = configure()
    message = "sending to " + PHONE + " now"  # the mistake this filter exists for
    log.info(message)
    text = out.getvalue()
    assert_clean(text)
    assert "sending to [redacted:phone] now" in text


@pytest.mark.parametrize("arg", [PHONE, "34600112233", 34600112233, ["34600112233"]])
def test_phone_in_args(configure: Setup, arg: object) -> None:
    out = configure()
    log.warning("unknown sender %s", arg)
    text = out.getvalue()
    assert_clean(text)
    assert "unknown sender" in text and "[redacted:" in text


def test_phone_in_exception(configure: Setup) -> None:
    out = configure()
    try:
        raise ValueError(f"could not send to {PHONE}")
    except ValueError:
        log.exception("send failed")
    text = out.getvalue()
    assert_clean(text)
    assert "Traceback" in text and "ValueError: could not send to [redacted:phone]" in text


def test_phone_in_exception_json(configure: Setup) -> None:
    out = configure("json")
    try:
        raise RuntimeError(f"wa_id={PHONE_DIGITS}")
    except RuntimeError:
        log.exception("failed")
    line = json.loads(out.getvalue())
    assert "RuntimeError" in line["exc"]
    assert_clean(out.getvalue())


def test_phone_in_json_extra_fields(configure: Setup) -> None:
    out = configure("json")
    payload = {"contacts": [{"wa_id": "34600112233", "user_id": BSUID,
                             "profile": {"name": "Ana García"}}],
               "messages": [{"from": "34600112233", "id": "wamid.HBgLMzQ2MDAxMTIyMzMVAgA="}]}
    log.info("webhook", extra={"payload": payload, "note": f"from {PHONE}",
                               "wa_id": 34600112233, "count": 3})
    text = out.getvalue()
    assert_clean(text)
    assert "Ana" not in text
    assert "HBgLMzQ2MDAxMTIyMzM" not in text  # wamids embed the sender's number
    line = json.loads(text)
    assert line["count"] == 3
    assert line["wa_id"] == "[redacted:wa_id]"
    assert line["payload"]["contacts"][0]["wa_id"] == "[redacted:wa_id]"


def test_json_payload_logged_as_text(configure: Setup) -> None:
    out = configure()
    body = json.dumps({"wa_id": "34600112233", "from": "34600112233", "user_id": BSUID,
                       "profile": {"name": "Ana García"}})
    log.debug("raw body %s", body)
    text = out.getvalue()
    assert_clean(text)
    assert "Ana" not in text
    assert '"wa_id": "[redacted:wa_id]"' in text


def test_registered_secret(configure: Setup) -> None:
    out = configure(secrets=(SECRET, "short", ""))
    log.info("as_token is %s, again %s", SECRET, SECRET[:-1] + "X")
    text = out.getvalue()
    assert SECRET not in text
    assert "[redacted:secret]" in text
    assert "short" not in SECRET  # short strings are not treated as secrets


def test_bearer_and_access_token(configure: Setup) -> None:
    out = configure()
    log.info("headers Authorization: Bearer abc.DEF-ghi_123")
    log.info("GET /_matrix/app/v1/transactions/1?access_token=hsTOKENvalue&x=1")
    log.info("config %s", {"hs_token": "hsTOKENvalue2", "password": "pw123456"})
    text = out.getvalue()
    for leaked in ("abc.DEF-ghi_123", "hsTOKENvalue", "hsTOKENvalue2", "pw123456"):
        assert leaked not in text
    assert "Bearer [redacted:token]" in text
    assert "access_token=[redacted:token]&x=1" in text


def test_bsuid(configure: Setup) -> None:
    out = configure()
    log.info("contact %s replied", BSUID)
    log.info("contact US.AbCdEfGhIjKl replied")
    text = out.getvalue()
    assert_clean(text)
    assert "AbCdEfGhIjKl" not in text
    assert text.count("[redacted:bsuid]") == 2


def notify_34600112233() -> None:  # the stack shows frame names
    log.info("where", stack_info=True)


def test_stack_info_is_redacted(configure: Setup) -> None:
    out = configure()
    notify_34600112233()
    assert "Stack (most recent call last)" in out.getvalue()
    assert "34600112233" not in out.getvalue()


# --------------------------------------------------------------------------- what survives


def test_matrix_ids_and_timestamps_survive(configure: Setup) -> None:
    out = configure()
    log.info("relayed %s in %s at %s (sent %s)", EVENT_ID, ROOM_ID, ISO,
             "2026-11-27T21:00:00.123456+00:00")
    log.info("v1 %s, %s", EVENT_ID_DIGITS, ROOM_ID_DIGITS)
    text = out.getvalue()
    for kept in (EVENT_ID, ROOM_ID, ISO, "2026-11-27T21:00:00.123456+00:00", EVENT_ID_DIGITS,
                 ROOM_ID_DIGITS):
        assert kept in text
    assert "[redacted" not in text


@pytest.mark.parametrize(
    "text",
    [EVENT_ID, ROOM_ID, EVENT_ID_DIGITS, ROOM_ID_DIGITS, ISO, "$1234567abc:example.org",
     "2026-11-27 21:00:00,123", "status 200 after 3 retries, 2.5 s",
     "listening on 127.0.0.1:29340", "uuid 550e8400-e29b-41d4-a716-446655440000",
     "hash " + "3f5a9c0b1e2d4f6a8b7c9d0e1f2a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c",
     "pseudonym Ciudadano/a KQTR-MWXZ (@cb_qwertyuiopasdfgh:example.org)"],
)
def test_ordinary_text_is_kept(text: str) -> None:
    assert redact(text) == text


@pytest.mark.parametrize(
    ("text", "leaked"),
    [("https://graph.facebook.com/v23.0/123456789012/messages", "123456789012"),
     ("user @34600112233:example.org", "34600112233"),
     ("id abc1234567def", "1234567"),
     ("tel (+34) 600-11-22-33.", "600-11-22-33"),
     ("call 600.11.22.33 or 600 112 233", "600"),
     ("see 12 2026-11-27 and 1234-56-78-90", "1234-56-78-90"),
     ("$34600112233", "34600112233"),
     ("Luis \uff16\uff11\uff12\uff13\uff14\uff15\uff16\uff17\uff18", "\uff16\uff11\uff12"),
     ("\u0666\u0661\u0662 \u0663\u0664\u0665 \u0666\u0667\u0668", "\u0663\u0664\u0665"),
     ("+34600-00-0000", "600-00-0000"),
     ("log-2026-11-27 vs 2026-11-27-612345678", "612345678"),
     ("X-Hub-Signature-256: sha256=deadbeef00", "deadbeef00")],
)
def test_aggressive_cases(text: str, leaked: str) -> None:
    assert leaked not in redact(text)


# --------------------------------------------------------------------------- formats


def test_json_lines_parse(configure: Setup) -> None:
    out = configure("json")
    log.info("one %s", "a", extra={"room": ROOM_ID})
    log.warning("two\nlines")
    logging.getLogger("other").error("three")
    lines = out.getvalue().splitlines()
    assert len(lines) == 3
    records = [json.loads(line) for line in lines]
    assert records[0]["msg"] == "one a" and records[0]["room"] == ROOM_ID
    assert records[0]["level"] == "INFO" and records[0]["logger"] == "civic.test"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", records[0]["ts"])
    assert records[1]["msg"] == "two\nlines"
    assert records[2]["logger"] == "other"


def test_text_format(configure: Setup) -> None:
    out = configure("text", level="INFO")
    log.debug("hidden")
    log.info("shown %d", 5, extra={"room": ROOM_ID})
    text = out.getvalue()
    assert "hidden" not in text
    assert re.fullmatch(
        rf"\S+Z INFO civic\.test: shown 5 room=\"{re.escape(ROOM_ID)}\"\n", text
    )


def test_setup_is_idempotent_and_caps_noisy_libraries(configure: Setup) -> None:
    configure()
    out = configure()
    root = logging.getLogger()
    ours = [h for h in root.handlers if any(isinstance(f, RedactingFilter) for f in h.filters)]
    assert len(ours) == 1
    log.info("once")
    assert out.getvalue().count("once") == 1
    assert logging.getLogger("nio").getEffectiveLevel() == logging.WARNING


# --------------------------------------------------------------------------- never raises


class Unprintable:
    def __str__(self) -> str:
        raise RuntimeError("no")

    __repr__ = __str__


@pytest.mark.parametrize(
    ("msg", "args"),
    [("%s %s", ("only one",)), ("%d", ("not a number",)), ("%(x)s", ("no mapping",)),
     ("no placeholders", (PHONE,)), (Unprintable(), ()), ("%s", (Unprintable(),)),
     ({"wa_id": "34600112233"}, ())],
)
def test_filter_never_raises(configure: Setup, capsys: pytest.CaptureFixture[str],
                             msg: Any, args: tuple[Any, ...]) -> None:
    out = configure()
    log.info(msg, *args)
    text = out.getvalue()
    assert text.count("\n") == 1  # the line was not lost
    assert_clean(text)
    assert "Logging error" not in capsys.readouterr().err


def test_filter_on_bare_record() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "to %s %s", (PHONE,), None)
    assert RedactingFilter().filter(record) is True
    assert record.args == ()
    assert "bad log args" in record.msg and PHONE_DIGITS not in without_separators(record.msg)


@settings(max_examples=200)
@given(st.text(), st.lists(st.one_of(st.text(), st.integers(), st.none(), st.binary())))
def test_filter_never_raises_on_arbitrary_input(msg: str, args: list[object]) -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, msg, tuple(args), None)
    assert RedactingFilter([SECRET]).filter(record) is True
    assert isinstance(record.msg, str) and record.args == ()


phones = st.builds(
    lambda cc, digits, seps: cc + "".join(d + s for d, s in zip(digits, seps, strict=False)),
    st.sampled_from(["", "+34 ", "+34", "0034 ", "(+34) "]),
    st.from_regex(r"[6-9][0-9]{8}", fullmatch=True),
    st.lists(st.sampled_from(["", "", " ", "-", "."]), min_size=9, max_size=9),
)
words = st.text(alphabet="abcdefghijklmnopqrstuvwxyz ,:;=/", max_size=20)


@given(words, phones, words)
def test_phone_numbers_in_any_text_are_redacted(before: str, phone: str, after: str) -> None:
    out = redact(before + " " + phone + " " + after)
    digits = re.sub(r"[^0-9]", "", phone)[-9:]
    assert digits not in re.sub(r"[^0-9]", "", out)


def test_redaction_is_fast_and_linear() -> None:
    nasty = ["1 " * 20_000, "a-" * 20_000, "token" * 8_000, '"wa_id": "' + "a" * 40_000,
             "$" + "a" * 40_000, "AB." + "1" * 40_000, "2026-11-27" * 4_000, "(" * 40_000]
    start = time.perf_counter()
    for text in nasty:
        redact(text)
    assert time.perf_counter() - start < 3.0


# One number, written the ways people and systems write it. Each must leave no run of
# its digits in the redacted line (the separators the review found missing: / _ · ,;
# the en and em dashes and the non-breaking hyphen only `phonenumbers` knows).
PHONE_CORPUS = [
    "600112233", "600 112 233", "600-11-22-33", "600.11.22.33", "(600) 112 233",
    "+34 600 112 233", "+34600112233", "0034 600 112 233", "(+34) 600-112-233",
    "600/11/22/33", "600_112_233", "600·11·22·33", "600,112,233", "600 / 112 / 233",
    "+34/600/112/233", "+34_600_112_233", "+34·600·11·22·33", "0034,600,112,233",
    "600 · 112 · 233", "600, 112, 233", "34 600/112/233",
    "600\u2013112\u2013233", "600\u2014112\u2014233", "600\u2011112\u2011233",
    "+34\u00a0600\u00a0112\u00a0233", "tel:+34-600-112-233", "wa.me/34600112233",
    "\uff16\uff10\uff10\uff11\uff11\uff12\uff12\uff13\uff13",
]


@pytest.mark.parametrize("phone", PHONE_CORPUS)
@pytest.mark.parametrize("frame", ["{}", "llame al {} por favor", "número: {}.",
                                   '{{"texto": "{}"}}', "({})"])
def test_phone_corpus_is_redacted(phone: str, frame: str) -> None:
    out = redact(frame.format(phone))
    digits = re.sub(r"\D", "", unicodedata.normalize("NFKC", out))
    assert "112" not in digits and "233" not in digits, out


# --------------------------------------------------------------------------- shutdown


def test_a_rollback_cut_short_by_shutdown_is_one_line_not_an_error(configure: Setup) -> None:
    # Shutdown cancels tasks; one cancelled while its session rolls back makes
    # SQLAlchemy's pool log "Exception during reset" with a traceback, at ERROR. The
    # connection is discarded and the transaction was never committed: nothing is lost.
    out = configure()
    pool_log = logging.getLogger("sqlalchemy.pool.impl.AsyncAdaptedQueuePool")
    try:
        raise asyncio.CancelledError()
    except asyncio.CancelledError:
        pool_log.error("Exception during reset or similar", exc_info=True)
    try:
        raise OSError("disk I/O error")
    except OSError:
        pool_log.error("Exception during reset or similar", exc_info=True)
    lines = out.getvalue().splitlines()
    assert "INFO" in lines[0] and "interrupted by shutdown" in lines[0]
    assert out.getvalue().count("Traceback") == 1  # the real failure keeps its own
    assert "ERROR" in lines[1] and "OSError: disk I/O error" in out.getvalue()
