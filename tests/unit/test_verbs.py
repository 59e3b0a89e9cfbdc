"""The admin verbs are declared once (bridge.admin.verbs) and every surface matches the
registry: the HTTP route table, the CLI parser and its requests, the management-room
parser, its help and its replies. A verb added to one surface only fails here."""

from __future__ import annotations

import argparse
import re
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from bridge.admin.auth import scope_of
from bridge.admin.cli import request_for
from bridge.admin.verbs import BY_NAME, VERBS, WORDS, Call, Verb, call_of, said
from bridge.app import make_admin_app, make_app
from bridge.cli import build_parser
from bridge.config import ADMIN_SCOPES, parse_config
from bridge.matrix.management import Command, help_text, parse
from tests.unit.test_config import valid

ROOM = "!AbC:agency.example"
USER = "@ana:agency.example"
EVENT = "$Ev3nt"
SAMPLE = {"room_id": ROOM, "user_id": USER, "event_id": EVENT, "report_id": "12",
          "citizen": "KQTR-MWXZ-BCDF"}
# Command lines for the CLI commands written by hand (one per verb that has a CLI word
# but no generic parser): a new hand-written command needs its line here.
BESPOKE_CLI: dict[str, list[str]] = {
    "rooms": ["rooms", "list"],
    "rooms.create": ["rooms", "create", "Equipo", "--kind", "team"],
    "link": ["link", ROOM, "--uses", "2"],
    "audit": ["audit", "list"],
    "audit.verify": ["audit", "verify"],
    "report": ["reports", "act", "12", "ban", "--reason", "spam"],
    "reports": ["reports", "list"],
    "keys": ["keys"],
    "template": ["template", ROOM, "aviso", "x=1"],
    "citizen.export": ["citizen", "export", USER, "--reason", "acceso"],
    "citizen.export-by-phone": ["citizen", "export", "--phone", "600112233",
                                "--reason", "acceso 2026/1"],
    "citizen.erase": ["citizen", "erase", USER, "--reason", "supresión"],
    "citizen.erase-by-phone": ["citizen", "erase", "--phone", "600112233",
                               "--reason", "supresión 2026/1"],
    "lookup": ["lookup", "600112233", "--reason", "acceso 2026/1"],
    "reveal": ["reveal", USER, "--reason", "oficio juzgado 12/2026"],
    "notice.send": ["notice", "send", "ABCD-EFGH", "NOT-1"],
    "notice.withdraw": ["notice", "withdraw", "ABCD-EFGH", "--staff-id", USER,
                        "--evidence", "RE-1"],
    "notice.list": ["notice", "list"],
    "dead-letters": ["dead-letters"],
    "dead-letters.settle": ["dead-letters", "retry", "in-1", "--reason", "arreglado"],
}
# The management room's answers (a contract: admins and their scripts read them).
REPLIES: dict[str, tuple[Any, str]] = {
    "invite": ({}, f"Invited {USER}."),
    "kick": ({}, f"Done: kick {USER}."),
    "ban": ({}, f"Done: ban {USER}."),
    "unban": ({}, f"Done: unban {USER}."),
    "mute": ({}, f"Muted {USER}."),
    "unmute": ({}, f"Unmuted {USER}."),
    "redact": ({"event_id": "$r"}, f"Redacted {EVENT}."),
    "approve": ({}, f"Approved {USER}'s knock."),
    "deny": ({}, f"Denied {USER}'s knock."),
    "close": ({"removed": 3}, f"Closed {ROOM}; 3 member(s) removed."),
    "announce": ({"event_id": "$a"}, f"Announcement posted in {ROOM}."),
    "rooms": ([{"room_id": ROOM, "kind": "team", "name": "Equipo", "topic": None}],
              f"Rooms:\n• Equipo (team) — {ROOM}"),
    "members": ([{"user_id": USER, "display_name": None, "kind": "staff",
                  "membership": "join", "power": 50, "role": "moderator"}],
                f"Members of {ROOM}:\n• (no name) — moderator, staff, join — {USER}"),
}


