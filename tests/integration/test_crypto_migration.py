"""A ghost's nio file store written by the previous version (main at e40f014, its
`bridge` package kept in tests/data and run in a subprocess) moves into the database, on
SQLite and PostgreSQL: the device keeps its identity and sessions, decrypts what staff sent
before and after, and sends what staff decrypt, with no new keys uploaded.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import sys
import tarfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import nio
import pytest
import pytest_asyncio
from nio.crypto import TrustState

from bridge.db import Database
from bridge.devtools.synapse import LocalSynapse, free_port
from bridge.matrix.api import MatrixAPI
from bridge.matrix.crypto.legacy import MIGRATED, LegacyStores
from bridge.matrix.devices import Devices
from bridge.registration import registration_yaml
from bridge.types import DeviceID, RoomID, UserID
from tests.fixtures.staff import StaffClient, staff_client
from tests.fixtures.synapse import SynapseHarness, build_test_config, other_free_port

pytestmark = pytest.mark.integration


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def synapse(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[SynapseHarness]:
    """A Synapse of this module's own, with nothing on the appservice port: the
    session's bridge (started by other modules' tests and kept for the session) would
    otherwise get this test's transactions and the invite of its ghost, which is in the
    same namespace but not in that bridge's database."""
    workdir = tmp_path_factory.mktemp("migration")
    hs_port = free_port()
    config = build_test_config(f"http://127.0.0.1:{hs_port}", other_free_port(hs_port),
                               workdir)
    registration = workdir / "registration.yaml"
    registration.write_text(registration_yaml(config), encoding="utf-8")
    server = LocalSynapse(workdir / "synapse", server_name="localhost",
                          registration_files=[registration], port=hs_port)
    await server.start()
    try:
        yield SynapseHarness(server, config, workdir, registration)
    finally:
        await server.stop()


PREVIOUS = "e40f014"  # the last commit with per-device file stores
PREVIOUS_ARCHIVE = Path(__file__).parent.parent / "data" / f"bridge-{PREVIOUS}.tar.gz"
PASSPHRASE = "ab" * 32

# Run with the previous version's `bridge` package: opens the ghost's device the way
# that version did (file store under store_dir), takes the room key staff sent with
# one /sync, answers in the room, closes.
OLD_DEVICE = """
import asyncio, json, sys
from pathlib import Path
import aiohttp
import bridge
from bridge.matrix.api import MatrixAPI
from bridge.matrix.devices import Devices
from bridge.types import DeviceID, RoomID, UserID

async def main(hs, as_token, store_dir, passphrase, user, device, room):
    async with aiohttp.ClientSession() as http:
        api = MatrixAPI(http, hs, as_token)
        devices = Devices(api, Path(store_dir), passphrase)
        d = await devices.open(UserID(user), DeviceID(device))
        keys = d.client.olm.account.identity_keys
        print(json.dumps({"curve25519": keys["curve25519"], "from": bridge.__file__}),
              flush=True)
        sys.stdin.readline()  # staff has sent its message
        await d.upkeep()
        sent = await d.send(api, RoomID(room), "m.room.message",
                            {"msgtype": "m.text", "body": "dos, desde la version anterior"})
        print(json.dumps({"sent": sent}), flush=True)
        await devices.close()

asyncio.run(main(*sys.argv[1:]))
"""


def _previous_checkout(target: Path) -> Path:
    # The previous version's `bridge` package, as `git archive e40f014 bridge` wrote it:
    # kept in the repository, so that the test needs no git history (CI may check out
    # main shallow).
    with tarfile.open(PREVIOUS_ARCHIVE) as tar:
        tar.extractall(target / "previous", filter="data")
    return target / "previous"


async def _line(proc: asyncio.subprocess.Process) -> dict[str, Any]:
    assert proc.stdout is not None
    raw = await asyncio.wait_for(proc.stdout.readline(), 60)
    if not raw:
        assert proc.stderr is not None
        raise AssertionError((await proc.stderr.read()).decode()[-3000:])
    value: dict[str, Any] = json.loads(raw)
    return value


async def _raw_event(api: MatrixAPI, user: UserID, room_id: str, event_id: str
                     ) -> dict[str, Any]:
    return await api.request("GET", f"/_matrix/client/v3/rooms/{quote(room_id)}/event/"
                             f"{quote(event_id)}", as_user=user)


async def _knows_device(staff: StaffClient, user: str, device_id: str) -> None:
    """Staff's client has seen the device (a device-list change in its /sync)."""
    for _ in range(40):
        await staff.sync_once(timeout_ms=250)
        if device_id in staff.client.device_store[user]:
            return
    raise AssertionError("staff never saw the ghost's device")


