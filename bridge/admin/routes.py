"""HTTP routes of the admin API (`/admin/v1`, Bearer token with scopes).

Routes parse and answer; the logic is in AdminService, Moderation and InviteLinks.
Each route's method, path and scope come from its verb in bridge.admin.verbs: the verbs
with a handler there get a generic route (`_verb_handler`), the others are written here
under `@verb_route(name)`. The scope is declared with `@requires` (bridge.admin.auth
checks it); the actor recorded in the audit log is the token's name, `api:<name>` (see
`actor`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from bridge.admin.auth import actor, principal, requires
from bridge.admin.checks import reason as checked_reason
from bridge.admin.notices import LABEL
from bridge.admin.reidentify import Reidentification
from bridge.admin.verbs import BY_NAME, VERBS, Verb, call_of
from bridge.db.reports import REPORT_STATUSES
from bridge.errors import BadRequest, InvalidParam, NotFound, Unavailable
from bridge.invites.service import parse_expires_in
from bridge.moderation.reports import Reports
from bridge.services import Bridge
from bridge.web.state import BRIDGE

routes = web.RouteTableDef()
MAX_AUDIT_PAGE = 1000


def _bridge(request: web.Request) -> Bridge:
    # The token and its scope were checked by bridge.admin.auth.admin_auth.
    bridge: Bridge = request.app[BRIDGE]
    return bridge


async def json_object(request: web.Request) -> dict[str, Any]:
    """The request's JSON object body (`{}` when empty); 400 for anything else."""
    try:
        body = json.loads(await request.read() or b"{}")
    except ValueError:
        raise BadRequest("body is not JSON") from None
    if not isinstance(body, dict):
        raise BadRequest("body must be a JSON object")
    return body


async def _body(request: web.Request) -> tuple[Bridge, dict[str, Any]]:
    return _bridge(request), await json_object(request)


def _str(body: dict[str, Any], key: str, required: bool = True) -> str | None:
    value = body.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str):
        raise InvalidParam(f"{key}: must be a string")
    return value


def _bool(body: dict[str, Any], key: str) -> bool:
    value = body.get(key, False)
    if not isinstance(value, bool):
        raise InvalidParam(f"{key}: must be true or false")
    return value


def _int(value: Any, key: str, default: int) -> int:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidParam(f"{key}: must be a whole number")
    return value


def _room(request: web.Request) -> str:
    return request.match_info["room_id"]


def verb_route(name: str) -> Callable[[Handler], Handler]:
    """Register a hand-written handler under its verb's method, path and scope."""
    verb = BY_NAME[name]
    if verb.http is None or verb.scope is None:
        raise ValueError(f"verb {name} has no HTTP route")
    method, path = verb.http
    scope = verb.scope

    def register(handler: Handler) -> Handler:
        routes.route(method, path)(requires(scope)(handler))
        return handler

    return register


def _verb_handler(verb: Verb) -> Handler:
    """The route of a verb declared with its handler: arguments from the path or the JSON
    body (strings), then `body` (a text), `reason` and `confirm` as the verb takes them."""
    assert verb.http is not None and verb.run is not None and verb.scope is not None
    run, method = verb.run, verb.http[0]

    async def handler(request: web.Request) -> web.Response:
        bridge, body = (_bridge(request), {}) if method == "GET" else await _body(request)
        values = {a.key: request.match_info[a.key] if verb.in_path(a) else _str(body, a.key)
                  or "" for a in verb.args}
        call = call_of(values,
                       text=(_str(body, "body") or "") if verb.text else "",
                       reason=_str(body, "reason", False) if verb.reason != "none" else None,
                       confirm=_bool(body, "confirm") if verb.confirm else False)
        return web.json_response(await run(bridge, actor(request), call), status=verb.status)

    handler.__name__ = verb.name
    return requires(verb.scope)(handler)


for _verb in VERBS:
    if _verb.run is not None and _verb.http is not None:
        routes.route(*_verb.http)(_verb_handler(_verb))


@verb_route("rooms.create")
async def create_room(request: web.Request) -> web.Response:
    bridge, body = await _body(request)
    room_id = await bridge.admin.create_room(
        actor(request), _str(body, "name") or "", _str(body, "kind") or "",
        _str(body, "topic", False), _str(body, "join_rule", False) or "invite")
    return web.json_response({"room_id": room_id}, status=201)


@verb_route("link")
async def invite_link(request: web.Request) -> web.Response:
    bridge, body = await _body(request)
    link = await bridge.invites.create(actor(request), _room(request),
                                       _int(body.get("uses"), "uses", 1),
                                       parse_expires_in(body.get("expires_in")),
                                       _bool(body, "confirm"))
    return web.json_response({"url": link.url, "uses": link.uses,
                              "expires_at": link.expires_at.isoformat()}, status=201)


