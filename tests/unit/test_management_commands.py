"""The management-room command parser (sans-I/O) and the executor's confirmation logic."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge.matrix.management import Command, CommandError, help_text, parse

ROOM = "!AbCdEf0123456789_-abcdefghijklmnopqrstuvwxyz"
OLD_ROOM = "!abc:agency.example"
USER = "@ana:agency.example"
EVENT = "$Ev3nt_-abc"


@pytest.mark.parametrize(("text", "expected"), [
    ("help", Command("help")),
    ("  HELP  ", Command("help")),
    ("!help", Command("help")),
    ("ayuda", Command("help")),
    ("rooms", Command("rooms")),
    (f"members {ROOM}", Command("members", room_id=ROOM)),  # type: ignore[arg-type]
    (f"invite {OLD_ROOM} {USER}", Command("invite", room_id=OLD_ROOM,  # type: ignore[arg-type]
                                          user_id=USER)),  # type: ignore[arg-type]
    (f"invite {ROOM} {USER} refuerzo de verano",
     Command("invite", room_id=ROOM, user_id=USER,  # type: ignore[arg-type]
             text="refuerzo de verano")),
    (f"kick {ROOM} {USER} insultos reiterados",
     Command("kick", room_id=ROOM, user_id=USER,  # type: ignore[arg-type]
             text="insultos reiterados")),
    (f"Ban {ROOM} {USER} spam", Command("ban", room_id=ROOM, user_id=USER,  # type: ignore[arg-type]
                                        text="spam")),
    (f"redact {ROOM} {EVENT} dato personal",
     Command("redact", room_id=ROOM, event_id=EVENT,  # type: ignore[arg-type]
             text="dato personal")),
    (f"approve {ROOM} {USER}", Command("approve", room_id=ROOM,  # type: ignore[arg-type]
                                       user_id=USER)),  # type: ignore[arg-type]
    (f"close {ROOM} fin del proceso", Command("close", room_id=ROOM,  # type: ignore[arg-type]
                                              text="fin del proceso")),
    (f"announce {ROOM} Corte de agua\nmañana de 9 a 11",
     Command("announce", room_id=ROOM,  # type: ignore[arg-type]
             text="Corte de agua\nmañana de 9 a 11")),
    (f"link {ROOM}", Command("link", room_id=ROOM)),  # type: ignore[arg-type]
    (f"link {ROOM} uses=5 hours=48", Command("link", room_id=ROOM,  # type: ignore[arg-type]
                                             uses=5, hours=48)),
    (f"enlace {ROOM} horas=2 usos=1", Command("link", room_id=ROOM,  # type: ignore[arg-type]
                                              uses=1, hours=2)),
    ("audit", Command("audit", limit=10)),
    ("audit 3", Command("audit", limit=3)),
    ("confirm", Command("confirm")),
    ("cancelar", Command("cancel")),
    # A WhatsApp citizen into an agency room: by portal ghost or subscription code.
    (f"whatsapp {ROOM} KQTR-MWXZ-BCDF", Command(
        "whatsapp-members.add", room_id=ROOM,  # type: ignore[arg-type]
        extra=(("citizen", "KQTR-MWXZ-BCDF"),))),
    (f"invitar-whatsapp {ROOM} @wa_qwertyuiopasdfgh:agency.example", Command(
        "whatsapp-members.add", room_id=ROOM,  # type: ignore[arg-type]
        extra=(("citizen", "@wa_qwertyuiopasdfgh:agency.example"),))),
])
def test_valid_commands(text: str, expected: Command) -> None:
    assert parse(text) == expected


def test_ids_pasted_as_links_or_code() -> None:
    link = f"https://matrix.to/#/{USER.replace('@', '%40').replace(':', '%3A')}?via=x"
    assert parse(f"kick `{ROOM}` {link} spam").user_id == USER
    assert parse(f"kick {ROOM} <{USER}> spam").user_id == USER


def test_reply_fallback_is_skipped() -> None:
    body = f"> <@cb_bot:agency.example> Room 'X' has 30 members\n\nkick {ROOM} {USER} spam"
    assert parse(body) == Command("kick", room_id=ROOM, user_id=USER,  # type: ignore[arg-type]
                                  text="spam")


@pytest.mark.parametrize(("text", "message"), [
    ("", "unknown command `(empty)`"),
    ("frobnicate", "unknown command `frobnicate`"),
    ("kick", "missing a room ID"),
    (f"kick {ROOM}", "missing a user ID"),
    (f"kick {ROOM} {USER}", "missing reason"),
    (f"kick room {USER} x", "`room` is not a room ID"),
    (f"kick {ROOM} ana x", "`ana` is not a user ID"),
    (f"redact {ROOM} event x", "`event` is not an event ID"),
    (f"deny {ROOM} {USER}", "missing reason"),
    (f"close {ROOM}", "missing reason"),
    (f"announce {ROOM}", "missing text"),
    (f"members {ROOM} extra", "unexpected `extra`"),
    ("help me", "unexpected `me`"),
    (f"link {ROOM} uses=0", "uses must be a whole number from 1 to 1000"),
    (f"link {ROOM} uses=five", "uses must be"),
    (f"link {ROOM} hours=9999", "hours must be a whole number from 1 to 720"),
    (f"link {ROOM} uses=1 uses=2", "unexpected `uses=2`"),
    (f"link {ROOM} forever", "unexpected `forever`"),
    ("audit 0", "N must be"),
    ("audit ١٢", "N must be"),  # non-ASCII digits
    (f"whatsapp {ROOM}", "missing a citizen's portal ghost"),
    (f"whatsapp {ROOM} 600112233", "`600112233` is not a citizen's portal ghost"),
])
def test_invalid_commands_say_why(text: str, message: str) -> None:
    with pytest.raises(CommandError) as err:
        parse(text)
    assert message in str(err.value)


def test_help_lists_every_command() -> None:
    text = help_text()
    for verb in ("help", "rooms", "members", "invite", "link", "kick", "ban", "unban", "mute",
                 "unmute", "redact", "approve", "deny", "close", "announce", "audit",
                 "confirm", "cancel"):
        assert f"\n  {verb}" in text, verb


@given(st.text(max_size=300))
def test_any_text_parses_or_fails_cleanly(text: str) -> None:
    try:
        cmd = parse(text)
    except CommandError as exc:
        assert "\n" not in str(exc)
        assert len(str(exc)) < 300
        return
    # Whatever parses carries well-formed IDs only.
    assert cmd.room_id is None or cmd.room_id.startswith("!")
    assert cmd.user_id is None or (cmd.user_id.startswith("@") and ":" in cmd.user_id)
    assert cmd.event_id is None or cmd.event_id.startswith("$")
    assert not cmd.confirm


@given(st.sampled_from(["kick", "ban", "unban", "mute", "unmute"]),
       st.text(min_size=1, max_size=80).filter(lambda s: s.strip() != ""))
def test_reason_is_the_rest_of_the_message(verb: str, reason: str) -> None:
    cmd = parse(f"{verb} {ROOM} {USER} {reason}")
    assert cmd.text == reason.strip()
    assert (cmd.name, cmd.room_id, cmd.user_id) == (verb, ROOM, USER)
