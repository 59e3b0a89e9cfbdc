"""`civic-bridge demo send` and `demo reply`: both sides of a conversation, from a terminal.

`send` plays the citizen: a signed webhook, exactly as Meta would deliver it, to the
running demo's bridge. `reply` plays the staff member: a matrix-nio client with E2EE
(its device is kept in the demo directory) that answers in the portal room.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp

from bridge.devtools.demo_state import (
    BUSINESS_NUMBER,
    PHONE_NUMBER_ID,
    STAFF_LOCALPART,
    DemoState,
    DemoStateError,
    load_running,
)
from bridge.devtools.demo_text import Print, quote
from bridge.devtools.simulator import CloudAPISimulator, SimulatedUser

if TYPE_CHECKING:
    from nio import AsyncClient

SESSION_FILE = "session.json"


class DemoClientError(RuntimeError):
    """A send or reply failed; the message says why and what to do."""


def simulator_for(state: DemoState) -> CloudAPISimulator:
    """A simulator with the demo's secrets, used only to build and sign webhooks."""
    return CloudAPISimulator(access_token=state.secrets["access_token"],
                             app_secret=state.secrets["app_secret"],
                             phone_number_id=PHONE_NUMBER_ID,
                             display_phone_number=BUSINESS_NUMBER)


def simulated_user(state: DemoState) -> SimulatedUser:
    c = state.citizen
    return SimulatedUser(wa_id=c.wa_id, user_id=c.user_id, name=c.name)


async def send(directory: Path, text: str, out: Print) -> None:
    """The simulated citizen writes `text` to the agency's WhatsApp number."""
    state = load_running(directory)
    sim = simulator_for(state)
    try:
        status = await sim.deliver(state.webhook_url,
                                   sim.text_message(simulated_user(state), text))
    except (aiohttp.ClientError, OSError) as exc:
        raise DemoClientError(f"the demo's bridge at {state.bridge_url} did not answer "
                              f"({type(exc).__name__}); is the demo still running?") from None
    if status != 200:
        raise DemoClientError(f"the bridge refused the webhook with HTTP {status}; "
                              f"see {directory / 'bridge.log'}")
    who = state.pseudonym or "the simulated citizen"
    out(f"WhatsApp: {who} wrote {quote(text)} — the bridge accepted the signed webhook "
        "(HTTP 200).\nWatch the demo terminal, or the portal room in your Matrix client.")


# --- staff -------------------------------------------------------------------------


def _ok(response: object, expected: type, what: str) -> Any:
    from nio import ErrorResponse

    if isinstance(response, ErrorResponse) or not isinstance(response, expected):
        raise DemoClientError(f"{what} failed: {getattr(response, 'message', response)}")
    return response


async def _sync(client: AsyncClient) -> Any:
    """One /sync plus the key upkeep nio leaves to `sync_forever`."""
    from nio import SyncResponse

    response = _ok(await client.sync(timeout=500), SyncResponse, "sync")
    olm = client.olm
    if olm is not None and olm.account.shared and \
            not response.device_key_count.signed_curve25519:
        olm.uploaded_key_count = 0  # nio would otherwise never refill one-time keys
    if client.should_upload_keys:
        await client.keys_upload()
    if client.should_query_keys:
        await client.keys_query()
    if client.should_claim_keys:
        await client.keys_claim(client.get_users_for_key_claiming())
    await client.send_to_device_messages()
    return response


async def _portal(state: DemoState) -> str:
    """The newest open portal, from the bridge's admin API."""
    headers = {"Authorization": f"Bearer {state.secrets['admin_token']}"}
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http, \
                http.get(f"{state.admin_url}/admin/v1/rooms", headers=headers) as resp:
            rooms = await resp.json()
    except (aiohttp.ClientError, OSError, ValueError) as exc:
        raise DemoClientError(f"the admin API at {state.admin_url} did not answer "
                              f"({type(exc).__name__})") from None
    portals = [r["room_id"] for r in rooms if isinstance(r, dict) and r.get("kind") == "portal"]
    if not portals:
        raise DemoClientError("there is no open portal: the citizen has opted out. Try "
                              "`demo send ACEPTO` to opt back in first.")
    return str(portals[-1])


def _read_session(store: Path) -> dict[str, str] | None:
    store.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        data = json.loads((store / SESSION_FILE).read_text("utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write_session(store: Path, device_id: str, access_token: str) -> None:
    fd = os.open(store / SESSION_FILE, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump({"device_id": device_id, "access_token": access_token}, f)


async def _logged_in(state: DemoState, store: Path) -> AsyncClient:
    """The demo's CLI staff device: logged in once, then restored from the store."""
    from nio import AsyncClient, AsyncClientConfig, LoginResponse

    session = await asyncio.to_thread(_read_session, store)
    client = AsyncClient(state.homeserver_url, state.staff_user_id, store_path=str(store),
                         config=AsyncClientConfig(encryption_enabled=True,
                                                  store_sync_tokens=True))
    try:
        if session:
            client.restore_login(state.staff_user_id, session["device_id"],
                                 session["access_token"])
        else:
            login = _ok(await client.login(state.staff_password,
                                           device_name="civic-bridge demo reply"),
                        LoginResponse, f"login as {STAFF_LOCALPART}")
            await asyncio.to_thread(_write_session, store, login.device_id, login.access_token)
    except BaseException:
        await client.close()
        raise
    return client


async def reply(directory: Path, text: str, out: Print) -> None:
    """The demo staff member answers `text` in the portal, end-to-end encrypted."""
    from nio import JoinResponse, RoomSendResponse

    state = load_running(directory)
    room_id = await _portal(state)
    client = await _logged_in(state, directory / "staff-cli")
    try:
        for _ in range(30):
            response = await _sync(client)
            if room_id in client.rooms and room_id not in response.rooms.invite:
                break
            if room_id in client.invited_rooms or room_id in response.rooms.invite:
                _ok(await client.join(room_id), JoinResponse, "joining the portal")
        else:
            raise DemoClientError(f"{state.staff_user_id} is not in the portal {room_id}")
        sent = _ok(await client.room_send(room_id, "m.room.message",
                                          {"msgtype": "m.text", "body": text},
                                          ignore_unverified_devices=True),
                   RoomSendResponse, "sending")
        await _sync(client)
    finally:
        await client.close()
    out(f"Matrix: {state.staff_user_id} answered {quote(text)} in the portal "
        f"(E2EE, {sent.event_id}).\nThe demo terminal shows it reaching the WhatsApp simulator.")


def main(action: str, directory: str, text: str) -> int:
    """Entry point for `civic-bridge demo send|reply TEXT`."""
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(line_buffering=True, errors="replace")
    # nio narrates its key exchange at WARNING (e.g. old messages this new device cannot
    # read); failures that matter are reported below.
    logging.getLogger("nio").setLevel(logging.CRITICAL)
    path = Path(directory).expanduser().absolute()
    command = send if action == "send" else reply
    try:
        asyncio.run(command(path, text, print))
    except (DemoStateError, DemoClientError) as exc:
        print(f"demo {action}: {exc}", file=sys.stderr)
        return 1
    return 0