def _query_int(request: web.Request, key: str, default: int | None) -> int | None:
    raw = request.query.get(key)
    if raw is None:
        return default
    if not raw.isdigit():
        raise InvalidParam(f"{key}: must be a positive whole number")
    return int(raw)


async def _chain(bridge: Bridge) -> dict[str, Any]:
    intact, first_bad = await bridge.db.audit.verify()
    return {"intact": intact, "first_bad_id": first_bad}


@verb_route("audit")
async def audit(request: web.Request) -> web.Response:
    """Entries newest first (`limit`, `before` = an id to page back from) and the chain check."""
    bridge = _bridge(request)
    limit = min(_query_int(request, "limit", 100) or 100, MAX_AUDIT_PAGE)
    entries = await bridge.db.audit.list(limit=limit, before_id=_query_int(request, "before",
                                                                            None))
    return web.json_response({
        "entries": [{"id": x.id, "at": x.at.isoformat(), "actor": x.actor, "action": x.action,
                     "object": x.object, "result": x.result, "reason": x.reason,
                     "prev_hash": x.prev_hash, "hash": x.hash} for x in entries],
        "next_before": entries[-1].id if len(entries) == limit else None,
        "chain": await _chain(bridge),
    })


@verb_route("audit.verify")
async def audit_verify(request: web.Request) -> web.Response:
    return web.json_response(await _chain(_bridge(request)))


@verb_route("citizen.export")
async def export_citizen(request: web.Request) -> web.Response:
    """Everything held about one person, for that person (GDPR art. 15/20): a citizen
    by ghost Matrix ID, pseudonym or subscription code, or an invite-link account by its
    Matrix ID.

    It re-identifies the person, so `?reason=` is required and recorded in the audit log.
    """
    bridge = _bridge(request)
    reason = request.query.get("reason", "").strip()
    if not reason:
        raise InvalidParam("reason: required (recorded in the audit log), e.g. "
                           "?reason=solicitud%20de%20acceso%202026-17")
    data = await bridge.citizens.export(request.match_info["user_id"], actor(request), reason)
    return web.json_response(data, headers={"Cache-Control": "no-store"})


def _reidentification(bridge: Bridge) -> Reidentification:
    if bridge.reidentify is None:
        raise Unavailable("re-identification is not wired in this process")
    return bridge.reidentify


@verb_route("reveal")
async def reveal_citizen(request: web.Request) -> web.Response:
    """`{reason}` → the citizen's phone number / BSUID. Audited (by pseudonym, with the
    reason), rate-limited per token (admin.reveal_per_hour)."""
    bridge, body = await _body(request)
    who = principal(request)
    data = await _reidentification(bridge).reveal(
        who.actor, who.name, request.match_info["user_id"], body.get("reason"))
    return web.json_response(data, headers={"Cache-Control": "no-store"})


@verb_route("lookup")
async def lookup_citizen(request: web.Request) -> web.Response:
    """`{phone, reason}` → the person's pseudonyms (for a rights request); 404 if none."""
    bridge, body = await _body(request)
    data = await _reidentification(bridge).lookup(actor(request), body.get("phone"),
                                                  body.get("reason"))
    return web.json_response(data, headers={"Cache-Control": "no-store"})


@verb_route("citizen.export-by-phone")
async def export_by_phone(request: web.Request) -> web.Response:
    """`{phone, reason}` → `{citizens: [export, ...]}`: every record the bridge holds
    under that number (a rights request at the desk). The number travels in the body,
    never in a URL; it is found as the look-up finds it, audited the same way."""
    bridge, body = await _body(request)
    data = await bridge.citizens.export_by_phone(actor(request), body.get("phone"),
                                                 body.get("reason"))
    return web.json_response(data, headers={"Cache-Control": "no-store"})


@verb_route("citizen.erase-by-phone")
async def erase_by_phone(request: web.Request) -> web.Response:
    """`{phone, reason}` → `{erased: [...]}`: erase every citizen with that number."""
    bridge, body = await _body(request)
    return web.json_response(await bridge.citizens.erase_by_phone(
        actor(request), body.get("phone"), body.get("reason")))


@verb_route("citizen.erase")
async def erase_citizen(request: web.Request) -> web.Response:
    """Erase one person (GDPR art. 17), named as for the export; body `{reason?}`,
    recorded in the audit log. An invite-link account is deactivated and erased on the
    homeserver (needs moderation.synapse_admin_token, else 503 and nothing is done)."""
    bridge, body = await _body(request)
    reason = _str(body, "reason", required=False)
    return web.json_response(await bridge.citizens.erase(request.match_info["user_id"],
                                                         actor(request), reason))