async def test_a_store_of_the_previous_version_moves_in_and_keeps_working(
        synapse: SynapseHarness, db: Database, tmp_path: Path) -> None:
    cfg = synapse.config
    localpart = f"{cfg.appservice.ghost_prefix}mig{secrets.token_hex(3)}"
    ghost, device_id = UserID(f"@{localpart}:localhost"), DeviceID("MIGR" + secrets.token_hex(3))
    store_dir = tmp_path / "store"
    previous = await asyncio.to_thread(_previous_checkout, tmp_path)
    staff = await staff_client(synapse.synapse, "migracion")
    http = aiohttp.ClientSession()
    api = MatrixAPI(http, synapse.synapse.url, cfg.appservice.as_token)
    devices: Devices | None = None
    try:
        await api.register(localpart)
        await db.ghosts.create(ghost, device_id, "Fantasma", "citizen", registered=True)
        room_id = await staff.create_room(invite=[ghost])
        await api.join(ghost, RoomID(room_id))

        # The previous version opens the device, takes staff's room key, answers.
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", OLD_DEVICE, synapse.synapse.url, cfg.appservice.as_token,
            str(store_dir), PASSPHRASE, ghost, device_id, room_id,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(previous)}, cwd=str(previous))
        try:
            opened = await _line(proc)
            assert opened["from"].startswith(str(previous))  # really the previous code
            await _knows_device(staff, ghost, device_id)
            before = await staff.send_text(room_id, "uno, antes de la migracion")
            assert proc.stdin is not None
            proc.stdin.write(b"go\n")
            await proc.stdin.drain()
            answered = await _line(proc)
            assert await asyncio.wait_for(proc.wait(), 60) == 0
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        await staff.wait_for_message(room_id, lambda m: m.event_id == answered["sent"])
        assert list((store_dir / localpart).glob("*.db")), "the previous version's store"

        # The new version moves it into the database and opens the device from there.
        stores = LegacyStores(db, store_dir)
        assert await stores.migrate_all() == 1
        assert not (store_dir / localpart).exists()
        assert (store_dir / MIGRATED / localpart).is_dir()
        assert await stores.migrate_all() == 0  # nothing left: idempotent
        snapshot = await db.crypto.load(ghost)
        assert snapshot.device_id == device_id and snapshot.olm_sessions and snapshot.inbound
        # The trust marks of nio's text files came too (the ghost ignored, i.e. accepted
        # unverified, staff's device when it sent), and the users it followed.
        assert snapshot.trust[(staff.user_id, staff.device_id)] == TrustState.ignored.value
        assert staff.user_id in snapshot.tracked

        devices = Devices(api, db.crypto, PASSPHRASE, file_stores=stores)
        device = await devices.open(ghost, device_id)
        assert device.client.olm is not None
        assert device.client.olm.account.identity_keys["curve25519"] == opened["curve25519"]
        # What staff sent before the move decrypts with the room key that moved.
        old = device.decrypt(await _raw_event(api, ghost, room_id, before))
        assert isinstance(old, nio.RoomMessageText) and old.body == "uno, antes de la migracion"
        # Staff goes on with its session: the ghost reads it without a new key.
        after = await staff.send_text(room_id, "tres, despues")
        new = device.decrypt(await _raw_event(api, ghost, room_id, after))
        assert isinstance(new, nio.RoomMessageText) and new.body == "tres, despues"
        # And staff reads the ghost's next message, from the same device.
        sent = await device.send(api, RoomID(room_id), "m.room.message",
                                 {"msgtype": "m.text", "body": "cuatro, migrado"})
        message = await staff.wait_for_message(room_id, lambda m: m.event_id == sent)
        assert message.body == "cuatro, migrado"
        known = staff.client.device_store[ghost]
        assert list(known) == [device_id]
        assert known[device_id].curve25519 == opened["curve25519"]
        # The server still has the device's first identity keys: no new device, no
        # new identity (one-time keys may be topped up, as after any restart).
        query = await api.request("POST", "/_matrix/client/v3/keys/query", as_user=ghost,
                                  json={"device_keys": {ghost: []}})
        served = query["device_keys"][ghost]
        assert list(served) == [device_id]
        assert served[device_id]["keys"][f"curve25519:{device_id}"] == opened["curve25519"]
    finally:
        if devices is not None:
            await devices.close()
        await http.close()
        await staff.close()
