"""What `civic-bridge demo` tells a newcomer once everything is up."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from bridge.devtools.demo_state import DEFAULT_DIR, SERVER_NAME, STAFF_LOCALPART, DemoState

Print = Callable[[str], None]
READY = "civic-bridge demo is running"
# scripts/demo sets this to how it was invoked, so the banner can repeat it.
LAUNCHER_ENV = "CIVIC_BRIDGE_DEMO_LAUNCHER"
RULE = "─" * 78


def quote(text: str | None, limit: int = 70) -> str:
    """A message text for a progress line: one line, “quoted”, shortened."""
    if not text:
        return ""
    flat = " ".join(text.split())
    return f"“{flat if len(flat) <= limit else flat[:limit - 1] + '…'}”"


def _shown_path(path: Path) -> str:
    try:
        rel = path.relative_to(Path.cwd())
    except ValueError:
        return str(path)
    return str(rel) if str(rel).startswith(".") else f"./{rel}" if rel.parts else "."


def direct_command() -> str:
    """How to call the CLI the way this process was started."""
    argv0 = Path(sys.argv[0])
    if argv0.name == "civic-bridge":
        on_path = shutil.which("civic-bridge")
        if on_path and Path(on_path).resolve() == argv0.resolve():
            return "civic-bridge"
        return shlex.quote(_shown_path(argv0.absolute()))
    python = Path(sys.executable)
    on_path = shutil.which(python.name)
    shown = python.name if on_path and Path(on_path).resolve() == python.resolve() \
        else _shown_path(python)
    return f"{shlex.quote(shown)} -m bridge"


def shell_words(text: str) -> str:
    """`text` as one shell word, in double quotes where that is safe (easier to edit)."""
    return f'"{text}"' if re.fullmatch(r'[^"$`\\!]*', text) else shlex.quote(text)


def demo_commands(directory: Path, action: str, text: str) -> tuple[str, str | None]:
    """(the command to suggest, the same without scripts/demo, if that was used)."""
    dir_arg = "" if directory == Path.cwd() / DEFAULT_DIR else \
        f" --dir {shlex.quote(_shown_path(directory))}"
    tail = f"{action}{dir_arg} {shell_words(text)}"
    direct = f"{direct_command()} demo {tail}"
    launcher = os.environ.get(LAUNCHER_ENV)
    if launcher:
        return f"{shlex.quote(launcher)} {tail}", direct
    return direct, None


NEXT_REFERENCE = "PRUEBA-1"  # the banner's example; the demo's own are DEMO-AVISO-nnnn


def _notices_lines(state: DemoState, token: str, admin: str) -> tuple[str, str]:
    """(the overview line, the numbered item with the commands), or empty strings."""
    code = state.notices_code
    if not code:
        return "", ""
    request = json.dumps({"recipient": code, "reference": NEXT_REFERENCE})
    overview = (
        f"\n Notices             subscription code {code}   (a second simulated citizen,"
        f"\n                     pseudonym {state.notices_pseudonym}, who only takes notices:"
        " no ghost, no portal)")
    item = (
        "\n 4. Send another notice of availability, as the agency's notification platform"
        "\n    would (the same reference again is answered 200 and sends nothing):"
        f'\n        curl -H "Authorization: Bearer {token}" -H "Content-Type: application/json" \\'
        f"\n             -d '{request}' {admin}/notices"
        "\n    and read its log entry (informative, not proof of notification):"
        f'\n        curl -H "Authorization: Bearer {token}" '
        f'"{admin}/notices?reference={NEXT_REFERENCE}"')
    return overview, item


def banner(state: DemoState, directory: Path) -> str:
    token = state.secrets["admin_token"]
    hs = state.homeserver_url
    admin = f"{state.admin_url}/admin/v1"
    send, send_direct = demo_commands(directory, "send", "hola")
    reply, _ = demo_commands(directory, "reply", "Buenos días, ¿en qué puedo ayudarle?")
    same = f"\n        (same as: {send_direct})" if send_direct else ""
    data = _shown_path(directory)
    notices, notices_item = _notices_lines(state, token, admin)
    return f"""
{RULE}
 {READY}.  Ctrl-C stops everything.

 Matrix homeserver   {hs}   (server name "{SERVER_NAME}")
 Staff login         {state.staff_user_id}   password: {state.staff_password}
 Portal room         {state.portal_room_id}   "{state.portal_name}"
                     the citizen appears as "{state.pseudonym}"; their number is never shown\
{notices}
 Admin API           {admin}   token: {token}
 WhatsApp simulator  {state.api_base}   (a local stand-in for Meta's Cloud API)
 Data and logs       {data}/  (bridge.log, synapse/homeserver.log, demo.json)

 1. Log in as staff with any Matrix client: Element Desktop, or https://app.element.io
    in a browser → Sign in → homeserver "Edit" → {hs}
    → username "{STAFF_LOCALPART}" and the password above; skip the offers to set up key
    backup or verify. Accept the invitation to the portal room. The citizen's first
    message was relayed before your client existed: the citizen's device sends your
    new one its key when you join, so it may show "unable to decrypt" for a moment.
    (The demo sets e2ee.forward_keys_to: all; by default only sessions you verified
    get keys of messages from before they existed: docs/e2ee.md.)
 2. Make the simulated citizen write, from a second terminal in this directory:
        {send}{same}
 3. Answer in the portal from Element; the reply shows up below as delivered to the
    WhatsApp simulator. Or answer headless:
        {reply}{notices_item}
 Also try: send "BAJA" (the citizen opts out), then send "ACEPTO" (opts back in).
 Admin API:  curl -H "Authorization: Bearer {token}" {admin}/rooms
{RULE}
Live relay:"""