@verb_route("notice.send")
async def send_notice(request: web.Request) -> web.Response:
    """`{recipient, reference}` → 202 with the new log entry, 200 with the existing one."""
    bridge, body = await _body(request)
    entry, created = await bridge.notices.send(actor(request), body)
    return web.json_response(entry, status=202 if created else 200)


@verb_route("notice.withdraw")
async def withdraw_notices(request: web.Request) -> web.Response:
    """`{recipient, staff_id, evidence}`: the citizen withdrew notices consent in person."""
    bridge, body = await _body(request)
    return web.json_response(await bridge.notices.withdraw(actor(request), body))


@verb_route("notice.list")
async def list_notices(request: web.Request) -> web.Response:
    """The notice log, newest first (`reference`, `recipient`, `limit`)."""
    bridge = _bridge(request)
    limit = min(_query_int(request, "limit", 100) or 100, MAX_AUDIT_PAGE)
    entries = await bridge.notices.entries(request.query.get("reference"),
                                           request.query.get("recipient"), limit)
    return web.json_response({"notices": entries, "label": LABEL})


@verb_route("keys")
async def keys(request: web.Request) -> web.Response:
    """Master-key fingerprints of the bot and the ghosts (to verify the bridge once)."""
    bridge = _bridge(request)
    return web.json_response([{"user_id": u, "kind": k, "master_key": f}
                              for u, k, f in await bridge.trust.fingerprints()])


@verb_route("template")
async def send_template(request: web.Request) -> web.Response:
    """`{name, parameters}` (parameters by name, or a list in order) → 202 with the text
    the citizen will read; 400 for bad parameters, 404 for no such portal or template,
    409 without consent. Audited; sent through the outbox; the room gets a notice."""
    bridge, body = await _body(request)
    if bridge.templates is None:
        raise Unavailable("WhatsApp is off (whatsapp.enabled)")
    for key in body:
        if key not in ("name", "parameters"):
            raise InvalidParam(f"{str(key)[:40]}: unknown field; only name and parameters")
    name = _str(body, "name") or ""
    result = await bridge.templates.send_api(actor(request), _room(request), name,
                                             body.get("parameters"))
    return web.json_response(result, status=202 if result["queued"] else 200)


@verb_route("dead-letters")
async def dead_letters(request: web.Request) -> web.Response:
    """Items set aside after a permanent failure (bridge.deadletters): ids, source, lane
    kind, reason class, failure times and attempts; never a payload or a person."""
    bridge = _bridge(request)
    return web.json_response({"dead_letters": await bridge.dead_letters.list()})


@verb_route("dead-letters.settle")
async def settle_dead_letter(request: web.Request) -> web.Response:
    """`{reason}` (required, audited): retry (back to its queue) or discard it."""
    bridge, body = await _body(request)
    why = checked_reason(_str(body, "reason", required=False)) or ""
    letter_id = request.match_info["id"]
    if request.match_info["action"] == "retry":
        return web.json_response(await bridge.dead_letters.retry(actor(request), letter_id,
                                                                 why))
    return web.json_response(await bridge.dead_letters.discard(actor(request), letter_id, why))


def _reports(bridge: Bridge) -> Reports:
    if bridge.safety is None:
        raise NotFound("reports are not available")
    return bridge.safety.reports


@verb_route("reports")
async def list_reports(request: web.Request) -> web.Response:
    """Reports and flags, newest first (`status=open`, `limit`): pseudonymous IDs and
    states only; the reasons are shown in the management room, never here."""
    bridge = _bridge(request)
    status = request.query.get("status")
    if status is not None and status not in REPORT_STATUSES:
        raise InvalidParam(f"status: one of {', '.join(REPORT_STATUSES)}")
    limit = min(_query_int(request, "limit", 100) or 100, MAX_AUDIT_PAGE)
    return web.json_response({"reports": await _reports(bridge).listing(status, limit)})


@verb_route("report")
async def act_on_report(request: web.Request) -> web.Response:
    """redact, mute, kick, ban or dismiss; body `{reason?}` (added to the audit)."""
    bridge, body = await _body(request)
    raw = request.match_info["report_id"]
    if not raw.isdigit():
        raise InvalidParam("report id: must be a whole number")
    done = await _reports(bridge).act(actor(request), int(raw), request.match_info["action"],
                                      _str(body, "reason", False))
    return web.json_response(done)
