"""SPIKE part 2: nio's Olm machine on a DB-backed, journaled store (no files), eviction and
re-open with no HTTP, persisted outbound Megolm session, and the start-up probe.

Run:  .venv/bin/python docs/design/spike16/spike2.py

The "bridge DB" is SQLite through SQLAlchemy 2 async (aiosqlite), one generic table
crypto_rows(owner, kind, key, value) — the real design has one table per kind (16-design.md
§5.1), the mechanism is the same: load a snapshot asynchronously, hand nio a store that
answers from memory and journals every write, flush the journal with `await`.
"""

from __future__ import annotations

import asyncio
import base64
import json
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

sys.path.insert(0, "/work/main")
sys.path.insert(0, str(Path(__file__).parent))

import aiohttp
import nio
import yaml
from aiohttp import web
from nio.crypto import (DeviceStore, GroupSessionStore, InboundGroupSession, Olm, OlmAccount,
                        OlmDevice, OutboundGroupSession, OutgoingKeyRequest, Session,
                        SessionStore, TrustState)
from nio.store.database import MatrixStore
from sqlalchemy import Column, MetaData, String, Table, Text, delete, select
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import create_async_engine

import spike as s1
from bridge.devtools.synapse import free_port

RUN = Path(__file__).parent / "run2"
PICKLE_KEY = "spike-pickle-key"

meta = MetaData()
rows_t = Table("crypto_rows", meta,
               Column("owner", String, primary_key=True),
               Column("kind", String, primary_key=True),
               Column("key", String, primary_key=True),
               Column("value", Text, nullable=False))


def b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def unb64(s: str) -> bytes:
    return base64.b64decode(s)


class CryptoRepo:
    def __init__(self, url: str) -> None:
        self.engine = create_async_engine(url)

    async def create(self) -> None:
        async with self.engine.begin() as conn:
            await conn.run_sync(meta.create_all)

    async def snapshot(self, owner: str) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        async with self.engine.connect() as conn:
            for r in await conn.execute(select(rows_t).where(rows_t.c.owner == owner)):
                out.setdefault(r.kind, {})[r.key] = json.loads(r.value)
        return out

    async def flush(self, owner: str, journal: dict[tuple[str, str], Any]) -> int:
        if not journal:
            return 0
        async with self.engine.begin() as conn:  # one transaction
            for (kind, key), value in journal.items():
                if value is None:
                    await conn.execute(delete(rows_t).where(
                        (rows_t.c.owner == owner) & (rows_t.c.kind == kind) & (rows_t.c.key == key)))
                else:
                    stmt = sqlite_insert(rows_t).values(owner=owner, kind=kind, key=key,
                                                        value=json.dumps(value))
                    await conn.execute(stmt.on_conflict_do_update(
                        index_elements=["owner", "kind", "key"], set_={"value": stmt.excluded.value}))
        n = len(journal)
        journal.clear()
        return n


