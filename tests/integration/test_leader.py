"""The leader lock itself, on a real PostgreSQL: one holder, handover on release, on a
dropped lock connection (the holder notices), and no interference with the audit lock."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import asyncpg
import pytest
from sqlalchemy import make_url

from bridge.db.audit import AUDIT_LOCK_KEY
from bridge.db.engine import upgrade
from bridge.devtools.leader_state import as_left_by_a_failed_node
from bridge.leader import (
    APPLICATION_NAME,
    LEADER_LOCK_KEY,
    PROOF_KEY,
    STATE_KEY,
    AdvisoryLock,
    ProcessMark,
    SingleProcess,
    Timing,
    election_for,
)
from tests.fixtures.db import PgServer

pytestmark = pytest.mark.integration

FAST = Timing(poll=0.1, check=0.1, check_timeout=1.0)


async def _admin(url: str) -> asyncpg.Connection:
    u = make_url(url)
    return await asyncpg.connect(host=u.host, port=u.port, user=u.username,
                                 password=u.password, database=u.database, timeout=5)


@pytest.fixture
async def pg_url(pg_server: PgServer) -> str:
    # A database of its own: advisory locks are per database, so tests cannot collide.
    # Migrated, as `run` checks before the election: the leader's state is in `kv`.
    url = await pg_server.create()
    await upgrade(url)
    return url


def test_keys_are_distinct_and_fit_a_bigint() -> None:
    assert LEADER_LOCK_KEY != AUDIT_LOCK_KEY
    assert 0 < LEADER_LOCK_KEY < 2**63


def test_sqlite_has_no_election() -> None:
    assert isinstance(election_for("sqlite+aiosqlite:///x.db"), SingleProcess)
    assert isinstance(election_for("postgresql+asyncpg://u@h/db"), AdvisoryLock)


async def test_one_holder_and_handover_on_release(pg_url: str) -> None:
    first, second = AdvisoryLock(pg_url, timing=FAST), AdvisoryLock(pg_url, timing=FAST)
    try:
        await asyncio.wait_for(first.acquire(), 10)
        waiting = asyncio.create_task(second.acquire())
        await asyncio.sleep(1.0)  # ten polls
        assert not waiting.done(), "two holders of the leader lock"

        conn = await _admin(pg_url)
        try:
            holders = await conn.fetch(
                "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a USING (pid)"
                " WHERE l.locktype = 'advisory' AND l.granted AND l.database = "
                "(SELECT oid FROM pg_database WHERE datname = current_database())")
        finally:
            await conn.close()
        assert [h["application_name"] for h in holders] == [APPLICATION_NAME]

        await first.release()
        await asyncio.wait_for(waiting, 5)
    finally:
        await first.release()
        await second.release()


async def test_holder_notices_a_dropped_connection(pg_url: str) -> None:
    first, second = AdvisoryLock(pg_url, timing=FAST), AdvisoryLock(pg_url, timing=FAST)
    try:
        await asyncio.wait_for(first.acquire(), 10)
        watching = asyncio.create_task(first.watch())
        waiting = asyncio.create_task(second.acquire())
        await asyncio.sleep(0.5)
        assert not watching.done() and not waiting.done()

        # What a network cut or a server-side kill looks like to the holder.
        conn = await _admin(pg_url)
        try:
            killed = await conn.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE application_name = $1 AND datname = current_database() "
                "AND pid IN (SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted)",
                APPLICATION_NAME)
        finally:
            await conn.close()
        assert killed == 1
        start = time.monotonic()
        await asyncio.wait_for(watching, 5)
        noticed = time.monotonic() - start
        await asyncio.wait_for(waiting, 5)
        assert noticed < FAST.check + FAST.check_timeout + 0.5
    finally:
        await first.release()
        await second.release()


async def test_acquire_survives_an_unreachable_database() -> None:
    # Nothing listens there: acquire keeps retrying (a standby outlives a database
    # restart) until cancelled, without raising.
    lock = AdvisoryLock("postgresql+asyncpg://postgres@127.0.0.1:9/none", timing=FAST)
    task = asyncio.create_task(lock.acquire())
    await asyncio.sleep(0.5)
    assert not task.done()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await lock.release()


async def _holder(lock: AdvisoryLock) -> float:
    """Seconds `acquire` took, on a free lock."""
    start = time.monotonic()
    await asyncio.wait_for(lock.acquire(), 10)
    return time.monotonic() - start


async def _next_holder_waits_the_grace(pg_url: str, timing: Timing) -> bool:
    lock = AdvisoryLock(pg_url, timing=timing)
    try:
        return await _holder(lock) >= timing.grace
    finally:
        await lock.release()


async def test_after_a_clean_release_the_next_holder_starts_at_once(pg_url: str) -> None:
    """A holder that gave the lock up at shutdown had stopped processing first (it
    records that, over the lock's own session): the next one need not wait out the
    grace. After a holder that did not (a crash, a lost connection) it does, and with
    no record of a clean release (a new database) it does too."""
    timing = Timing(poll=0.1, check=0.5, check_timeout=1.0)  # grace 1.5 s
    first = AdvisoryLock(pg_url, timing=timing)
    try:
        assert await _holder(first) >= timing.grace  # nothing says who held it before
        await first.release()  # a clean shutdown
        second = AdvisoryLock(pg_url, timing=timing)
        try:
            assert await _holder(second) < timing.grace / 2
        finally:
            await second._drop()  # the session ends without a clean release: a crash
            await second.release()
        assert await _next_holder_waits_the_grace(pg_url, timing)
    finally:
        await first.release()


async def test_a_lost_holder_records_no_clean_release(pg_url: str) -> None:
    """A holder whose lock session died cannot say it released cleanly (another process
    may hold the lock by then): the next one waits the grace."""
    timing = Timing(poll=0.1, check=0.1, check_timeout=1.0)
    first = AdvisoryLock(pg_url, timing=timing)
    try:
        await asyncio.wait_for(first.acquire(), 10)
        await first.release()  # clean: the record says released
        second = AdvisoryLock(pg_url, timing=timing)
        await asyncio.wait_for(second.acquire(), 10)
        watching = asyncio.create_task(second.watch())
        conn = await _admin(pg_url)
        try:
            await conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = $1 AND datname = current_database()",
                APPLICATION_NAME)
        finally:
            await conn.close()
        await asyncio.wait_for(watching, 5)
        await second.release()  # its session is gone: nothing can be recorded
        assert await _next_holder_waits_the_grace(pg_url, timing)
    finally:
        await first.release()


async def test_a_claim_starts_the_grace_early(pg_url: str) -> None:
    """`run` claims the lock before it loads and builds the bridge: the grace runs
    meanwhile, and `acquire` waits only what is left of it."""
    timing = Timing(poll=0.1, check=0.5, check_timeout=1.0)  # grace 1.5 s
    lock = AdvisoryLock(pg_url, timing=timing)
    try:
        claimed_at = time.monotonic()
        await lock.claim()
        await asyncio.sleep(timing.grace)  # loading the bridge, say
        assert await _holder(lock) < timing.grace / 2
        assert time.monotonic() - claimed_at >= timing.grace  # the grace was still waited
    finally:
        await lock.release()


async def test_a_claim_of_a_held_lock_leaves_a_standby(pg_url: str) -> None:
    first, second = AdvisoryLock(pg_url, timing=FAST), AdvisoryLock(pg_url, timing=FAST)
    try:
        await asyncio.wait_for(first.acquire(), 10)
        await second.claim()
        waiting = asyncio.create_task(second.acquire())
        await asyncio.sleep(0.5)
        assert not waiting.done()
        await first.release()  # clean: the standby takes over at once
        await asyncio.wait_for(waiting, 5)
    finally:
        await second.release()
        await first.release()


async def test_a_claim_whose_session_died_is_not_trusted(pg_url: str) -> None:
    """The lock's session may die between the claim and `acquire` (and with it the lock,
    which another process may take): `acquire` checks, and competes again."""
    timing = Timing(poll=0.1, check=0.5, check_timeout=1.0)
    lock = AdvisoryLock(pg_url, timing=timing)
    try:
        await lock.claim()
        conn = await _admin(pg_url)
        try:
            terminated = await conn.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE application_name = $1 AND datname = current_database()",
                APPLICATION_NAME)
        finally:
            await conn.close()
        assert terminated == 1
        await asyncio.sleep(timing.grace)
        # A new session and lock, and the whole grace again: the claim's record says
        # held, not released.
        assert await _holder(lock) >= timing.grace
    finally:
        await lock.release()


async def test_a_holder_that_never_led_records_no_clean_release(pg_url: str) -> None:
    """A process stopped while it waited out the grace (or failed to build) may have
    claimed the lock from a crashed leader that is still finishing: the next holder
    must wait the grace too."""
    timing = Timing(poll=0.1, check=0.5, check_timeout=1.0)
    lock = AdvisoryLock(pg_url, timing=timing)
    await lock.claim()
    await lock.release()
    assert await _next_holder_waits_the_grace(pg_url, timing)


# Another process on this host: it holds the lock (`acquire`, or only `claim`), says so
# on stdout, and stays until killed.
HOLDER = """
import asyncio, sys
from bridge.leader import AdvisoryLock, Timing

