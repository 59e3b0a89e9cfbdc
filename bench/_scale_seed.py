"""Seeding for bench/scale.py (not a benchmark itself): N citizens with portals, cached.

Going through the real opt-in (webhook, privacy notice, button) is far too slow for
10,000 citizens, so the state is written the way the opt-in leaves it, by the bridge's
own code, in bulk: the bridge runs in-process (on PostgreSQL, against a Synapse of its
own), each citizen row is written with `CitizenRepo.get_or_create` (keyed hash, sealed
identifiers: what `WhatsAppInbound.citizen_for` writes), consent is recorded as
`WhatsAppInbound._record` records it (state, append-only ledger, audit), and the portal
is opened by `Portals.open` (ghost registered with the as_token, room created by the bot
with the portal's state, staff and ghost invited, ghost joined). Ghost devices are not
opened: as in production, a ghost's device opens when it first has to encrypt.

The result is cached in `~/.cache/civic-bridge/bench-scale/<N>/<schema head>-s<SEED_VERSION>/`:
Synapse's directory (config, signing key), `pg_dump`s of Synapse's database and of the
bridge's, the bridge's crypto store directory, and `seed.json` (the bridge's config with its
secrets, the citizens' identities, which are made up). Bump SEED_VERSION when what is
seeded changes; a new schema revision makes a new cache by itself.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import string
import subprocess
import time
from collections.abc import Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

from _harness import NioUser, free_ports, random_key, start_bridge

from bridge.config import parse_config
from bridge.db.engine import head_revision
from bridge.devtools.simulator import CloudAPISimulator
from bridge.devtools.synapse import LocalSynapse
from bridge.errors import Conflict
from bridge.privacy import AAD_IDENTIFIER, AAD_WA_ID, new_pseudonym_code
from bridge.registration import registration_yaml
from bridge.services import Bridge
from bridge.types import Pseudonym
from bridge.whatsapp import consent

SEED_VERSION = 2
PG = os.environ.get("CIVIC_BRIDGE_BENCH_PG", "postgresql://postgres@127.0.0.1:5432")
PHONE_NUMBER_ID = "109876543210"
STAFF_LOCALPART = "staff"
# Portals opened at once while seeding. On a loaded machine each one mostly waits for
# the scheduler: at 8, Synapse and the bridge were still 40-60% idle.
CONCURRENCY = 48


def cache_root() -> Path:
    return Path.home() / ".cache" / "civic-bridge" / "bench-scale"


def cache_dir(n: int) -> Path:
    return cache_root() / str(n) / f"{head_revision()}-s{SEED_VERSION}"


def raw_config(workdir: Path, seed: dict[str, Any], *, hs_port: int, as_port: int,
               admin_port: int, metrics_port: int, db_url: str, api_base: str
               ) -> dict[str, Any]:
    """The bridge's config for this state: the seeded secrets, this run's ports and paths."""
    s = seed["secrets"]
    return {
        "homeserver": {"url": f"http://127.0.0.1:{hs_port}", "domain": "localhost"},
        "appservice": {"listen_host": "127.0.0.1", "listen_port": as_port,
                       "as_token": s["as_token"], "hs_token": s["hs_token"],
                       "store_dir": str(workdir / "store")},
        "database": {"url": db_url},
        "privacy": {"data_key": s["data_key"], "index_key": s["index_key"]},
        "audit": {"key": s["audit_key"]},
        "admin": {"token": s["admin_token"], "users": [seed["staff"]],
                  "listen_port": admin_port},
        "metrics": {"listen_port": metrics_port},
        "whatsapp": {"enabled": True, "api_base": api_base, "phone_number_id": PHONE_NUMBER_ID,
                     "access_token": s["wa_access_token"], "app_secret": s["wa_app_secret"],
                     "verify_token": s["wa_verify_token"]},
        "portals": {"staff": [seed["staff"]]},
        "logging": {"level": "WARNING"},
    }


def simulator(seed: dict[str, Any]) -> CloudAPISimulator:
    s = seed["secrets"]
    return CloudAPISimulator(access_token=s["wa_access_token"], app_secret=s["wa_app_secret"],
                             phone_number_id=PHONE_NUMBER_ID,
                             display_phone_number="+34 900 000 000")


def local_synapse(workdir: Path, registration: Path, port: int, dsn: str,
                  access_log: Path | None = None) -> LocalSynapse:
    # The generated homeserver.yaml names its signing key by absolute path: point it at
    # this copy's own.
    return LocalSynapse(workdir, registration_files=[registration], port=port,
                        access_log=access_log, postgres_dsn=dsn,
                        settings={"signing_key_path": str(workdir / "localhost.signing.key")})


async def create_database(name: str, fast: bool = False, synapse: bool = False) -> str:
    """A new database (libpq URL); `fast` (seeding only) does not wait for commits to
    reach disk; `synapse`: UTF8 with C collation, as Synapse requires."""
    import asyncpg

    conn = await asyncpg.connect(f"{PG}/postgres", timeout=5)
    try:
        await conn.execute(f"CREATE DATABASE {name}" + (
            " ENCODING 'UTF8' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0" if synapse else ""))
        if fast:
            await conn.execute(f"ALTER DATABASE {name} SET synchronous_commit = off")
    finally:
        await conn.close()
    return f"{PG}/{name}"


async def vacuum_analyze(*libpq_urls: str) -> None:
    """What autovacuum does (planner statistics, visibility map) on these databases. The
    PostgreSQL this runs on may have it off (CI images do): without statistics on tables
    that grow while seeding, Synapse's state queries fall back to sequential scans and
    each portal costs more than the one before (2.9 portals/s at 250, 1.4/s by 750)."""
    import asyncpg

    for url in libpq_urls:
        conn = await asyncpg.connect(url, timeout=5)
        try:
            await conn.execute("VACUUM (ANALYZE)")
        finally:
            await conn.close()


async def autovacuum_stand_in(every: float, *libpq_urls: str) -> None:
    """`vacuum_analyze` every `every` seconds, until cancelled."""
    while True:
        await asyncio.sleep(every)
        await vacuum_analyze(*libpq_urls)


async def drop_database(name: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(f"{PG}/postgres", timeout=5)
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    finally:
        await conn.close()


def sqlalchemy_url(libpq_url: str) -> str:
    return libpq_url.replace("postgresql://", "postgresql+asyncpg://", 1)


def new_identity(index: int) -> dict[str, str]:
    """A made-up citizen: Spanish-looking number and a BSUID (the key the bridge uses)."""
    digits = "".join(secrets.choice(string.digits) for _ in range(8))
    bsuid = "ES." + "".join(secrets.choice(string.ascii_letters + string.digits)
                            for _ in range(20))
    return {"wa_id": f"346{digits}", "user_id": bsuid, "name": f"Scale Citizen {index}"}


async def seed_citizen(bridge: Bridge, who: dict[str, str]) -> str:
    """One opted-in citizen with an open portal, written as the opt-in writes it; returns
    the ghost's user id."""
    privacy, cfg = bridge.privacy, bridge.config.consent
    cipher = privacy.cipher
    for _ in range(5):  # a pseudonym code collision is rare; draw again (as the bridge does)
        try:
            citizen, _ = await bridge.db.citizens.get_or_create(
                index_hash=privacy.index.digest(who["user_id"]),
                identifier_ct=cipher.encrypt(who["user_id"], aad=AAD_IDENTIFIER),
                wa_id_ct=cipher.encrypt(who["wa_id"], aad=AAD_WA_ID),
                pseudonym_code=new_pseudonym_code())
            break
        except Conflict:
            continue
    else:
        raise RuntimeError("could not allocate a pseudonym code")
    wamid_hash = privacy.index.wamid(f"wamid.seed{secrets.token_hex(12)}")
    async with bridge.db.transaction() as tx:
        await tx.citizens.set_consent_state(citizen.id, "granted")
        await tx.consent.append(
            citizen_id=citizen.id, pseudonym=Pseudonym(citizen.pseudonym_code),
            purpose="mirroring", state="granted", notice_version=cfg.notice_version,
            notice_hash=consent.notice_hash(cfg), channel="whatsapp",
            language=cfg.notice_language, evidence=consent.message_evidence(wamid_hash))
        await tx.audit.append("citizen", "consent.granted",
                              f"pseudonym {citizen.pseudonym_code}", "ok", "mirroring")
    await bridge.portals.open(citizen)
    stored = await bridge.db.citizens.get(citizen.id)
    assert stored is not None and stored.ghost_user_id
    return str(stored.ghost_user_id)