@dataclass
class JournalStore(MatrixStore):
    """nio MatrixStore answering from a snapshot and journaling writes; no file, no I/O."""

    snapshot: dict[str, dict[str, Any]] = field(default_factory=dict)
    journal: dict[tuple[str, str], Any] = field(default_factory=dict)

    def __post_init__(self) -> None:  # no peewee database
        pass

    def _put(self, kind: str, key: str, value: Any) -> None:
        self.snapshot.setdefault(kind, {})[key] = value
        self.journal[(kind, key)] = value

    # account
    def load_account(self) -> OlmAccount | None:
        row = self.snapshot.get("account", {}).get("")
        if row is None:
            return None
        return OlmAccount.from_pickle(unb64(row["pickle"]), self.pickle_key, row["shared"])

    def save_account(self, account: OlmAccount) -> None:
        self._put("account", "", {"pickle": b64(account.pickle(self.pickle_key)),
                                  "shared": account.shared})

    # olm sessions
    def load_sessions(self) -> SessionStore:
        store = SessionStore()
        for row in self.snapshot.get("olm", {}).values():
            sess = Session.from_pickle(unb64(row["pickle"]),
                                       datetime.fromisoformat(row["created"]), self.pickle_key)
            store.add(row["sender_key"], sess)
        return store

    def save_session(self, curve_key: str, session: Session) -> None:
        self._put("olm", session.id, {"sender_key": curve_key,
                                      "pickle": b64(session.pickle(self.pickle_key)),
                                      "created": session.creation_time.isoformat()})

    # inbound megolm
    def load_inbound_group_sessions(self) -> GroupSessionStore:
        store = GroupSessionStore()
        for row in self.snapshot.get("inbound", {}).values():
            store.add(InboundGroupSession.from_pickle(
                unb64(row["pickle"]), row["ed25519"], row["sender_key"], row["room_id"],
                self.pickle_key, row["chain"]))
        return store

    def save_inbound_group_session(self, session: InboundGroupSession) -> None:
        self._put("inbound", session.id, {
            "pickle": b64(session.pickle(self.pickle_key)), "ed25519": session.ed25519,
            "sender_key": session.sender_key, "room_id": session.room_id,
            "chain": list(session.forwarding_chain)})

    # device keys (shared directory in the real design)
    def load_device_keys(self) -> DeviceStore:
        store = DeviceStore()
        for row in self.snapshot.get("device", {}).values():
            dev = OlmDevice(row["user_id"], row["device_id"], row["keys"],
                            display_name=row["display_name"], deleted=row["deleted"])
            dev.trust_state = TrustState(row.get("trust", TrustState.unset.value))
            store.add(dev)
        return store

    def save_device_keys(self, device_keys: dict[str, dict[str, OlmDevice]]) -> None:
        for user_id, devices in device_keys.items():
            for device_id, d in devices.items():
                self._put("device", f"{user_id}|{device_id}", {
                    "user_id": user_id, "device_id": device_id, "keys": d.keys,
                    "display_name": d.display_name, "deleted": d.deleted,
                    "trust": d.trust_state.value})

    def _trust(self, device: OlmDevice, state: TrustState) -> bool:
        device.trust_state = state
        self.save_device_keys({device.user_id: {device.id: device}})
        return True

    def blacklist_device(self, device): return self._trust(device, TrustState.blacklisted)
    def unblacklist_device(self, device): return self._trust(device, TrustState.unset)
    def verify_device(self, device): return self._trust(device, TrustState.verified)
    def unverify_device(self, device): return self._trust(device, TrustState.unset)
    def ignore_device(self, device): return self._trust(device, TrustState.ignored)
    def unignore_device(self, device): return self._trust(device, TrustState.unset)

    def ignore_devices(self, devices) -> None:
        for d in devices:
            self._trust(d, TrustState.ignored)

    def is_device_verified(self, device): return device.trust_state == TrustState.verified
    def is_device_blacklisted(self, device): return device.trust_state == TrustState.blacklisted
    def is_device_ignored(self, device): return device.trust_state == TrustState.ignored

    # rooms, key requests, sync token
    def load_encrypted_rooms(self):
        return set(self.snapshot.get("room", {}))

    def save_encrypted_rooms(self, rooms) -> None:
        for r in rooms:
            self._put("room", r, True)

    def delete_encrypted_room(self, room: str) -> None:
        self.snapshot.get("room", {}).pop(room, None)
        self.journal[("room", room)] = None

    def load_outgoing_key_requests(self):
        @dataclass
        class Row:
            request_id: str
            session_id: str
            room_id: str
            algorithm: str
        return {k: OutgoingKeyRequest.from_database(Row(**v))
                for k, v in self.snapshot.get("keyreq", {}).items()}

    def add_outgoing_key_request(self, kr: OutgoingKeyRequest) -> None:
        self._put("keyreq", kr.request_id, {"request_id": kr.request_id,
                                             "session_id": kr.session_id,
                                             "room_id": kr.room_id, "algorithm": kr.algorithm})

    def remove_outgoing_key_request(self, kr: OutgoingKeyRequest) -> None:
        self.snapshot.get("keyreq", {}).pop(kr.request_id, None)
        self.journal[("keyreq", kr.request_id)] = None

    def save_sync_token(self, token: str) -> None:
        pass

    def load_sync_token(self):
        return None

    # NOT in nio's store: outbound Megolm sessions (called by the bridge)
    def save_outbound(self, room_id: str, s: OutboundGroupSession) -> None:
        self._put("outbound", room_id, {
            "pickle": b64(s.pickle(self.pickle_key)), "created": s.creation_time.isoformat(),
            "count": s.message_count, "shared": s.shared,
            "with": sorted(map(list, s.users_shared_with)),
            "ignored": sorted(map(list, s.users_ignored))})

    def restore_outbound(self, olm: Olm) -> int:
        n = 0
        for room_id, row in self.snapshot.get("outbound", {}).items():
            s = OutboundGroupSession.from_pickle(unb64(row["pickle"]), self.pickle_key)
            s.creation_time = datetime.fromisoformat(row["created"])
            s.message_count = row["count"]
            s.shared = row["shared"]
            s.users_shared_with = {tuple(x) for x in row["with"]}
            s.users_ignored = {tuple(x) for x in row["ignored"]}
            olm.outbound_group_sessions[room_id] = s
            n += 1
        return n