async def main(url: str, how: str) -> None:
    lock = AdvisoryLock(url, timing=Timing(poll=0.1, check=0.5, check_timeout=1.0))
    await (lock.acquire() if how == "acquire" else lock.claim())
    print(how, flush=True)
    await asyncio.sleep(3600)

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


@asynccontextmanager
async def other_process(pg_url: str, how: str) -> AsyncIterator[asyncio.subprocess.Process]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", HOLDER, pg_url, how, stdout=asyncio.subprocess.PIPE,
        cwd=Path(__file__).parents[2])
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        assert line.decode().strip() == how
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


async def _killed(proc: asyncio.subprocess.Process) -> None:
    proc.send_signal(signal.SIGKILL)
    assert await proc.wait() == -signal.SIGKILL


async def test_after_a_crash_on_this_host_the_next_holder_starts_at_once(pg_url: str
                                                                         ) -> None:
    """A leader killed on this host (a supervisor restarts it): its mark says which
    process it was, /proc says that process is gone, so nothing can still be finishing."""
    timing = Timing(poll=0.1, check=0.5, check_timeout=1.0)  # grace 1.5 s
    async with other_process(pg_url, "acquire") as proc:
        await _killed(proc)
    assert not await _next_holder_waits_the_grace(pg_url, timing)