async def seed(n: int, target: Path, progress: Callable[[str], None]) -> None:
    """Seed N citizens into `target` (built elsewhere, then copied and renamed)."""
    # Built on tmpfs when there is one (Synapse's directory, the crypto stores).
    shm = Path("/dev/shm")
    building = (shm if shm.is_dir() and os.access(shm, os.W_OK) else target.parent) / \
        f"cb-bench-scale-{n}-{secrets.token_hex(4)}.building"
    building.mkdir(parents=True)
    try:
        await _seed(n, building, progress)
        partial = target.with_name(target.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        await asyncio.to_thread(shutil.copytree, building, partial, symlinks=True)
        shutil.rmtree(target, ignore_errors=True)
        partial.rename(target)
    finally:
        shutil.rmtree(building, ignore_errors=True)


async def _seed(n: int, building: Path, progress: Callable[[str], None]) -> None:
    db_name = f"cb_bench_scale_seed_{secrets.token_hex(4)}"
    t0 = time.perf_counter()
    seed_meta: dict[str, Any] = {
        "n": n, "schema": head_revision(), "seed_version": SEED_VERSION,
        "staff": f"@{STAFF_LOCALPART}:localhost",
        "secrets": {"as_token": secrets.token_hex(32), "hs_token": secrets.token_hex(32),
                    "data_key": random_key(), "index_key": random_key(),
                    "audit_key": random_key(), "admin_token": secrets.token_hex(32),
                    "wa_access_token": secrets.token_urlsafe(24),
                    "wa_app_secret": secrets.token_hex(16),
                    "wa_verify_token": secrets.token_urlsafe(16)},
    }
    async with AsyncExitStack() as stack:
        wa = simulator(seed_meta)
        api_base = await wa.start()
        stack.push_async_callback(wa.stop)
        bridge_dsn = await create_database(db_name, fast=True)
        db_url = sqlalchemy_url(bridge_dsn)
        stack.push_async_callback(drop_database, db_name)
        hs_port, as_port, admin_port, metrics_port = free_ports(4)
        config = parse_config(raw_config(building, seed_meta, hs_port=hs_port, as_port=as_port,
                                         admin_port=admin_port, metrics_port=metrics_port,
                                         db_url=db_url, api_base=api_base), base=building)
        registration = building / "registration.yaml"
        registration.write_text(registration_yaml(config), encoding="utf-8")
        synapse_db = f"cb_bench_scale_seed_synapse_{secrets.token_hex(4)}"
        synapse_dsn = await create_database(synapse_db, fast=True, synapse=True)
        stack.push_async_callback(drop_database, synapse_db)
        synapse = local_synapse(building / "synapse", registration, hs_port, synapse_dsn)
        stack.push_async_callback(synapse.stop)
        await synapse.start()
        # The staff member every portal invites has one E2EE device (keys uploaded), so
        # each ghost's first message shares its room key with a real device.
        staff = await NioUser.create(synapse, STAFF_LOCALPART, building / "nio-staff",
                                     store_sync_tokens=False)
        await staff.close()
        async with AsyncExitStack() as bridge_stack:
            vacuuming = asyncio.create_task(autovacuum_stand_in(20, synapse_dsn, bridge_dsn))
            bridge_stack.callback(vacuuming.cancel)
            bridge = await start_bridge(config, bridge_stack)
            people = [new_identity(i) for i in range(n)]
            ghosts: list[str] = [""] * n
            gate = asyncio.Semaphore(CONCURRENCY)
            done, t1 = 0, time.perf_counter()

            async def one(i: int) -> None:
                nonlocal done
                async with gate:
                    ghosts[i] = await seed_citizen(bridge, people[i])
                done += 1
                if done % 250 == 0 or done == n:
                    rate = done / (time.perf_counter() - t1)
                    progress(f"  seeded {done}/{n} portals ({rate:.1f}/s)")

            await asyncio.gather(*(one(i) for i in range(n)))
            # Let the bridge finish what Synapse pushed it (membership events) first.
            await asyncio.sleep(2)
            async with asyncio.timeout(120):
                for source in ("whatsapp", "matrix"):
                    await bridge.worker.idle[source].wait()
        await synapse.stop()
        progress("  dumping the bridge's database")
        for dump, name in (("bridge.dump", db_name), ("synapse.dump", synapse_db)):
            await asyncio.to_thread(subprocess.run, ["pg_dump", "-Fc", "-f",
                                                     str(building / dump), f"{PG}/{name}"],
                                    check=True)
        seed_meta["citizens"] = [p | {"ghost": g} for p, g in zip(people, ghosts, strict=True)]
        seed_meta["seed_seconds"] = round(time.perf_counter() - t0, 1)
        (building / "seed.json").write_text(json.dumps(seed_meta), encoding="utf-8")


def load_seed(target: Path) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = json.loads((target / "seed.json").read_text(encoding="utf-8"))
        return data
    except (OSError, ValueError):
        return None


async def pad(db_url: str, seed_data: dict[str, Any], count: int,
              progress: Callable[[str], None]) -> None:
    """`count` more opted-in citizens with ghost and portal rows in the bridge's database
    only (their ghosts and rooms do not exist on Synapse). A probe of what the bridge
    itself does with many citizens (start-up, idle memory) when seeding Synapse with
    that many rooms takes too long on the machine at hand; written with the same
    repositories, in one transaction per 500."""
    from bridge.db import Database
    from bridge.matrix.ghosts import new_device_id
    from bridge.privacy import Privacy, new_localpart
    from bridge.types import DeviceID, RoomID, UserID

    config = parse_config(raw_config(Path("/nonexistent"), seed_data, hs_port=1, as_port=2,
                                     admin_port=3, metrics_port=4, db_url=db_url,
                                     api_base="http://127.0.0.1:1"))
    privacy = Privacy.from_config(config.privacy)
    cipher, cfg = privacy.cipher, config.consent
    bot = UserID(f"@{config.appservice.ghost_prefix}bot:localhost")
    db = await Database.open(db_url)
    try:
        for first in range(0, count, 500):
            async with db.transaction() as tx:
                for _ in range(first, min(count, first + 500)):
                    who = new_identity(0)
                    citizen, _ = await tx.citizens.get_or_create(
                        index_hash=privacy.index.digest(who["user_id"]),
                        identifier_ct=cipher.encrypt(who["user_id"], aad=AAD_IDENTIFIER),
                        wa_id_ct=cipher.encrypt(who["wa_id"], aad=AAD_WA_ID),
                        pseudonym_code=new_pseudonym_code(), consent_state="granted")
                    wamid_hash = privacy.index.wamid(f"wamid.pad{secrets.token_hex(12)}")
                    await tx.consent.append(
                        citizen_id=citizen.id, pseudonym=Pseudonym(citizen.pseudonym_code),
                        purpose="mirroring", state="granted",
                        notice_version=cfg.notice_version,
                        notice_hash=consent.notice_hash(cfg), channel="whatsapp",
                        language=cfg.notice_language,
                        evidence=consent.message_evidence(wamid_hash))
                    ghost = UserID(f"@{new_localpart(config.appservice.ghost_prefix)}:localhost")
                    await tx.ghosts.create(ghost, DeviceID(new_device_id()),
                                           privacy.display_name(citizen.pseudonym_code),
                                           "citizen", citizen_id=citizen.id, registered=True)
                    await tx.citizens.set_ghost(citizen.id, ghost)
                    await tx.rooms.create(RoomID(f"!pad{secrets.token_hex(9)}:localhost"),
                                          "portal", "pad", bot, citizen_id=citizen.id)
            progress(f"  padded {min(count, first + 500)}/{count} citizens (database only)")
    finally:
        await db.close()