def open_machine(hs: str, user: str, dev: str, snapshot: dict[str, Any]) -> tuple[s1.ASClient, JournalStore]:
    cfg = nio.AsyncClientConfig(encryption_enabled=True, store_sync_tokens=False,
                                pickle_key=PICKLE_KEY)
    client = s1.ASClient(hs, user, dev, store_path="", config=cfg)
    client.restore_login(user, dev, s1.AS_TOKEN)  # load_store returns early: no store_path
    assert client.olm is None
    store = JournalStore(user, dev, "", PICKLE_KEY, snapshot=snapshot)
    client.store = store
    client.olm = Olm(user, dev, store)      # creates + journals a new account if none
    client.encrypted_rooms = store.load_encrypted_rooms()
    return client, store


async def main() -> None:
    RUN.mkdir(parents=True, exist_ok=True)
    for f in ("transactions.jsonl", "bridge.db"):
        (RUN / f).unlink(missing_ok=True)
    s1.RUN = RUN
    as_port, hs_port = free_port(), free_port()
    reg = {"id": "spike16b", "url": f"http://127.0.0.1:{as_port}", "as_token": s1.AS_TOKEN,
           "hs_token": s1.HS_TOKEN, "sender_localpart": "spk_sender", "rate_limited": False,
           "receive_ephemeral": True, "org.matrix.msc3202": True, "io.element.msc4190": True,
           "namespaces": {"users": [{"exclusive": True, "regex": "@spk_.*:localhost"}],
                          "aliases": [], "rooms": []}}
    (RUN / "registration.yaml").write_text(yaml.safe_dump(reg))
    import shutil
    shutil.rmtree(RUN / "synapse", ignore_errors=True)
    syn = s1.SpikeSynapse(RUN / "synapse", registration_files=[RUN / "registration.yaml"],
                          port=hs_port, access_log=RUN / "synapse-access.log")
    app = web.Application()
    app.router.add_put("/_matrix/app/v1/transactions/{txn}", s1.on_txn)
    app.router.add_route("*", "/{tail:.*}", s1.on_other)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", as_port).start()
    await syn.start()
    session = aiohttp.ClientSession()
    repo = CryptoRepo(f"sqlite+aiosqlite:///{RUN / 'bridge.db'}")
    await repo.create()
    try:
        await steps(syn, syn.url, session, repo)
    finally:
        await session.close()
        await syn.stop()
        await runner.cleanup()