async def test_a_previous_holder_still_running_is_waited_for(pg_url: str) -> None:
    """Its lock session died (a PostgreSQL restart, a network cut) but the process runs
    until it notices: the next holder waits the grace, as after a crash elsewhere."""
    timing = Timing(poll=0.1, check=0.5, check_timeout=1.0)
    async with other_process(pg_url, "acquire") as proc:
        conn = await _admin(pg_url)
        try:
            assert await conn.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE application_name = $1 AND datname = current_database()",
                APPLICATION_NAME) == 1
        finally:
            await conn.close()
        assert await _next_holder_waits_the_grace(pg_url, timing)
        assert proc.returncode is None


async def test_the_exit_of_a_holder_that_never_led_proves_nothing(pg_url: str) -> None:
    """A process that took the lock but was killed before it led (within the grace of a
    leader still finishing, say) has no mark on record: the next one waits the grace."""
    timing = Timing(poll=0.1, check=0.5, check_timeout=1.0)
    async with other_process(pg_url, "claim") as proc:
        await _killed(proc)
    assert await _next_holder_waits_the_grace(pg_url, timing)


async def test_a_mark_from_another_host_is_waited_for(pg_url: str) -> None:
    """A leader on another node (another boot) that no longer holds the lock may still be
    running: its pid means nothing here (and no proof of its lock says when it stopped)."""
    timing = Timing(poll=0.1, check=0.5, check_timeout=1.0)
    await as_left_by_a_failed_node(pg_url, proved_ago=None)
    assert await _next_holder_waits_the_grace(pg_url, timing)


