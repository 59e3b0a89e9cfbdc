"""Leader election: one bridge process does the work, others on the same database wait.

On PostgreSQL the active process is the holder of a session-level advisory lock
(`pg_try_advisory_lock(LEADER_LOCK_KEY)`) taken on a dedicated connection
(`application_name` "civic-bridge leader", so it shows in `pg_stat_activity`). A
standby tries again every `Timing.poll` seconds. The lock belongs to the database
session: when the holder exits, crashes or its connection drops, PostgreSQL ends the
session and releases the lock, and the next try of a standby wins it. After a node
crash the server notices the dead session only through TCP keepalives
(`tcp_keepalives_*` on the server bound that time).

The active process checks its own lock connection every `Timing.check` seconds
(`SELECT 1`, bounded by `Timing.check_timeout`). If the check fails the lock may
already be someone else's: `watch` returns and the caller stops processing at once.
A new leader waits `Timing.grace` (one check plus its timeout) before it starts, so a
previous leader whose lock connection died, but which is otherwise alive, has
noticed and stopped by then, unless it is known to have stopped already:
- each holder records who it is (`ProcessMark`: the host's boot, the PID namespace, the
  pid and its start time), and a holder on the same host and namespace sees in /proc
  whether that very process still runs (a crash and a supervisor's restart on one node
  start at once; a takeover from another node, or a previous holder still alive, waits);
- every `Timing.proof` seconds one of the leader's checks also records the server's
  time over the lock's session (`PROOF_KEY`). A leader stops at the latest
  `Timing.proof_bound` after its last recorded proof, so a new holder waits only what
  is left of that, when it is less than the grace: after a node failure PostgreSQL
  frees the lock only once its keepalives give up, long after, and the next holder
  starts at once. Both times are the database server's clock, so the hosts' clocks do
  not matter; a server clock stepped forward would shorten the wait by as much.
`run` claims the lock (`claim`) before it loads and
builds the bridge, so the grace runs meanwhile rather than after. What remains is a
previous leader that is frozen (stopped, swapping) for longer than that and then
resumes: it still stops at its next check, and the queues' idempotency keys keep the
damage to a duplicate at most.

The lock needs a real database session: connect to PostgreSQL directly or through a
pooler in *session* mode. With PgBouncer's transaction pooling two bridges could share
one server session, and with it the lock.

On SQLite there is no election: SQLite allows a single bridge process (one writer, a
local file), which is always active.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

from sqlalchemy import make_url, text
from sqlalchemy.ext.asyncio import AsyncConnection, create_async_engine
from sqlalchemy.pool import NullPool

log = logging.getLogger(__name__)

# "cbleader" in ASCII; the audit chain's transaction lock is "cbaudit" (bridge.db.audit).
LEADER_LOCK_KEY = 0x63_62_6C_65_61_64_65_72
APPLICATION_NAME = "civic-bridge leader"

# standby: waiting for the lock; active: holds it and processes; lost: held it, lost it,
# stopped processing and is about to exit.
Role = Literal["standby", "active", "lost"]


class LeadershipLost(Exception):
    """The active process lost its leader lock: it has stopped and must exit."""


# In the `kv` table, the leader's state: HELD (then a space and the holder's
# ProcessMark, where it has one) while a process leads, RELEASED once it gave the lock
# up at shutdown, having stopped processing. A new holder waits the grace unless it
# reads RELEASED or a mark of a process that has exited: after a crash or a lost
# connection the old process may still be finishing a send.
STATE_KEY = "leader_state"
HELD = "held"
RELEASED = "released"
# The server's time of the leader's last recorded proof that it held the lock (epoch
# seconds).
PROOF_KEY = "leader_proved_at"
# Records the new holder; returns the previous state and how long ago the last proof
# was (None if never recorded), in one round trip.
_TAKE_OVER = text(
    "WITH previous AS (SELECT value FROM kv WHERE key = :key) "
    "INSERT INTO kv (key, value) VALUES (:key, :state) "
    "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value "
    "RETURNING (SELECT value FROM previous), "
    "(SELECT extract(epoch FROM clock_timestamp()) - value::float8 FROM kv "
    " WHERE key = :proof AND value ~ '^[0-9]+(\\.[0-9]+)?$')")
_RECORD = text("UPDATE kv SET value = :state WHERE key = :key")
_PROVE = text(
    "INSERT INTO kv (key, value) VALUES (:key, extract(epoch FROM clock_timestamp())::text) "
    "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value")
_CHECK = text("SELECT 1")


@dataclass(frozen=True)
class ProcessMark:
    """Who a process is, in a form that a later process can check (Linux /proc): the
    host's boot, its PID namespace, its pid and its start time (clock ticks after boot;
    a pid used again has another)."""

    boot: str
    pid_namespace: str
    pid: int
    started: int

    @classmethod
    def of(cls) -> ProcessMark | None:
        """The mark of this process; None where /proc cannot say."""
        try:
            boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
            namespace = os.readlink("/proc/self/ns/pid")
            pid = os.getpid()
            _, started = _stat(pid)
        except (OSError, ValueError, IndexError):
            return None
        return cls(boot, namespace, pid, started)

    @classmethod
    def parse(cls, text: str) -> ProcessMark | None:
        try:
            boot, namespace, pid, started = text.split(" ")
            return cls(boot, namespace, int(pid), int(started))
        except ValueError:
            return None

    def __str__(self) -> str:
        return f"{self.boot} {self.pid_namespace} {self.pid} {self.started}"

    def has_exited(self) -> bool:
        """True only if provably so: this process sees the same boot and PID namespace,
        and that pid is gone, is another process (started at another time), or is a
        zombie. Anything else (another host, container or boot; /proc unreadable) could
        still be running."""
        here = ProcessMark.of()
        if here is None or (here.boot, here.pid_namespace) != (self.boot, self.pid_namespace):
            return False
        try:
            state, started = _stat(self.pid)
        except FileNotFoundError:
            return True
        except (OSError, ValueError, IndexError):
            return False
        return started != self.started or state in ("Z", "X")


def _stat(pid: int) -> tuple[str, int]:
    """(state, start time) of a process, from /proc/PID/stat (fields 3 and 22; the
    command name before them may hold spaces and parentheses)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return fields[0], int(fields[19])