async def steps(syn, hs: str, session: aiohttp.ClientSession, repo: CryptoRepo) -> None:
    R = s1.result
    ghost, dev = "@spk_ghost:localhost", "SPKGHOSTDEV"
    await s1.call(session, hs, "POST", "/_matrix/client/v3/register",
                  {"type": "m.login.application_service", "username": "spk_ghost",
                   "inhibit_login": True})
    await s1.call(session, hs, "PUT", f"/_matrix/client/v3/devices/{dev}", {},
                  params={"user_id": ghost})

    # A. new device on the journal store; keys up; flush
    g, st = open_machine(hs, ghost, dev, await repo.snapshot(ghost))
    r = await g.keys_upload()
    n = await repo.flush(ghost, st.journal)
    R("A new account on JournalStore, keys uploaded, journal flushed",
      isinstance(r, nio.KeysUploadResponse), f"{n} rows")

    # B. start-up probe: to-device to our own device comes back with our counts
    nonce = str(time.time())
    st_, body = await s1.call(session, hs, "PUT",
                              f"/_matrix/client/v3/sendToDevice/io.civic-bridge.probe/p{nonce}",
                              {"messages": {ghost: {dev: {"nonce": nonce}}}},
                              params={"user_id": ghost, "device_id": dev})
    t = await s1.wait_txn(lambda t: any(e.get("content", {}).get("nonce") == nonce
                                        for e in t.get("de.sorunome.msc2409.to_device", [])))
    R("B probe: self to-device arrives in a transaction", t is not None, (st_, body))
    counts = (t or {}).get("org.matrix.msc3202.device_one_time_keys_count", {})
    R("B probe: same transaction carries our OTK count (MSC3202 on)",
      dev in counts.get(ghost, {}), counts.get(ghost))
    probe_ev = next(e for e in t["de.sorunome.msc2409.to_device"]
                    if e["content"].get("nonce") == nonce)
    print("probe event shape:", json.dumps(probe_ev), flush=True)

    # C. alice's message decrypts; inbound session + olm session reach the DB
    await syn.register_user("alice", "pw")
    astore = RUN / "alice-store"
    shutil_rm(astore)
    alice = nio.AsyncClient(hs, "@alice:localhost", store_path=str(astore),
                            config=nio.AsyncClientConfig(encryption_enabled=True,
                                                         store_sync_tokens=False))
    await alice.login("pw", device_name="alice")
    await alice.sync(timeout=0, full_state=True)
    await alice.keys_upload()
    room = await alice.room_create(invite=[ghost], initial_state=[
        {"type": "m.room.encryption", "state_key": "",
         "content": {"algorithm": "m.megolm.v1.aes-sha2"}}])
    rid = room.room_id
    await s1.call(session, hs, "POST", f"/_matrix/client/v3/join/{quote(rid)}", {},
                  params={"user_id": ghost})
    await alice.sync(timeout=0)
    sent = await alice.room_send(rid, "m.room.message", {"msgtype": "m.text", "body": "uno"},
                                 ignore_unverified_devices=True)
    await s1.wait_txn(lambda t: any(e.get("event_id") == sent.event_id for e in t["events"]))
    for t in s1.TXNS:
        for raw in t.get("de.sorunome.msc2409.to_device", []):
            if raw.get("to_device_id") == dev and raw["type"] == "m.room.encrypted":
                g.olm.handle_to_device_event(nio.ToDeviceEvent.parse_event(raw))
    enc = next(e for t in s1.TXNS for e in t["events"] if e["event_id"] == sent.event_id)
    d = g.decrypt_event(nio.Event.parse_event(enc))
    kinds = sorted({k for k, _ in st.journal})
    n = await repo.flush(ghost, st.journal)
    R("C decrypt on JournalStore; journal → DB", getattr(d, "body", None) == "uno",
      (kinds, n))

    # D. ghost sends (shares a new Megolm session), outbound session persisted by us
    mroom = nio.MatrixRoom(rid, ghost, encrypted=True)
    mroom.add_member(ghost, None, None)
    mroom.add_member("@alice:localhost", None, None)
    mroom.members_synced = True
    g.rooms[rid] = mroom
    g.olm.update_tracked_users(mroom)
    g.requests_made.clear()
    if g.should_query_keys:
        await g.keys_query()
    r1 = await g.room_send(rid, "m.room.message", {"msgtype": "m.text", "body": "dos"},
                           ignore_unverified_devices=True)
    st.save_outbound(rid, g.olm.outbound_group_sessions[rid])
    await repo.flush(ghost, st.journal)
    R("D first send from the ghost", isinstance(r1, nio.RoomSendResponse),
      [x.split(" ", 1)[1].split("?")[0][:60] for x in g.requests_made])
    await g.close()
    del g, st

    # E. evicted → re-opened from the DB only; send again: ONLY the PUT /send
    g2, st2 = open_machine(hs, ghost, dev, await repo.snapshot(ghost))
    restored = st2.restore_outbound(g2.olm)
    # nio keeps tracked_users in memory only; the design persists it (crypto_tracked_user).
    # Here: every user whose devices are in the store was tracked.
    g2.olm.tracked_users = set(g2.olm.device_store.users)
    mroom2 = nio.MatrixRoom(rid, ghost, encrypted=True)   # from room_members table in the design
    mroom2.add_member(ghost, None, None)
    mroom2.add_member("@alice:localhost", None, None)
    mroom2.members_synced = True
    g2.rooms[rid] = mroom2
    g2.olm.update_tracked_users(mroom2)
    g2.requests_made.clear()
    print("after reopen: users_for_key_query", g2.olm.users_for_key_query, "should_query_keys", g2.should_query_keys, "should_claim",
          g2.should_claim_keys, "should_share", g2.olm.should_share_group_session(rid),
          "should_upload", g2.should_upload_keys, flush=True)
    r2 = await g2.room_send(rid, "m.room.message", {"msgtype": "m.text", "body": "tres"},
                            ignore_unverified_devices=True)
    st2.save_outbound(rid, g2.olm.outbound_group_sessions[rid])
    await repo.flush(ghost, st2.journal)
    R("E re-opened machine sends with exactly one request (PUT /send)",
      isinstance(r2, nio.RoomSendResponse) and len(g2.requests_made) == 1,
      (restored, [x.split(" ", 1)[1].split("?")[0][:60] for x in g2.requests_made]))

    # F. alice decrypts "dos" and "tres" (same session, no re-share)
    got = set()
    for _ in range(4):
        resp = await alice.sync(timeout=1000)
        if isinstance(resp, nio.SyncResponse) and rid in resp.rooms.join:
            for ev in resp.rooms.join[rid].timeline.events:
                if isinstance(ev, nio.RoomMessageText):
                    got.add(ev.body)
        if {"dos", "tres"} <= got:
            break
    R("F alice decrypts both ghost messages", {"dos", "tres"} <= got, sorted(got))

    # G. alice sends again: the re-opened machine decrypts from the DB inbound session
    mark = len(s1.TXNS)
    sent2 = await alice.room_send(rid, "m.room.message", {"msgtype": "m.text", "body": "cuatro"},
                                  ignore_unverified_devices=True)
    await s1.wait_txn(lambda t: any(e.get("event_id") == sent2.event_id for e in t["events"]))
    todev = sum(len(t.get("de.sorunome.msc2409.to_device", [])) for t in s1.TXNS[mark:])
    enc2 = next(e for t in s1.TXNS[mark:] for e in t["events"] if e["event_id"] == sent2.event_id)
    d2 = g2.decrypt_event(nio.Event.parse_event(enc2))
    R("G re-opened machine decrypts with the DB inbound session",
      getattr(d2, "body", None) == "cuatro", ("to-device in between", todev))
    async with repo.engine.connect() as conn:
        kinds = (await conn.execute(select(rows_t.c.kind, rows_t.c.key))).all()
    print("DB rows:", sorted({k for k, _ in kinds}), len(kinds), flush=True)
    await g2.close()
    await alice.close()


def shutil_rm(p: Path) -> None:
    import shutil
    shutil.rmtree(p, ignore_errors=True)
    p.mkdir(parents=True)


if __name__ == "__main__":
    asyncio.run(main())