async def test_a_leader_whose_last_proof_is_old_enough_is_not_waited_for(pg_url: str
                                                                         ) -> None:
    """A leader that crashed on another node long enough ago (a node failure: PostgreSQL
    frees the lock only when its keepalives give up) has stopped by its own checks: its
    last proof of the lock, in the server's clock, says when at the latest."""
    timing = Timing(poll=0.1, check=0.5, check_timeout=1.0, proof=2.0)
    assert timing.proof_bound == 2.0 + 1.5 + 1.0
    await as_left_by_a_failed_node(pg_url, proved_ago=timing.proof_bound + 1)
    lock = AdvisoryLock(pg_url, timing=timing)
    try:
        assert await _holder(lock) < timing.grace / 2
    finally:
        await lock.release()


async def test_a_recent_proof_is_waited_for_until_its_bound(pg_url: str) -> None:
    """Proved 4 s ago with a bound of 4.5 s: only the half second left is waited (less
    than the grace); proved just now, or with a time ahead of the server's clock (a
    clock stepped back), the whole grace."""
    timing = Timing(poll=0.1, check=0.5, check_timeout=1.0, proof=2.0)
    await as_left_by_a_failed_node(pg_url, proved_ago=timing.proof_bound - 0.5)
    lock = AdvisoryLock(pg_url, timing=timing)
    try:
        assert 0.4 <= await _holder(lock) < timing.grace - 0.2
    finally:
        await lock._drop()  # a crash: the next one finds this holder's fresh proof
        await lock.release()
    assert await _next_holder_waits_the_grace(pg_url, timing)
    conn = await _admin(pg_url)
    try:
        await conn.execute("UPDATE kv SET value = 'held' WHERE key = $1", STATE_KEY)
        await conn.execute("UPDATE kv SET value = (extract(epoch FROM clock_timestamp())"
                           " + 3600)::text WHERE key = $1", PROOF_KEY)
    finally:
        await conn.close()
    assert await _next_holder_waits_the_grace(pg_url, timing)


async def test_the_leader_proves_its_lock_on_record_while_it_leads(pg_url: str) -> None:
    timing = Timing(poll=0.1, check=0.1, check_timeout=1.0, proof=0.3)
    lock = AdvisoryLock(pg_url, timing=timing)
    conn = await _admin(pg_url)
    try:
        await asyncio.wait_for(lock.acquire(), 10)
        watching = asyncio.create_task(lock.watch())
        ages = []
        for _ in range(4):
            await asyncio.sleep(0.5)
            ages.append(await conn.fetchval(
                "SELECT extract(epoch FROM clock_timestamp()) - value::float8 FROM kv "
                "WHERE key = $1", PROOF_KEY))
        # Unrefreshed, the ages would be 0.5, 1.0, 1.5 and 2.0 s; a refreshed one stays
        # near the 0.3 s cadence (a wide margin for a loaded machine).
        assert all(0 <= age < 0.9 for age in ages), ages
        assert not watching.done()
        watching.cancel()
    finally:
        await conn.close()
        await lock.release()


def test_a_process_mark_tells_an_exited_process_only_when_it_can() -> None:
    here = ProcessMark.of()
    assert here is not None and here.pid == os.getpid()
    assert ProcessMark.parse(str(here)) == here
    assert not here.has_exited()  # this process
    unused = next(p for p in range(2**22, 2**22 - 1000, -1) if not Path(f"/proc/{p}").exists())
    gone = ProcessMark(here.boot, here.pid_namespace, unused, here.started)
    assert gone.has_exited()
    assert ProcessMark(here.boot, here.pid_namespace, here.pid, here.started + 1).has_exited()
    # Another boot or PID namespace: /proc here says nothing about it.
    assert not ProcessMark("other-boot", here.pid_namespace, unused, 1).has_exited()
    assert not ProcessMark(here.boot, "pid:[1]", unused, 1).has_exited()
    assert ProcessMark.parse("held") is None and ProcessMark.parse("a b c d") is None
