"""The key lifecycle end to end: real Synapse, the Cloud API simulator, E2EE staff.

A bridge of its own (its own database, crypto state, keys and namespace prefix) takes
the session's appservice port for the test. It first meets crypto state as a version
before the store key left it (locked with a passphrase derived from the data key, no
store key in the database), then has both privacy keys rotated as docs/keys.md says: old keys moved
to `previous_*`, `civic-bridge rekey`, old keys removed. After each restart the ghost's
existing device still encrypts to staff, the citizen is found by phone number and routed
to the same portal, held messages still go out, and the audit chain verifies.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import os
import secrets
import string
import sys
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from nio.crypto import InboundGroupSession, OlmAccount, OutboundGroupSession, Session
from sqlalchemy import select

from bridge.config import Config, load_config
from bridge.db.models import (
    CryptoAccountRow,
    CryptoMegolmInboundRow,
    CryptoMegolmOutboundRow,
    CryptoOlmSessionRow,
)
from bridge.matrix.storekey import STORE_KEY
from bridge.privacy import AAD_STORE_KEY, Cipher
from bridge.types import UserID
from tests.fixtures.bridge import BridgeHarness, RunningBridge
from tests.integration.test_whatsapp import Journey, body_is, new_citizen, opt_in, to_citizen

pytestmark = pytest.mark.integration

IBAN = "Para la rotación, la cuenta es ES91 2100 0418 4502 0005 1332."


def _key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


def _previous_version_passphrase(data_key: str) -> str:
    """How the previous version locked the nio stores (bridge/matrix/devices.py then)."""
    raw = base64.b64decode(data_key)
    return hashlib.sha256(b"civic-bridge nio pickle\0" + raw).hexdigest()


async def _relock_stores(url: str, old: str, new: str) -> int:
    """Re-pickle every device's crypto state in the database (revision 0016: no more
    files) from passphrase `old` to `new`; how many devices."""
    from bridge.db import Database

    pickles: list[tuple[Any, Callable[[bytes], Any]]] = [
        (CryptoAccountRow, lambda p: OlmAccount.from_pickle(p, old)),
        (CryptoOlmSessionRow, lambda p: Session.from_pickle(p, datetime.now(), old)),
        (CryptoMegolmInboundRow,
         lambda p: InboundGroupSession.from_pickle(p, "", "", "", old)),
        (CryptoMegolmOutboundRow, lambda p: OutboundGroupSession.from_pickle(p, old)),
    ]
    db = await Database.open(url)
    try:
        async with db.session() as session:
            for model, load in pickles:
                for row in await session.scalars(select(model)):
                    row.pickle = load(row.pickle.encode()).pickle(new).decode()
            return len((await session.scalars(select(CryptoAccountRow))).all())
    finally:
        await db.close()


def _write(path: Path, raw: dict[str, Any]) -> Config:
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return load_config(path)


async def _device_keys(h: BridgeHarness, token: str, user_id: str) -> dict[str, Any]:
    """{device id: its public keys} of `user_id`, as the homeserver gives them to staff."""
    async with aiohttp.ClientSession() as http, http.post(
            f"{h.synapse.synapse.url}/_matrix/client/v3/keys/query",
            json={"device_keys": {user_id: []}},
            headers={"Authorization": f"Bearer {token}"}) as resp:
        assert resp.status == 200
        body = await resp.json()
    return {d: v["keys"] for d, v in body["device_keys"].get(user_id, {}).items()}


async def _cli(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bridge", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


class Rotation:
    """The test's own bridge and what it must keep across restarts."""

    def __init__(self, h: BridgeHarness, path: Path, raw: dict[str, Any]) -> None:
        self.h = h
        self.path = path
        self.raw = raw
        self.journey: Journey | None = None
        self.ghost = UserID("")
        self.devices: dict[str, Any] = {}
        self.pseudonym = ""

    @property
    def running(self) -> RunningBridge:
        return self.h.running

    async def restart(self, privacy: dict[str, Any] | None = None) -> None:
        await self.running.stop()
        if privacy is not None:
            self.raw["privacy"] = privacy
            self.running.config = _write(self.path, self.raw)
        await self.running.start()

    async def still_works(self, text: str) -> Any:
        """A new message reaches staff in the same portal, encrypted by the ghost's device
        from before (no new device, no new keys); the citizen is found by phone number."""
        j = self.journey
        assert j is not None
        await j.write(self.h.wa.text_message(j.citizen, text))
        event = await j.seen(body_is(text), timeout=60)
        assert event.sender == self.ghost and event.decrypted
        keys = self.devices[self.ghost]
        assert event.sender_key in {k[f"curve25519:{d}"] for d, k in keys.items()}
        for user_id, before in self.devices.items():
            assert await _device_keys(self.h, j.desk.client.access_token, user_id) == before
        status, body = await self.running.call("POST", "/admin/v1/citizens/lookup", {
            "phone": f"+{j.citizen.wa_id}", "reason": "prueba de rotación de claves"})
        assert status == 200, body
        assert [c["pseudonym"] for c in body["citizens"]] == [self.pseudonym]
        b = self.running.bridge
        citizen = await b.db.citizens.by_index(b.privacy.index.digest(j.citizen.user_id))
        assert citizen is not None and citizen.pseudonym_code == self.pseudonym
        portal = await b.db.rooms.portal_for(citizen.id)
        assert portal is not None and portal.room_id == j.room_id
        return event


