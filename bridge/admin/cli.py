"""`civic-bridge admin ...`: the admin HTTP API from the command line.

It reads the bridge's config for the admin token (admin.token, or the admin.tokens
entry --token-name NAME) and the address (override with --url or
$CIVIC_BRIDGE_ADMIN_URL); --as @user:domain records who acts in the audit log. It
prints readable tables (or the raw JSON with --json). Exit codes: 0 done; 1 the bridge
refused; 2 usage or config error; 3 bridge unreachable; 4 the audit chain is broken;
5 confirmation required (repeat with --confirm).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote

import aiohttp

from bridge.config import ADMIN_ACTOR_HEADER, LEGACY_TOKEN_NAME, Config, load_config, local_url
from bridge.errors import ConfigError

EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_TAMPERED, EXIT_CONFIRM = range(6)
URL_ENV = "CIVIC_BRIDGE_ADMIN_URL"
MEMBER_ACTIONS = ("kick", "ban", "unban", "mute", "unmute")


class UsageError(Exception):
    """A command line the parser accepted but that cannot be called as is."""


class Refused(Exception):
    def __init__(self, status: int, errcode: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.errcode = errcode


def table(rows: Sequence[Sequence[object]], header: Sequence[str]) -> str:
    """A plain-text table, columns padded to their widest cell."""
    cells = [[str(c) for c in header]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
             for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def duration(value: str) -> int:
    """`90m`, `48h`, `2d` or plain seconds -> seconds (argparse type)."""
    match = re.fullmatch(r"(\d+)([smhd]?)", value.strip())
    if not match:
        raise argparse.ArgumentTypeError("use e.g. 3600, 90m, 48h or 7d")
    return int(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]


def base_url(config: Config, override: str | None) -> str:
    """--url, else $CIVIC_BRIDGE_ADMIN_URL, else the admin listener (admin.listen_*)."""
    if override or os.environ.get(URL_ENV):
        return str(override or os.environ[URL_ENV]).rstrip("/")
    return local_url(config.admin.listen_host, config.admin.listen_port)


async def call(url: str, token: str, method: str, path: str,
               body: dict[str, Any] | None = None, acting: str | None = None) -> Any:
    headers = {"Authorization": f"Bearer {token}"}
    if acting:  # recorded next to the token's name in the audit log
        headers[ADMIN_ACTOR_HEADER] = acting
    async with aiohttp.ClientSession() as http, http.request(
            method, url + path, json=body, headers=headers,
            timeout=aiohttp.ClientTimeout(total=120)) as resp:
        try:
            data = await resp.json(content_type=None)
        except ValueError:
            data = None
        if resp.status >= 400:
            data = data if isinstance(data, dict) else {}
            raise Refused(resp.status, str(data.get("errcode", "M_UNKNOWN")),
                          str(data.get("error", f"HTTP {resp.status}")))
        return data


def token_for(config: Config, name: str) -> str | None:
    """The token the CLI calls with: admin.token, or the admin.tokens entry `name`."""
    if name == LEGACY_TOKEN_NAME:
        return config.admin.token
    return next((t.token for t in config.admin.tokens if t.name == name), None)


def _room(room_id: str) -> str:
    return "/admin/v1/rooms/" + quote(room_id, safe="")


def request_for(args: argparse.Namespace) -> tuple[str, str, dict[str, Any] | None]:
    """(method, path, body) of the API call a parsed command line stands for."""
    what = args.admin_command
    if what == "audit":
        if args.audit_command == "verify":
            return "GET", "/admin/v1/audit/verify", None
        if args.audit_command == "anchor":
            return "GET", "/admin/v1/audit?limit=1", None
        query = f"?limit={args.limit}" + (f"&before={args.before}" if args.before else "")
        return "GET", "/admin/v1/audit" + query, None
    if what == "keys":
        return "GET", "/admin/v1/keys", None
    if what == "dead-letters":
        if args.action == "list":
            return "GET", "/admin/v1/dead-letters", None
        if not args.id or not args.reason:
            raise UsageError(f"dead-letters {args.action} needs an ID and --reason")
        return ("POST", f"/admin/v1/dead-letters/{quote(args.id, safe='')}/{args.action}",
                {"reason": args.reason})
    if what == "reports":
        if args.reports_command == "act":
            return "POST", f"/admin/v1/reports/{args.id}/{args.action}", {"reason": args.reason}
        query = f"?limit={args.limit}" + (f"&status={args.status}" if args.status else "")
        return "GET", "/admin/v1/reports" + query, None
    if what == "notice":
        if args.notice_command == "send":
            return "POST", "/admin/v1/notices", {"recipient": args.recipient,
                                                 "reference": args.reference}
        if args.notice_command == "withdraw":
            return "POST", "/admin/v1/notices/withdrawals", {
                "recipient": args.recipient, "staff_id": args.staff_id,
                "evidence": args.evidence}
        params = {"limit": args.limit, "reference": args.reference, "recipient": args.recipient}
        return "GET", "/admin/v1/notices?" + "&".join(
            f"{k}={quote(str(v), safe='')}" for k, v in params.items() if v is not None), None
    if what == "citizen":
        if (args.user is None) == (args.phone is None):
            raise UsageError(f"citizen {args.citizen_command} needs either a pseudonym or "
                             "Matrix user id, or --phone")
        if args.phone is not None:  # in the body: a number never goes into a URL
            return "POST", f"/admin/v1/citizens/{args.citizen_command}", {
                "phone": args.phone, "reason": args.reason}
        path = "/admin/v1/citizens/" + quote(args.user, safe="")
        if args.citizen_command == "export":
            return "GET", f"{path}/export?reason={quote(args.reason, safe='')}", None
        return "DELETE", path, {"reason": args.reason}
    if what == "reveal":
        return "POST", f"/admin/v1/citizens/{quote(args.user, safe='')}/reveal", {
            "reason": args.reason}
    if what == "lookup":
        return "POST", "/admin/v1/citizens/lookup", {"phone": args.phone,
                                                     "reason": args.reason}
    if what == "template":
        values: list[str] = args.values
        named = [v for v in values if "=" in v]
        parameters: dict[str, str] | list[str] = (
            dict(v.split("=", 1) for v in values) if named and len(named) == len(values)
            else values)
        return "POST", f"/admin/v1/portals/{quote(args.room, safe='')}/templates", {
            "name": args.name, "parameters": parameters}
    if what == "rooms":
        if args.rooms_command == "create":
            return "POST", "/admin/v1/rooms", {"name": args.name, "kind": args.kind,
                                               "topic": args.topic, "join_rule": args.join_rule}
        return "GET", "/admin/v1/rooms", None
    room = _room(args.room)
    if what == "members":
        return "GET", room + "/members", None
    if what == "invite":
        return "POST", room + "/invite", {"user_id": args.user, "reason": args.reason,
                                          "confirm": args.confirm}
    if what == "link":
        return "POST", room + "/invite-links", {"uses": args.uses, "expires_in": args.expires_in,
                                                "confirm": args.confirm}
    if what in MEMBER_ACTIONS:
        return "POST", f"{room}/{what}", {"user_id": args.user, "reason": args.reason}
    if what == "redact":
        return "POST", room + "/redact", {"event_id": args.event, "reason": args.reason}
    if what in ("approve", "deny"):
        return "POST", f"{room}/knocks/{what}", {"user_id": args.user, "reason": args.reason}
    if what == "close":
        return "POST", room + "/close", {"reason": args.reason}
    return "POST", room + "/announce", {"body": args.text, "confirm": args.confirm}


def render(args: argparse.Namespace, data: Any) -> tuple[str, str, int]:
    """What to print on stdout and on stderr for a successful answer, and the exit code."""
    what = args.admin_command
    if what == "audit" and (args.audit_command == "anchor" or "anchors" in data):
        from bridge.admin import audit_cli

        return (audit_cli.render_anchor(data) if args.audit_command == "anchor"
                else audit_cli.render_verify(data))
    if what == "audit":
        chain = data if args.audit_command == "verify" else data["chain"]
        if chain["intact"]:
            status, problem, code = "audit chain intact", "", EXIT_OK
        else:
            status, code = "", EXIT_TAMPERED
            problem = (f"AUDIT CHAIN BROKEN: entry {chain['first_bad_id']} was altered or the "
                       "entry before it removed")
        if args.audit_command == "verify":
            return status, problem, code
        rows = [(e["id"], e["at"][:19].replace("T", " ") + "Z", e["actor"], e["action"],
                 e["object"], e["result"], e["reason"]) for e in data["entries"]]
        out = table(rows, ("id", "at (UTC)", "actor", "action", "object", "result", "reason"))
        if data.get("next_before"):
            out += f"\n(more: --before {data['next_before']})"
        return f"{out}\n{status}".rstrip("\n"), problem, code
    if what == "lookup":
        return table([(c["pseudonym"], c["matrix_user_id"], c["consent_state"],
                       c["subscription_code"], c["notices_consent_state"])
                      for c in data["citizens"]],
                     ("pseudonym", "matrix_user_id", "consent", "subscription_code",
                      "notices")), "", EXIT_OK
    if what == "citizen" and isinstance(data.get("erased"), list):  # erase --phone
        return "\n".join(f"erased: {e['pseudonym']}" for e in data["erased"]), "", EXIT_OK
    if what == "citizen" and args.citizen_command == "export":
        return json.dumps(data, indent=2, ensure_ascii=False), "", EXIT_OK  # machine-readable
    if what == "notice" and args.notice_command == "withdraw":
        if data["withdrawn"]:
            return (f"notices consent of {data['pseudonym']} withdrawn (recorded as in person; "
                    "unsent notices cancelled; no WhatsApp message: confirm to the citizen)",
                    "", EXIT_OK)
        return (f"nothing to withdraw: notices consent of {data['pseudonym']} is "
                f"{data['state']}", "", EXIT_OK)
    if what == "notice":
        entries = data["notices"] if args.notice_command == "list" else [data]
        rows = [(n["id"], n["reference"], n["pseudonym"], n["status"],
                 *((n[k] or "")[:19].replace("T", " ") for k in
                   ("created_at", "sent_at", "delivered_at", "read_at")), n["error"])
                for n in entries]
        out = table(rows, ("id", "reference", "pseudonym", "status", "created (UTC)", "sent",
                           "delivered", "read", "error"))
        return f"{out}\n{data['label']}", "", EXIT_OK  # both answers carry the label
    if what == "dead-letters":
        letters = data["dead_letters"] if args.action == "list" else [data]
        rows = [(d["id"], d["source"], d["lane_kind"], d["reason"], d["error"], d["attempts"],
                 *(d[k][:19].replace("T", " ") for k in ("first_failed_at", "last_failed_at")),
                 d.get("status", "dead")) for d in letters]
        return table(rows, ("id", "source", "lane", "reason", "error", "attempts",
                            "first failure (UTC)", "last failure", "status")), "", EXIT_OK
    if what == "reports" and args.reports_command == "list":
        found = [(r["id"], r["source"], r["status"], r["room_id"], r["event_id"],
                  r["author"] or "", r["reporter"], r["created_at"][:19].replace("T", " "))
                 for r in data["reports"]]
        return table(found, ("id", "source", "status", "room", "event", "author", "reporter",
                            "created (UTC)")), "", EXIT_OK
    if what == "keys":
        return table([(k["kind"], k["user_id"], k["master_key"]) for k in data],
                     ("kind", "user_id", "master key fingerprint")), "", EXIT_OK
    if what == "rooms" and args.rooms_command == "list":
        return table([(r["room_id"], r["kind"], r["name"]) for r in data],
                     ("room_id", "kind", "name")), "", EXIT_OK
    if what == "members":
        return table([(m["display_name"] or "", m["role"], m["kind"], m["membership"],
                       m["user_id"]) for m in data],
                     ("name", "role", "kind", "membership", "user_id")), "", EXIT_OK
    if what == "link":
        return (f"{data['url']}\n({data['uses']} use(s), expires {data['expires_at']})", "",
                EXIT_OK)
    if isinstance(data, dict) and data:
        return "\n".join(f"{k}: {v}" for k, v in data.items()), "", EXIT_OK
    return "done", "", EXIT_OK


def run_admin(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        for line in exc.problems:
            print(f"config error: {line}", file=sys.stderr)
        return EXIT_USAGE
    url = base_url(config, args.url)
    token = token_for(config, args.token_name)
    if token is None:
        print(f"config error: admin.tokens has no token named {args.token_name!r}",
              file=sys.stderr)
        return EXIT_USAGE
    try:
        method, path, body = request_for(args)
    except UsageError as exc:
        print(f"usage error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if body is not None:
        body = {k: v for k, v in body.items() if v is not None}
    from bridge.admin import audit_cli

    anchors = None
    if args.admin_command == "audit" and getattr(args, "anchor", None):
        anchors = audit_cli.read_anchors(args.anchor)
        if anchors is None:
            return EXIT_USAGE
    try:
        data = asyncio.run(
            audit_cli.verify_against(url, token, anchors) if anchors
            else call(url, token, method, path, body, args.acting))
    except Refused as exc:
        print(f"refused ({exc.status} {exc.errcode}): {exc}", file=sys.stderr)
        if exc.errcode == "CB_CONFIRM_REQUIRED":
            print("repeat with --confirm to go ahead", file=sys.stderr)
            return EXIT_CONFIRM
        return EXIT_REFUSED
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        print(f"cannot reach the bridge at {url}: {type(exc).__name__}", file=sys.stderr)
        return EXIT_UNREACHABLE
    # An anchor is JSON already: --json prints the same line.
    if args.json and not (args.admin_command == "audit" and args.audit_command == "anchor"):
        print(json.dumps(data, indent=2, ensure_ascii=False))
        if args.admin_command == "audit":
            return audit_cli.exit_code(data)
        return EXIT_OK
    out, err, code = render(args, data)
    if out:
        print(out)
    if err:
        print(err, file=sys.stderr)
    return code


def add_admin_parser(sub: Any) -> None:
    """Add `admin` and its subcommands to the top-level subparsers of `civic-bridge`."""
    admin = sub.add_parser("admin", help="call the admin API (rooms, moderation, citizens, "
                                         "notices, audit, dead letters)",
                           description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    admin.add_argument("-c", "--config", default="config.yaml")
    admin.add_argument("--url", default=None,
                       help=f"the admin listener's base URL (or ${URL_ENV}; default: "
                            "admin.listen_host/listen_port)")
    admin.add_argument("--json", action="store_true", help="print the API's JSON answer")
    admin.add_argument("--token-name", default=LEGACY_TOKEN_NAME,
                       help="which admin.tokens entry to call with (default: admin.token)")
    admin.add_argument("--as", dest="acting", default=None, metavar="@USER:DOMAIN",
                       help="who is acting: recorded in the audit log next to the token")
    admin.set_defaults(func=run_admin)
    cmds = admin.add_subparsers(dest="admin_command", required=True)

    audit = cmds.add_parser("audit", help="the audit log").add_subparsers(
        dest="audit_command", required=True)
    p = audit.add_parser("list", help="entries, newest first, and the chain check")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--before", type=int, default=None, help="page back from this entry id")
    p = audit.add_parser("verify", help="check the hash chain (exit 4 if it was tampered with)")
    p.add_argument("--anchor", metavar="FILE", default=None,
                   help="also check the entries anchored in FILE (lines printed by `audit "
                        "anchor` or sent by audit.anchor_command) still match")
    audit.add_parser("anchor", help="print the chain's head as one JSON line, for an external "
                                    "log (exit 4 if the chain is broken)")

    cmds.add_parser("keys", help="master-key fingerprints of the bot and the ghosts")
    p = cmds.add_parser("dead-letters", help="items set aside after a permanent failure "
                                             "(docs/reliability.md)")
    p.add_argument("action", nargs="?", default="list", choices=("list", "retry", "discard"))
    p.add_argument("id", nargs="?", default=None, help="a dead letter's id, e.g. in-12")
    p.add_argument("--reason", default=None, help="why (required to retry or discard; "
                                                  "recorded in the audit log)")
    reports = cmds.add_parser("reports", help="reports and flags for moderators") \
        .add_subparsers(dest="reports_command", required=True)
    p = reports.add_parser("list", help="newest first (no reasons: see the management room)")
    p.add_argument("--status", default=None, help="e.g. open")
    p.add_argument("--limit", type=int, default=100)
    p = reports.add_parser("act", help="close a report with one action")
    p.add_argument("id", type=int)
    p.add_argument("action", help="redact, mute, kick, ban or dismiss")
    p.add_argument("--reason", default=None)
    notice = cmds.add_parser("notice", help="notices of availability (docs/notices.md)") \
        .add_subparsers(dest="notice_command", required=True)
    p = notice.add_parser("send", help="send the fixed notice template (never content)")
    p.add_argument("recipient", help="the subscription code or the citizen's Matrix user id")
    p.add_argument("reference", help="the notification platform's reference (logged only)")
    p = notice.add_parser("withdraw", help="withdraw notices consent the citizen asked to "
                                           "withdraw in person")
    p.add_argument("recipient", help="the subscription code or the citizen's Matrix user id")
    p.add_argument("--staff-id", required=True,
                   help="Matrix user id of the staff member who assisted")
    p.add_argument("--evidence", required=True,
                   help="the agency's record of the request (e.g. registry entry number)")
    p = notice.add_parser("list", help="the notice log, newest first (informative only)")
    p.add_argument("--reference", default=None)
    p.add_argument("--recipient", default=None)
    p.add_argument("--limit", type=int, default=50)
    citizen = cmds.add_parser("citizen", help="a person's data (by Matrix user id, pseudonym, "
                                              "subscription code or --phone)") \
        .add_subparsers(dest="citizen_command", required=True)
    who = ("a citizen's ghost Matrix ID, pseudonym or subscription code, or an invite-link "
           "account's Matrix ID")
    phone = "or their phone number instead, e.g. '+34 600 11 22 33' (every record under it)"
    p = citizen.add_parser("export", help="everything held about them, as JSON (for them only)")
    p.add_argument("user", nargs="?", help=who)
    p.add_argument("--phone", help=phone)
    p.add_argument("--reason", required=True, help="why they are re-identified (audit log; "
                                                   "with --phone at least 10 characters)")
    p = citizen.add_parser("erase", help="stop relay and delete their data (irreversible)")
    p.add_argument("user", nargs="?", help=who)
    p.add_argument("--phone", help=phone)
    p.add_argument("--reason", required=True, help="recorded in the audit log")
    p = cmds.add_parser("reveal", help="a citizen's phone number / BSUID (scope reidentify; "
                                       "audited, rate-limited)")
    p.add_argument("user", help="the citizen's Matrix user id or subscription code")
    p.add_argument("--reason", required=True, help="why (at least 10 characters; audit log)")
    p = cmds.add_parser("lookup", help="a person's pseudonyms by phone number (rights "
                                       "requests; audited)")
    p.add_argument("phone", help="e.g. '+34 600 11 22 33' or '600112233' (Spain by default)")
    p.add_argument("--reason", required=True, help="why (at least 10 characters; audit log)")
    rooms = cmds.add_parser("rooms", help="agency rooms").add_subparsers(
        dest="rooms_command", required=True)
    rooms.add_parser("list", help="open rooms")
    p = rooms.add_parser("create", help="create an agency room")
    p.add_argument("name")
    p.add_argument("--kind", required=True, choices=("team", "citizen", "announcement"))
    p.add_argument("--topic", default=None)
    p.add_argument("--join-rule", default="invite", choices=("invite", "knock"))

    p = cmds.add_parser("template", help="send an approved template (whatsapp.templates) "
                                         "to a portal's citizen")
    p.add_argument("room", help="the portal's room id")
    p.add_argument("name", help="the template's name")
    p.add_argument("values", nargs="*", help="NAME=VALUE per parameter, or values in order")
    cmds.add_parser("members", help="pseudonyms and roles").add_argument("room")
    p = cmds.add_parser("invite", help="invite a staff member")
    p.add_argument("room")
    p.add_argument("user")
    p.add_argument("--reason", default=None)
    p.add_argument("--confirm", action="store_true")
    p = cmds.add_parser("link", help="an invite link for citizens")
    p.add_argument("room")
    p.add_argument("--uses", type=int, default=None)
    p.add_argument("--expires-in", type=duration, default=None, help="e.g. 48h, 7d")
    p.add_argument("--confirm", action="store_true")
    for action in MEMBER_ACTIONS:
        p = cmds.add_parser(action, help=f"{action} a user")
        p.add_argument("room")
        p.add_argument("user")
        p.add_argument("--reason", required=True)
    p = cmds.add_parser("redact", help="remove a message")
    p.add_argument("room")
    p.add_argument("event")
    p.add_argument("--reason", required=True)
    p = cmds.add_parser("approve", help="let a knocking user in")
    p.add_argument("room")
    p.add_argument("user")
    p.add_argument("--reason", default=None)
    p = cmds.add_parser("deny", help="turn a knocking user away")
    p.add_argument("room")
    p.add_argument("user")
    p.add_argument("--reason", required=True)
    p = cmds.add_parser("close", help="remove everyone and tombstone the room")
    p.add_argument("room")
    p.add_argument("--reason", required=True)
    p = cmds.add_parser("announce", help="post in an announcement room")
    p.add_argument("room")
    p.add_argument("text")
    p.add_argument("--confirm", action="store_true")