@dataclass(frozen=True)
class Timing:
    """Seconds: how often a standby tries, how often the leader checks its connection,
    how often a check also records the proof on the server."""

    poll: float = 1.0
    check: float = 0.5
    check_timeout: float = 2.0
    proof: float = 5.0

    @property
    def grace(self) -> float:
        """How long a new leader waits: by then a previous one has noticed its loss."""
        return self.check + self.check_timeout

    @property
    def proof_bound(self) -> float:
        """How long after its last recorded proof a leader has stopped at the latest: the
        checks it sends within `proof` seconds of sending that proof may succeed (the
        last one slowly, up to its timeout), then the next fails within the grace."""
        return self.proof + self.check_timeout + self.grace


class Election(Protocol):
    """Who may process: `acquire` returns once this process leads, `watch` when it no
    longer does; `release` gives the leadership up (at shutdown). `claim` tries once,
    early, without waiting: the takeover grace then runs while the process loads."""

    async def claim(self) -> None: ...

    async def acquire(self) -> None: ...

    async def watch(self) -> None: ...

    async def release(self) -> None: ...


class SingleProcess:
    """No election (SQLite): the only process leads from the start until it exits."""

    async def claim(self) -> None:
        return None

    async def acquire(self) -> None:
        return None

    async def watch(self) -> None:
        await asyncio.get_running_loop().create_future()  # until cancelled at shutdown

    async def release(self) -> None:
        return None