def canonical(path: str) -> str:
    """aiohttp's canonical form of a route path: `{name:regex}` -> `{name}`."""
    return re.sub(r"\{(\w+):[^}]*\}", r"{\1}", path)


def admin_app() -> web.Application:
    return make_admin_app(make_app(parse_config(valid())))


def route_table(app: web.Application) -> dict[tuple[str, str], str | None]:
    return {(r.method, r.resource.canonical): scope_of(r.handler)
            for r in app.router.routes()
            if r.resource is not None and r.resource.canonical.startswith("/admin/")
            and r.method != "HEAD"}


def declared_routes(verbs: tuple[Verb, ...]) -> dict[tuple[str, str], str | None]:
    return {(v.http[0], canonical(v.http[1])): v.scope for v in verbs if v.http is not None}


def test_the_registry_is_consistent() -> None:
    assert len(BY_NAME) == len(VERBS)  # names are unique
    words = [w for v in VERBS if v.in_room for w in (v.name, *v.aliases)]
    assert len(words) == len(set(words)) == len(WORDS)  # no word means two verbs
    routes = [v.http for v in VERBS if v.http is not None]
    assert len(routes) == len(set(routes))
    for verb in VERBS:
        assert (verb.http is None) == (verb.scope is None), verb.name
        assert verb.scope is None or verb.scope in ADMIN_SCOPES, verb.name
        assert (verb.run is None) == (verb.reply is None), verb.name  # both or neither
        if verb.run is not None:  # a generic verb is reachable over HTTP
            assert verb.http is not None, verb.name
        for arg in verb.args:
            if verb.http is not None and arg.key in ("room_id", "report_id"):
                assert verb.in_path(arg), f"{verb.name}: {arg.key} belongs in the path"


def test_the_route_table_is_the_registry() -> None:
    """Each admin route is a declared verb's, under its scope, and each declared route
    exists: a route added outside the registry (or a declaration without its route)
    fails."""
    assert route_table(admin_app()) == declared_routes(VERBS)


def test_the_comparison_sees_a_verb_declared_but_not_routed() -> None:
    extra = Verb("frobnicate", "rooms", ("POST", "/admin/v1/rooms/{room_id}/frobnicate"))
    assert route_table(admin_app()) != declared_routes((*VERBS, extra))


def _admin_commands() -> argparse._SubParsersAction[argparse.ArgumentParser]:
    parser = build_parser()
    top = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    admin = top.choices["admin"]
    return next(a for a in admin._actions if isinstance(a, argparse._SubParsersAction))


def test_the_cli_commands_are_the_registrys() -> None:
    assert set(_admin_commands().choices) == {v.cli for v in VERBS if v.cli is not None}


def _generic_argv(verb: Verb) -> list[str]:
    argv = [str(verb.cli), *(SAMPLE[a.key] for a in verb.args)]
    if verb.text:
        argv.append("Corte de agua")
    if verb.reason != "none":
        argv += ["--reason", "motivo"]
    if verb.confirm:
        argv.append("--confirm")
    return argv


def _generic_cli(verb: Verb) -> bool:
    """The verb's CLI command is built from its declaration."""
    return (verb.cli is not None
            and _admin_commands().choices[verb.cli].get_default("admin_verb") is verb)


def _argv(verb: Verb) -> list[str]:
    if _generic_cli(verb):
        return _generic_argv(verb)
    assert verb.name in BESPOKE_CLI, f"{verb.name}: a hand-written CLI command needs a " \
                                     "sample line in BESPOKE_CLI"
    return BESPOKE_CLI[verb.name]