async def test_rotating_both_privacy_keys_keeps_e2ee_look_ups_and_the_audit_chain(
        bridge: BridgeHarness, blank_db_url: str, tmp_path: Path) -> None:
    session = bridge.running
    raw = session.config.model_dump(mode="json")
    prefix = raw["appservice"]["ghost_prefix"] + "".join(
        secrets.choice(string.ascii_lowercase) for _ in range(4)) + "_"
    raw["appservice"] |= {"ghost_prefix": prefix, "store_dir": str(tmp_path / "store")}
    raw["database"]["url"] = blank_db_url
    old_data, old_index = _key(), _key()
    raw["privacy"] |= {"data_key": old_data, "index_key": old_index,
                       "previous_data_keys": [], "previous_index_keys": []}
    path = tmp_path / "config.yaml"
    mine = RunningBridge(_write(path, raw))
    r = Rotation(dataclasses.replace(bridge, running=mine), path, raw)
    await session.stop()
    try:
        await mine.start()
        j = r.journey = await opt_in(r.h, new_citizen(), "Hola, antes de rotar las claves")
        await j.seen(body_is("Hola, antes de rotar las claves"))
        await j.desk.send_text(j.room_id, "Le respondemos antes de rotar")
        await j.sent_to_citizen(lambda s: s.get("text", {}).get("body")
                                == "Le respondemos antes de rotar")
        held = await j.desk.send_text(j.room_id, IBAN)  # held: sealed in kv
        await j.seen(lambda ev: getattr(ev, "body", "").startswith("Retenido"))
        b = mine.bridge
        citizen = await b.db.citizens.by_index(b.privacy.index.digest(j.citizen.user_id))
        assert citizen is not None and citizen.ghost_user_id is not None
        r.ghost, r.pseudonym = citizen.ghost_user_id, citizen.pseudonym_code
        token = j.desk.client.access_token
        r.devices = {u: await _device_keys(r.h, token, u) for u in (r.ghost, b.ghosts.bot)}
        assert all(r.devices.values())

        # 1. The stores as the previous version left them: locked with a passphrase
        # derived from the data key, and no store key in the database.
        await mine.stop()
        store_key = Cipher(base64.b64decode(old_data)).decrypt(
            str(await _kv(blank_db_url, STORE_KEY)), aad=AAD_STORE_KEY)
        assert await _relock_stores(blank_db_url, store_key.hex(),
                                    _previous_version_passphrase(old_data)) >= 2
        await _kv(blank_db_url, STORE_KEY, delete=True)
        await mine.start()
        await r.still_works("después de actualizar")

        # 2. Both keys rotated, the old ones kept as previous: still works before rekey.
        new_data, new_index = _key(), _key()
        await r.restart({**raw["privacy"], "data_key": new_data, "index_key": new_index,
                         "previous_data_keys": [old_data],
                         "previous_index_keys": [old_index]})
        await r.still_works("durante la rotación")

        # 3. rekey with the bridge stopped, then the old keys removed.
        await mine.stop()
        code, out, err = await _cli("rekey", "-c", str(path))
        assert code == 0, (out, err)
        counts = dict(line.rsplit(": ", 1) for line in out.splitlines() if ": " in line)
        for kind in ("citizen identifiers", "room keys", "cross-signing seeds",
                     "held staff messages", "inbound queue", "outbox", "E2EE store key"):
            assert int(counts[kind]) >= 1, (kind, out)
        assert "can be removed" in out
        await r.restart({**raw["privacy"], "previous_data_keys": [],
                         "previous_index_keys": []})
        await r.still_works("después de rotar las claves")

        # Held before the rotation, released after it.
        await j.desk.client.room_send(j.room_id, "m.reaction", {"m.relates_to": {
            "rel_type": "m.annotation", "event_id": held, "key": "✅"}},
            ignore_unverified_devices=True)
        await j.sent_to_citizen(lambda s: to_citizen(s, j.citizen)
                                and s.get("text", {}).get("body") == IBAN)
        status, chain = await mine.call("GET", "/admin/v1/audit/verify")
        assert status == 200 and chain == {"intact": True, "first_bad_id": None}
        code, out, err = await _cli("admin", "-c", str(path), "audit", "verify")
        assert code == 0, (out, err)
        entries = (await mine.call("GET", "/admin/v1/audit?limit=200"))[1]["entries"]
        assert [(e["actor"], e["result"]) for e in entries
                if e["action"] == "privacy.rekey"] == [("cli", "ok")]
    finally:
        await mine.stop()
        if r.journey is not None:
            await r.journey.desk.close()
        await session.start()


async def _kv(url: str, key: str, delete: bool = False) -> str | None:
    """Read (or delete) a kv row straight in the database, as an operator would."""
    from bridge.db import Database

    db = await Database.open(url)
    try:
        if delete:
            await db.kv.delete(key)
            return None
        return await db.kv.get(key)
    finally:
        await db.close()
