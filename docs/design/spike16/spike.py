"""SPIKE for issue #16: appservice-mode E2EE (MSC2409 / MSC3202 / MSC4190) with matrix-nio.

Run:  .venv/bin/python docs/design/spike16/spike.py
(PYTHONPATH=/work/main so that bridge.devtools.synapse is importable; nothing in
/work/main is written: the Synapse venv is used as is, no policy module installed.)

What it does, step by step (each step prints RESULT lines; transactions go to
run/transactions.jsonl):
 1. starts a real Synapse (LocalSynapse, experimental msc2409/msc3202 flags on) with an
    appservice registration carrying org.matrix.msc3202 + io.element.msc4190;
 2. a tiny aiohttp AS endpoint records every transaction;
 3. registers @spk_ghost with the as_token (MSC4190: inhibit_login) and creates its
    device with PUT /devices/{id}?user_id=...; uploads device + one-time + fallback keys
    with the as_token + ?user_id=&device_id= (MSC3202 device masquerading), no login;
 4. a normal nio user (alice) makes an encrypted room, invites the ghost (joined via AS),
    sends an encrypted message -> the transaction carries the Olm to-device event, the
    OTK counts, the unused fallback key types, device_lists;
 5. the ghost's nio client (never /sync) is fed the to-device event and decrypts the
    room event; OTK top-up from the transaction count; ghost replies encrypted (no sync)
    and alice decrypts it;
 6. exhausts the ghost's OTKs by /keys/claim to show (a) whether a bare claim makes a
    transaction carry a new count and (b) the fallback key being handed out;
 7. idle: counts requests the ghost makes in 20 s (must be 0).
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlencode, urlparse, urlunparse

sys.path.insert(0, "/work/main")

import aiohttp
import nio
import yaml
from aiohttp import web

from bridge.devtools.synapse import LocalSynapse, free_port

HERE = Path(__file__).parent
RUN = HERE / "run"
VENV_PY = Path.home() / ".cache/civic-bridge/synapse-venv/bin/python"
DOMAIN = "localhost"
AS_TOKEN = secrets.token_hex(16)
HS_TOKEN = secrets.token_hex(16)
TXNS: list[dict[str, Any]] = []
# SPIKE_NO_MSC4190=1: registration without io.element.msc4190 (the fallback path)
NO4190 = os.environ.get("SPIKE_NO_MSC4190") == "1"
TXN_EVENT = asyncio.Event()


def result(step: str, ok: bool, detail: Any = "") -> None:
    print(f"RESULT {step}: {'OK' if ok else 'FAIL'} {detail}", flush=True)


class SpikeSynapse(LocalSynapse):
    """Use the cached venv as is (no policy-module install into the shared venv)."""

    def _venv_python(self) -> Path:
        return VENV_PY


class ASClient(nio.AsyncClient):
    """A nio client that authenticates with the as_token and masquerades as one device
    (MSC3202 `device_id` + `user_id` query parameters): no login, no per-device token."""

    requests_made: list[str]

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.requests_made = []

    async def _send(self, response_class, method, path, *args, **kwargs):  # type: ignore[override]
        url = list(urlparse(path))
        qs = parse_qs(url[4])
        qs["user_id"] = [self.user_id]
        qs["device_id"] = [self.device_id]
        url[4] = urlencode(qs, doseq=True)
        path = urlunparse(url)
        self.requests_made.append(f"{time.monotonic():.3f} {method} {urlparse(path).path}")
        return await super()._send(response_class, method, path, *args, **kwargs)


# --- the appservice endpoint -------------------------------------------------------

async def on_txn(request: web.Request) -> web.Response:
    if request.headers.get("Authorization") != f"Bearer {HS_TOKEN}":
        return web.json_response({"errcode": "M_FORBIDDEN"}, status=403)
    body = await request.json()
    body["_txn_id"] = request.match_info["txn"]
    body["_received"] = time.time()
    TXNS.append(body)
    with (RUN / "transactions.jsonl").open("a") as f:
        f.write(json.dumps(body) + "\n")
    TXN_EVENT.set()
    return web.json_response({})


async def on_other(request: web.Request) -> web.Response:
    return web.json_response({})


async def wait_txn(pred, timeout: float = 10.0) -> dict[str, Any] | None:
    deadline = time.monotonic() + timeout
    seen = 0
    while time.monotonic() < deadline:
        for t in TXNS[seen:]:
            if pred(t):
                return t
        seen = len(TXNS)
        TXN_EVENT.clear()
        try:
            await asyncio.wait_for(TXN_EVENT.wait(), max(0.01, deadline - time.monotonic()))
        except TimeoutError:
            pass
    return None


# --- helpers ----------------------------------------------------------------------

async def call(session: aiohttp.ClientSession, hs: str, method: str, path: str,
               body: Any = None, params: dict[str, str] | None = None,
               token: str = AS_TOKEN) -> tuple[int, Any]:
    async with session.request(method, hs + path, json=body, params=params,
                               headers={"Authorization": f"Bearer {token}"}) as r:
        return r.status, await r.json(content_type=None)


def shape(obj: Any, depth: int = 0) -> Any:
    """JSON with long strings shortened (ciphertexts, keys)."""
    if isinstance(obj, dict):
        return {k: shape(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, list):
        return [shape(v, depth + 1) for v in obj[:5]]
    if isinstance(obj, str) and len(obj) > 48:
        return obj[:20] + "…"
    return obj


def strip(txn: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in txn.items() if not k.startswith("_")}


async def main() -> None:
    RUN.mkdir(parents=True, exist_ok=True)
    (RUN / "transactions.jsonl").unlink(missing_ok=True)
    as_port = free_port()
    hs_port = free_port()
    reg = {
        "id": "spike16", "url": f"http://127.0.0.1:{as_port}",
        "as_token": AS_TOKEN, "hs_token": HS_TOKEN, "sender_localpart": "spk_sender",
        "rate_limited": False, "receive_ephemeral": True,
        "de.sorunome.msc2409.push_ephemeral": True,
        "org.matrix.msc3202": True, "io.element.msc4190": not NO4190,
        "namespaces": {"users": [{"exclusive": True, "regex": "@spk_.*:localhost"}],
                       "aliases": [], "rooms": []},
    }
    reg_path = RUN / "registration.yaml"
    reg_path.write_text(yaml.safe_dump(reg))
    # a fresh Synapse every run (its dir is kept only for the logs)
    syn_dir = RUN / "synapse"
    if syn_dir.exists():
        import shutil
        shutil.rmtree(syn_dir)
    syn = SpikeSynapse(syn_dir, server_name=DOMAIN, registration_files=[reg_path],
                       port=hs_port, access_log=RUN / "synapse-access.log")
    app = web.Application()
    app.router.add_put("/_matrix/app/v1/transactions/{txn}", on_txn)
    app.router.add_route("*", "/{tail:.*}", on_other)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", as_port).start()
    t0 = time.monotonic()
    await syn.start()
    print(f"synapse up in {time.monotonic() - t0:.1f}s on {syn.url}", flush=True)
    hs = syn.url
    session = aiohttp.ClientSession()
    try:
        await run_steps(syn, hs, session)
    finally:
        await session.close()
        await syn.stop()
        await runner.cleanup()


async def run_steps(syn: SpikeSynapse, hs: str, session: aiohttp.ClientSession) -> None:
    ghost = f"@spk_ghost:{DOMAIN}"
    ghost_dev = "SPKGHOSTDEV"

    # ---- 3. MSC4190 registration and device creation ------------------------------
    st, body = await call(session, hs, "POST", "/_matrix/client/v3/register",
                          {"type": "m.login.application_service", "username": "spk_probe"})
    result("3a register WITHOUT inhibit_login under MSC4190", st == 400, (st, body))
    if NO4190:
        st, body = await call(session, hs, "POST", "/_matrix/client/v3/login",
                              {"type": "m.login.application_service", "device_id": "PROBEDEV",
                               "identifier": {"type": "m.id.user", "user": "spk_probe"}})
        result("3b' AS /login without MSC4190", st == 200, (st, shape(body)))
        st, body = await call(session, hs, "PUT", "/_matrix/client/v3/devices/PROBEDEV2", {},
                              params={"user_id": "@spk_probe:localhost"})
        result("3b'' PUT /devices creates a device without MSC4190 too", st == 201, (st, body))
    st, body = await call(session, hs, "POST", "/_matrix/client/v3/login",
                          {"type": "m.login.application_service",
                           "identifier": {"type": "m.id.user", "user": "spk_probe"}})
    result("3b AS /login under MSC4190 is refused", st == 400, (st, body))
    st, body = await call(session, hs, "POST", "/_matrix/client/v3/register",
                          {"type": "m.login.application_service", "username": "spk_ghost",
                           "inhibit_login": True})
    result("3c register with inhibit_login", st == 200, (st, body))
    st, body = await call(session, hs, "PUT", f"/_matrix/client/v3/devices/{ghost_dev}",
                          {"display_name": "civic-bridge"}, params={"user_id": ghost})
    result("3d PUT /devices/{id}?user_id= creates the device", st == 201, (st, body))
    st, body = await call(session, hs, "PUT", f"/_matrix/client/v3/devices/{ghost_dev}",
                          {"display_name": "civic-bridge"}, params={"user_id": ghost})
    result("3e PUT again is idempotent", st == 200, (st, body))
    st, body = await call(session, hs, "GET", "/_matrix/client/v3/account/whoami",
                          params={"user_id": ghost, "device_id": ghost_dev})
    result("3f whoami with ?user_id&device_id (MSC3202 masquerade)",
           st == 200 and body.get("device_id") == ghost_dev, (st, body))
    st, body = await call(session, hs, "GET", "/_matrix/client/v3/account/whoami",
                          params={"user_id": ghost, "device_id": "NOSUCHDEV"})
    result("3g masquerading as a missing device is refused", st != 200, (st, body))
    # the AS sender itself (sender_localpart): can it have a device?
    st, body = await call(session, hs, "PUT", "/_matrix/client/v3/devices/SPKSENDERDEV", {})
    result("3h PUT /devices for the sender_localpart user", st in (200, 201), (st, body))

    # ghost nio client: store in a spike dir, never logs in, never syncs
    store = RUN / "ghost-store"
    store.mkdir(exist_ok=True)
    for f in store.iterdir():
        f.unlink()
    gcfg = nio.AsyncClientConfig(encryption_enabled=True, store_sync_tokens=False,
                                 pickle_key="spike")
    g = ASClient(hs, ghost, ghost_dev, store_path=str(store), config=gcfg)
    g.restore_login(ghost, ghost_dev, AS_TOKEN)
    resp = await g.keys_upload()
    result("3i keys_upload (device + 50 OTKs) with as_token + masquerade",
           isinstance(resp, nio.KeysUploadResponse), resp)
    # fallback key: nio has no support; do it with vodozemac through nio's account
    acct = g.olm.account._account
    acct.generate_fallback_key()
    fb = {kid: key.to_base64() for kid, key in acct.fallback_key.items()}
    fallback_keys = {}
    for kid, key in fb.items():
        obj = {"key": key, "fallback": True}
        sig = g.olm.sign_json(obj)
        obj["signatures"] = {ghost: {f"ed25519:{ghost_dev}": sig}}
        fallback_keys[f"signed_curve25519:{kid}"] = obj
    st, body = await call(session, hs, "POST", "/_matrix/client/v3/keys/upload",
                          {"fallback_keys": fallback_keys},
                          params={"user_id": ghost, "device_id": ghost_dev})
    acct.mark_keys_as_published()
    g.olm.save_account()
    result("3j fallback key upload (hand-built, vodozemac generate_fallback_key)",
           st == 200, (st, body, list(fallback_keys)))

    # ---- 4. alice, an ordinary nio user -----------------------------------------------
    await syn.register_user("alice", "pw-alice")
    astore = RUN / "alice-store"
    astore.mkdir(exist_ok=True)
    for f in astore.iterdir():
        f.unlink()
    alice = nio.AsyncClient(hs, f"@alice:{DOMAIN}", store_path=str(astore),
                            config=nio.AsyncClientConfig(encryption_enabled=True,
                                                         store_sync_tokens=False))
    await alice.login("pw-alice", device_name="alice-dev")
    await alice.sync(timeout=0, full_state=True)
    if alice.should_upload_keys:
        await alice.keys_upload()
    n_before = len(TXNS)
    room = await alice.room_create(
        name="spike", invite=[ghost],
        initial_state=[{"type": "m.room.encryption", "state_key": "",
                        "content": {"algorithm": "m.megolm.v1.aes-sha2"}},
                       {"type": "m.room.history_visibility", "state_key": "",
                        "content": {"history_visibility": "invited"}}])
    room_id = room.room_id
    st, body = await call(session, hs, "POST", f"/_matrix/client/v3/join/{quote(room_id)}",
                          {}, params={"user_id": ghost})
    result("4a ghost joins via as_token", st == 200, (st, body))
    await asyncio.sleep(0.5)
    print("TXNS after room setup:", len(TXNS) - n_before, flush=True)
    # alice learns the ghost's devices and sends an encrypted message
    await alice.sync(timeout=0)
    await alice.sync(timeout=0)
    mark = len(TXNS)
    sent = await alice.room_send(room_id, "m.room.message",
                                 {"msgtype": "m.text", "body": "hola fantasma"},
                                 ignore_unverified_devices=True)
    result("4b alice sends encrypted", isinstance(sent, nio.RoomSendResponse), sent)

    def has_todevice(t: dict[str, Any]) -> bool:
        return any(e.get("to_device_id") == ghost_dev
                   for e in t.get("de.sorunome.msc2409.to_device", []))

    def has_event(t: dict[str, Any]) -> bool:
        return any(e.get("event_id") == getattr(sent, "event_id", None)
                   for e in t.get("events", []))

    td_txn = await wait_txn(has_todevice)
    ev_txn = await wait_txn(has_event)
    result("4c transaction carries the Olm to-device event for the ghost device",
           td_txn is not None, "")
    result("4d transaction carries the encrypted room event", ev_txn is not None, "")
    print("== transactions from the send, shortened ==", flush=True)
    for t in TXNS[mark:]:
        print(json.dumps(shape(strip(t)), indent=1), flush=True)
    counts = None
    fbk = None
    dl = None
    for t in TXNS:
        counts = t.get("org.matrix.msc3202.device_one_time_keys_count", counts)
        fbk = t.get("org.matrix.msc3202.device_unused_fallback_key_types", fbk)
        dl = t.get("org.matrix.msc3202.device_lists", dl)
    result("4e OTK counts seen", counts is not None, counts)
    result("4f unused fallback key types seen", fbk is not None, fbk)
    result("4g device_lists seen", dl is not None, dl)

    # ---- 5. feed the ghost's Olm machine, no /sync --------------------------------
    to_dev = [e for t in TXNS for e in t.get("de.sorunome.msc2409.to_device", [])
              if e.get("to_user_id") == ghost and e.get("to_device_id") == ghost_dev]
    for raw in to_dev:
        ev = nio.ToDeviceEvent.parse_event(raw)
        out = g.olm.handle_to_device_event(ev)
        print("to-device", raw.get("type"), "->", type(ev).__name__, "->",
              type(out).__name__ if out else None, flush=True)
    enc = next(e for t in TXNS for e in t.get("events", [])
               if e.get("event_id") == getattr(sent, "event_id", None))
    megolm = nio.Event.parse_event(enc)
    try:
        dec = g.decrypt_event(megolm)
        result("5a ghost decrypts the room event without /sync", getattr(dec, "body", None)
               == "hola fantasma", (type(dec).__name__, getattr(dec, "body", None)))
    except Exception as exc:  # noqa: BLE001
        result("5a ghost decrypts the room event without /sync", False, repr(exc))
    # OTK top-up from the transaction's count
    c = (counts or {}).get(ghost, {}).get(ghost_dev, {}).get("signed_curve25519")
    print("server OTK count for ghost device:", c, flush=True)
    if c is not None:
        g.olm.uploaded_key_count = c
    print("should_upload_keys:", g.should_upload_keys, flush=True)
    if g.should_upload_keys:
        r = await g.keys_upload()
        result("5b OTK top-up after count drop", isinstance(r, nio.KeysUploadResponse), r)

    # ghost replies encrypted without any sync: seed the room as the bridge does
    mroom = nio.MatrixRoom(room_id, ghost, encrypted=True)
    mroom.add_member(ghost, None, None)
    mroom.add_member(f"@alice:{DOMAIN}", None, None)
    g.rooms[room_id] = mroom
    g.olm.update_tracked_users(mroom)
    g.requests_made.clear()
    if g.should_query_keys:
        await g.keys_query()
    # ignore_unverified_devices makes nio claim/share itself
    reply = await g.room_send(room_id, "m.room.message",
                              {"msgtype": "m.text", "body": "hola alice"},
                              ignore_unverified_devices=True)
    result("5c ghost sends encrypted without sync", isinstance(reply, nio.RoomSendResponse),
           (reply, g.requests_made))
    # alice decrypts
    got = None
    for _ in range(5):
        sresp = await alice.sync(timeout=1000)
        if isinstance(sresp, nio.SyncResponse):
            r = sresp.rooms.join.get(room_id)
            for ev in (r.timeline.events if r else []):
                if getattr(ev, "body", None) == "hola alice":
                    got = ev
        if got:
            break
    result("5d alice decrypts the ghost's reply", got is not None, type(got).__name__)

    # ---- 6. OTK exhaustion -------------------------------------------------------
    mark = len(TXNS)
    claimed_fallback = None
    n = 0
    for i in range(60):
        st, body = await call(session, hs, "POST", "/_matrix/client/v3/keys/claim",
                              {"one_time_keys": {ghost: {ghost_dev: "signed_curve25519"}}},
                              token=alice.access_token)
        key = body.get("one_time_keys", {}).get(ghost, {}).get(ghost_dev, {})
        n += 1
        for kid, obj in key.items():
            if isinstance(obj, dict) and obj.get("fallback"):
                claimed_fallback = (i, kid)
        if claimed_fallback:
            break
    result("6a /keys/claim hands out the fallback key once OTKs run out",
           claimed_fallback is not None, (n, claimed_fallback))
    await asyncio.sleep(2)
    result("6b a bare /keys/claim triggers NO transaction (counts not pushed)",
           len(TXNS) == mark, [shape(strip(t)) for t in TXNS[mark:]])
    # any event in the room makes the next transaction carry the ghost's counts
    await alice.room_send(room_id, "m.room.message",
                          {"msgtype": "m.text", "body": "after claims"},
                          ignore_unverified_devices=True)
    t = await wait_txn(lambda t: "org.matrix.msc3202.device_one_time_keys_count" in t
                       and TXNS.index(t) >= mark, timeout=5)
    result("6c the next transaction with a room event carries the new counts",
           t is not None, shape({k: v for k, v in (t or {}).items()
                                 if k.startswith("org.matrix.msc3202")}))
    if t:
        fb_now = t.get("org.matrix.msc3202.device_unused_fallback_key_types", {})
        print("fallback types now:", fb_now, flush=True)

    # ---- 4g' device-list change: alice logs in a second device ----------------------
    mark = len(TXNS)
    alice2 = nio.AsyncClient(hs, f"@alice:{DOMAIN}", store_path=str(astore),
                             config=nio.AsyncClientConfig(encryption_enabled=True,
                                                          store_sync_tokens=False))
    await alice2.login("pw-alice", device_name="alice-second")
    await alice2.keys_upload()
    t = await wait_txn(lambda t: TXNS.index(t) >= mark and "org.matrix.msc3202.device_lists"
                       in t, timeout=8)
    result("4h a new device of a room member shows in device_lists.changed",
           t is not None, (t or {}).get("org.matrix.msc3202.device_lists"))
    await alice2.close()

    # ---- 7. idle: the ghost makes no requests ------------------------------------
    g.requests_made.clear()
    mark = len(TXNS)
    await asyncio.sleep(20)
    result("7 ghost idle 20 s: requests to Synapse", not g.requests_made,
           (len(g.requests_made), "txns", len(TXNS) - mark))

    # ---- 8. a fresh client from the same store (restart) decrypts a new message ----
    await g.close()
    g2 = ASClient(hs, ghost, ghost_dev, store_path=str(store), config=gcfg)
    g2.restore_login(ghost, ghost_dev, AS_TOKEN)
    mark = len(TXNS)
    sent2 = await alice.room_send(room_id, "m.room.message",
                                  {"msgtype": "m.text", "body": "tras reinicio"},
                                  ignore_unverified_devices=True)
    t = await wait_txn(lambda t: any(e.get("event_id") == sent2.event_id
                                     for e in t.get("events", [])))
    for tt in TXNS[mark:]:
        for raw in tt.get("de.sorunome.msc2409.to_device", []):
            if raw.get("to_device_id") == ghost_dev:
                g2.olm.handle_to_device_event(nio.ToDeviceEvent.parse_event(raw))
    enc2 = next(e for tt in TXNS[mark:] for e in tt.get("events", [])
                if e["event_id"] == sent2.event_id)
    try:
        d2 = g2.decrypt_event(nio.Event.parse_event(enc2))
        result("8 reopened client decrypts (same Megolm session, no new to-device)",
               getattr(d2, "body", None) == "tras reinicio",
               (getattr(d2, "body", None), "to-device in between:",
                sum(len(tt.get("de.sorunome.msc2409.to_device", [])) for tt in TXNS[mark:])))
    except Exception as exc:  # noqa: BLE001
        result("8 reopened client decrypts", False, repr(exc))
    print("requests made by reopened ghost client:", g2.requests_made, flush=True)

    # ---- 9. a new Olm session made from the FALLBACK key decrypts; then replace it ---
    # The ghost's OTKs are exhausted (step 6); alice's new device must use the fallback.
    astore3 = RUN / "alice3-store"
    astore3.mkdir(exist_ok=True)
    for f in astore3.iterdir():
        f.unlink()
    alice3 = nio.AsyncClient(hs, f"@alice:{DOMAIN}", store_path=str(astore3),
                             config=nio.AsyncClientConfig(encryption_enabled=True,
                                                          store_sync_tokens=False))
    await alice3.login("pw-alice", device_name="alice-third")
    await alice3.sync(timeout=0, full_state=True)
    await alice3.keys_upload()
    await alice3.sync(timeout=0)
    mark = len(TXNS)
    sent3 = await alice3.room_send(room_id, "m.room.message",
                                   {"msgtype": "m.text", "body": "via fallback"},
                                   ignore_unverified_devices=True)
    await wait_txn(lambda t: any(e.get("event_id") == getattr(sent3, "event_id", None)
                                 for e in t.get("events", [])))
    types = []
    for tt in TXNS[mark:]:
        for raw in tt.get("de.sorunome.msc2409.to_device", []):
            if raw.get("to_device_id") == ghost_dev:
                body = raw["content"]["ciphertext"].get(g2.olm.account.identity_keys["curve25519"], {})
                types.append(body.get("type"))
                out = g2.olm.handle_to_device_event(nio.ToDeviceEvent.parse_event(raw))
                print("fallback-path to-device ->", type(out).__name__, flush=True)
    enc3 = next((e for tt in TXNS[mark:] for e in tt.get("events", [])
                 if e["event_id"] == getattr(sent3, "event_id", None)), None)
    try:
        d3 = g2.decrypt_event(nio.Event.parse_event(enc3))
        result("9a pre-key message built on the fallback key decrypts in nio",
               getattr(d3, "body", None) == "via fallback", (getattr(d3, "body", None),
                                                             "olm msg types", types))
    except Exception as exc:  # noqa: BLE001
        result("9a pre-key message built on the fallback key decrypts in nio", False, repr(exc))
    fb_seen = [tt.get("org.matrix.msc3202.device_unused_fallback_key_types", {}).get(ghost)
               for tt in TXNS[mark:]]
    print("unused fallback types in those txns:", fb_seen, flush=True)
    acct = g2.olm.account._account
    acct.generate_fallback_key()
    fallback_keys = {}
    for kid, key in acct.fallback_key.items():
        obj = {"key": key.to_base64(), "fallback": True}
        obj["signatures"] = {ghost: {f"ed25519:{ghost_dev}": g2.olm.sign_json(obj)}}
        fallback_keys[f"signed_curve25519:{kid}"] = obj
    st, body = await call(session, hs, "POST", "/_matrix/client/v3/keys/upload",
                          {"fallback_keys": fallback_keys},
                          params={"user_id": ghost, "device_id": ghost_dev})
    acct.mark_keys_as_published()
    g2.olm.save_account()
    mark = len(TXNS)
    await alice.room_send(room_id, "m.room.message", {"msgtype": "m.text", "body": "x"},
                          ignore_unverified_devices=True)
    t = await wait_txn(lambda t: TXNS.index(t) >= mark and
                       "org.matrix.msc3202.device_unused_fallback_key_types" in t, timeout=5)
    result("9b new fallback key uploaded, reported unused again",
           (st == 200) and t is not None,
           (st, list(fallback_keys), (t or {}).get(
               "org.matrix.msc3202.device_unused_fallback_key_types", {}).get(ghost)))
    await alice3.close()
    await g2.close()
    await alice.close()


if __name__ == "__main__":
    asyncio.run(main())