class AdvisoryLock:
    """The PostgreSQL session advisory lock described in the module docstring."""

    def __init__(self, url: str, key: int = LEADER_LOCK_KEY, timing: Timing = Timing()) -> None:
        # Its own engine without a pool: the lock lives and dies with exactly one session,
        # never handed to other code or silently replaced by a reconnect.
        self._engine = create_async_engine(
            url, poolclass=NullPool,
            connect_args={"server_settings": {"application_name": APPLICATION_NAME},
                          "timeout": timing.check_timeout * 5})
        self._key = key
        self._timing = timing
        self._conn: AsyncConnection | None = None
        # Set by a successful `claim`: when (loop time) this holder may start.
        self._start_at: float | None = None
        self._led = False  # `acquire` returned: the grace (if due) was waited out
        self._proved = 0.0  # loop time at which the last proof was sent (`_lead`, `watch`)

    async def claim(self) -> None:
        """Take the lock now if it is free, and start the grace (if one is due) from
        now: `acquire` then waits only what is left of it. Nothing else is touched, so
        the caller may load and build meanwhile, but must not process before `acquire`.
        If the lock is held or the database is down, `acquire` does the rest."""
        try:
            if await self._try_lock():
                self._start_at = asyncio.get_running_loop().time() + await self._take_over()
        except Exception as exc:  # `acquire` tries again and says why, if it must
            log.info("leader election: no early claim (%s)", type(exc).__name__)
            await self._drop()

    async def _claimed(self) -> bool:
        """After a `claim`: wait out the rest of the grace, then prove the lock's session
        is still alive (it may have died meanwhile, and the lock with it)."""
        start_at, self._start_at = self._start_at, None
        if start_at is None or self._conn is None:
            return False
        await asyncio.sleep(max(0.0, start_at - asyncio.get_running_loop().time()))
        try:
            await self._lead()
        except Exception as exc:
            log.warning("leader lock lost before taking over (%s)", type(exc).__name__)
            await self._drop()
            return False
        return True

    async def acquire(self) -> None:
        await self._acquire()
        self._led = True

    async def _acquire(self) -> None:
        if await self._claimed():
            return
        said_standby = False
        while True:
            try:
                if await self._try_lock():
                    await asyncio.sleep(await self._take_over())
                    await self._lead()
                    return
                if not said_standby:
                    log.info("standby: another bridge process holds the leader lock")
                    said_standby = True
            except Exception as exc:  # the database is down or restarting: keep trying
                log.warning("leader election: database unavailable (%s); retrying",
                            type(exc).__name__)
                await self._drop()
            await asyncio.sleep(self._timing.poll)

    async def _try_lock(self) -> bool:
        if self._conn is None:
            async with asyncio.timeout(self._timing.check_timeout * 5):
                conn = await self._engine.connect()
            # Autocommit: no transaction stays open for the session's lifetime (an idle
            # transaction would hold back VACUUM and meet idle_in_transaction timeouts).
            self._conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
        async with asyncio.timeout(self._timing.check_timeout):
            got = await self._conn.scalar(text("SELECT pg_try_advisory_lock(:key)"),
                                          {"key": self._key})
        return bool(got)

    async def watch(self) -> None:
        conn = self._conn
        assert conn is not None, "watch() before acquire()"
        loop = asyncio.get_running_loop()
        # When the last proof was sent (the server records it later): checks that go
        # without one are sent within `proof` of it, as `proof_bound` counts.
        proved = self._proved
        while True:
            await asyncio.sleep(self._timing.check)
            sent = loop.time()
            prove = sent - proved >= self._timing.proof
            try:
                async with asyncio.timeout(self._timing.check_timeout):
                    if prove:
                        await conn.execute(_PROVE, {"key": PROOF_KEY})
                        proved = sent
                    else:
                        await conn.execute(_CHECK)
            except Exception as exc:  # any failure: we can no longer prove we hold the lock
                log.error("leader lock connection lost (%s)", type(exc).__name__)
                await self._drop()
                return

    async def release(self) -> None:
        """Give the lock up (at shutdown, after processing stopped). Recorded over the
        lock's own session, which proves it is still ours: the next holder then starts
        without the grace. Not by a holder that never led: it may have taken the lock
        within the grace of a crashed leader, which could still be finishing."""
        if self._conn is not None and self._led:
            try:
                async with asyncio.timeout(self._timing.check_timeout):
                    await self._conn.execute(_RECORD, {"key": STATE_KEY, "state": RELEASED})
            except Exception as exc:  # no record: the next holder waits the grace
                log.warning("clean release not recorded (%s)", type(exc).__name__)
        await self._drop()  # ending the session releases the lock
        await self._engine.dispose()

    async def _take_over(self) -> float:
        """Record this process as the holder; the seconds to wait before leading: none
        if the previous one released cleanly or led and has exited, what is left of
        its last proof's bound if that is less than the grace, else the grace. Over the
        lock's session. If it fails the lock is dropped and tried again: starting
        without recording would leave an earlier clean release on record for whoever
        comes after a crash of ours."""
        assert self._conn is not None
        async with asyncio.timeout(self._timing.check_timeout):
            previous, proof_age = (await self._conn.execute(_TAKE_OVER, {
                "key": STATE_KEY, "state": HELD, "proof": PROOF_KEY})).one()
        if previous == RELEASED:
            log.info("leader lock acquired after a clean release; taking over")
            return 0.0
        gone = ProcessMark.parse(str(previous).removeprefix(f"{HELD} "))
        if gone is not None and gone.has_exited():
            log.info("leader lock acquired; the previous holder (pid %d on this host) has "
                     "exited: taking over", gone.pid)
            return 0.0
        wait = self._timing.grace
        if proof_age is not None and proof_age >= 0:  # ahead of the clock: trust nothing
            wait = min(wait, max(0.0, self._timing.proof_bound - proof_age))
        log.info("leader lock acquired; taking over in %.1fs", wait)
        return wait

    async def _lead(self) -> None:
        """Once nothing stands in the way (no previous leader can still be running),
        record this process's mark over the lock's session, which proves that session
        alive: a holder that never got this far may have taken over within the grace of
        a leader still finishing, so its exit proves nothing."""
        assert self._conn is not None
        mark = ProcessMark.of()
        self._proved = asyncio.get_running_loop().time()
        async with asyncio.timeout(self._timing.check_timeout):
            await self._conn.execute(_RECORD, {"key": STATE_KEY, "state": HELD if mark is None
                                               else f"{HELD} {mark}"})
            await self._conn.execute(_PROVE, {"key": PROOF_KEY})

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            async with asyncio.timeout(self._timing.check_timeout):
                await conn.close()
        except Exception:
            # A stalled or broken connection: drop the socket without a goodbye.
            with contextlib.suppress(Exception):
                await conn.invalidate()


def election_for(url: str, timing: Timing = Timing()) -> Election:
    """An advisory-lock election on PostgreSQL, none on SQLite."""
    if make_url(url).get_backend_name() == "postgresql":
        return AdvisoryLock(url, timing=timing)
    return SingleProcess()