@pytest.mark.parametrize("verb", [v for v in VERBS if v.cli is not None], ids=lambda v: v.name)
async def test_each_cli_command_calls_its_verbs_route(verb: Verb) -> None:
    """The CLI accepts the verb and its request lands on the verb's route, with the body
    the route reads."""
    args = build_parser().parse_args(["admin", "-c", "config.yaml", *_argv(verb)])
    method, path, body = request_for(args)
    app = admin_app()
    match = await app.router.resolve(make_mocked_request(method, path, app=app))
    assert match.http_exception is None, f"{verb.name}: {method} {path} has no route"
    assert verb.http is not None
    assert (match.route.method, match.route.resource.canonical) == (  # type: ignore[union-attr]
        verb.http[0], canonical(verb.http[1]))
    if getattr(args, "admin_verb", None) is verb:
        expected: dict[str, Any] = {a.key: SAMPLE[a.key] for a in verb.args
                                    if not verb.in_path(a)}
        expected.update({"body": "Corte de agua"} if verb.text else {})
        expected.update({"reason": "motivo"} if verb.reason != "none" else {})
        expected.update({"confirm": True} if verb.confirm else {})
        assert (body or {}) == expected
        assert dict(match) == {a.key: SAMPLE[a.key] for a in verb.args if verb.in_path(a)}


def _message(verb: Verb, word: str) -> str:
    parts = [word, *(SAMPLE[a.key] for a in verb.args)]
    if verb.name == "report":
        parts.append("vetar insultos")
    elif verb.rest:
        parts.append("un motivo")
    return " ".join(parts)


@pytest.mark.parametrize(("word", "verb"), sorted(WORDS.items()), ids=lambda x: str(x)[:20])
def test_each_management_word_maps_to_its_verb(word: str, verb: Verb) -> None:
    for written in (word, "!" + word, word.upper()):
        command = parse(_message(verb, written))
        assert command.name == verb.name
        assert (command.room_id, command.user_id, command.event_id) == tuple(
            SAMPLE[k] if any(a.key == k for a in verb.args) else None
            for k in ("room_id", "user_id", "event_id"))
    assert f"\n  {verb.usage}" in help_text()


def test_every_management_command_is_in_the_help_in_order() -> None:
    lines = help_text().split("\n")[1:-1]
    assert [line.split()[0] for line in lines] == [v.name for v in VERBS if v.in_room]


@pytest.mark.parametrize("verb", [v for v in VERBS if v.reply is not None], ids=lambda v: v.name)
def test_management_replies(verb: Verb) -> None:
    assert verb.name in REPLIES, f"{verb.name}: its reply needs a row in REPLIES"
    result, text = REPLIES[verb.name]
    command = parse(_message(verb, verb.name)) if verb.in_room else Command(verb.name)
    call = Call(room_id=str(command.room_id or ""), user_id=str(command.user_id or ""),
                event_id=str(command.event_id or ""))
    assert verb.reply is not None and verb.reply(call, result) == text


def test_reason_policy_is_the_same_in_the_cli_and_the_room() -> None:
    for verb in VERBS:
        if not _generic_cli(verb) or not verb.in_room:
            continue
        argv = [a for a in _generic_argv(verb) if a not in ("--reason", "motivo")]
        parser = build_parser()
        if verb.reason == "required":
            with pytest.raises(SystemExit):
                parser.parse_args(["admin", *argv])
            assert verb.rest == "required"
        else:
            parser.parse_args(["admin", *argv])


def test_an_argument_of_a_new_kind_reaches_the_handler_and_the_reply() -> None:
    """A verb declared later with its own kind of argument (say a citizen's subscription
    code) needs no change to Call or to the replies."""
    call = call_of({"room_id": ROOM, "citizen": "ABCD-EFGH"}, reason="alta")
    assert (call.arg("room_id"), call.arg("citizen"), call.arg("user_id")) == (
        ROOM, "ABCD-EFGH", "")
    assert said("Added {citizen} to {room}.")(call, {"n": 1}) == f"Added ABCD-EFGH to {ROOM}."
