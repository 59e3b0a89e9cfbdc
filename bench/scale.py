"""Scale: a `civic-bridge run` process over N opted-in citizens with portals (N = 1,000 and
10,000), on PostgreSQL, against a real Synapse.

Not a test: prints, side by side for each N, start-up time to ready, idle RSS, the
bridge's requests to Synapse per second while idle, RSS and open fds after 500 distinct
citizens each sent one message, CPU per message (bridge and Synapse) and `EXPLAIN
(ANALYZE, BUFFERS)` of the hot look-ups, with PASS/MISS against the targets of issue #16:
start <= 3 s and idle RSS <= 250 MB at N = 10,000; idle requests to Synapse <= 0.1/s at
any N; RSS growth from the smallest to the largest N <= 20%; CPU per message within 10%
between them.

    .venv/bin/python bench/scale.py [--n 1000 10000] [--messages 500] [--rate 20] \
        [--idle 60] [--reseed] [--json]

The seeded state (bench/_scale_seed.py) is cached per N under
~/.cache/civic-bridge/bench-scale/; `--reseed` builds it again. Each run works on a copy:
Synapse's directory and the bridge's store directory are copied to a temporary
directory, Synapse's and the bridge's databases are restored from their dumps into
throwaway PostgreSQL databases on 127.0.0.1:5432. Then, per N:
- Synapse starts (with its access log) and the Cloud API simulator;
- the staff device gets enough one-time keys for every measured message
  (bench/_scale_staff.py says why);
- `python -m bridge run -c config.yaml` starts; start-up = process start until `/ready`
  answers 200 with role `active` (polled every 20 ms; not polled afterwards, since
  `/ready` asks Synapse for its versions);
- after 5 s of settling, an idle window (`--idle` s): Synapse's access log lines in it
  are counted (only the bridge talks to this Synapse then; those authenticated as the
  appservice's users, `@civicbridge:` and `@cb_...`, are shown apart), RSS is read from
  /proc at its end (RSS, CPU and fds are the bridge's with its children: its ingest
  process, bridge.web.ingest_child);
- `--messages` distinct citizens each send one text message (signed webhooks, `--rate`
  per second); done when Synapse's store holds an `m.room.encrypted` event from each of
  their ghosts; CPU (utime + stime from /proc) of the bridge and Synapse from the first
  POST until then, plus the bridge's queues draining, divided by the messages;
- RSS and open fds (/proc/PID/fd) after; then EXPLAIN of the SQL the repositories issue
  for the hot look-ups (captured from the bridge's own repository calls, run again under
  EXPLAIN in a transaction that is rolled back), after ANALYZE (a restore has no
  statistics; autovacuum would gather them in production);
- then a clean stop (SIGTERM) and a restart: start-up again, to `/ready`; then a SIGKILL
  and a start again. The first start takes over from a leader whose node failed: the
  restored state is marked as that leader leaves it (the lock held, no clean release,
  the mark of a process on another host, its last proof of the lock `--failed-ago`
  seconds before the start: PostgreSQL frees a dead node's lock only when its TCP
  keepalives give up, 25 s with deploy/README.md's settings). Past the proof's bound
  (bridge.leader, 9.5 s) it waits no grace; with `--failed-ago` under it, what is left.
  The restart after the clean stop waits none, nor does the one after the SIGKILL: that
  leader's mark names a process on this host that has exited.
"""

from __future__ import annotations

import argparse
import asyncio
import compileall
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import AsyncExitStack, suppress
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import yaml
from _harness import BenchError, add_output_options, free_ports, load_average, run_and_report
from _scale_explain import explain_hot_lookups
from _scale_report import print_table, verdicts
from _scale_seed import (
    cache_dir,
    create_database,
    drop_database,
    load_seed,
    local_synapse,
    pad,
    raw_config,
    seed,
    simulator,
    sqlalchemy_url,
    vacuum_analyze,
)
from _scale_staff import top_up_one_time_keys

import bridge
from bridge.config import ENV_PREFIX, parse_config
from bridge.devtools.leader_state import as_left_by_a_failed_node
from bridge.devtools.simulator import SimulatedUser
from bridge.registration import registration_yaml

SETTLE_S = 5.0
STARTS = ("first", "restart", "crash-restart")  # the profiles' names (--profile)
TICK = os.sysconf("SC_CLK_TCK")


def progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# --- /proc ----------------------------------------------------------------------------


def with_children(pid: int) -> list[int]:
    """The bridge and its children (its ingest process, bridge.web.ingest_child): the
    figures are the bridge's as a whole."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [pid, *map(int, children)]


def cpu_seconds(pid: int) -> float:
    total = 0.0
    for each in with_children(pid):
        fields = Path(f"/proc/{each}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / TICK  # utime, stime
    return total


def rss_mb(pid: int) -> float:
    return sum(_rss_mb(each) for each in with_children(pid))


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise BenchError(f"no VmRSS for {pid}")


def child_of(pid: int) -> int:
    """The one child of `pid` (the bridge under py-spy)."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return int(children[0])


def open_fds(pid: int) -> int:
    return sum(len(os.listdir(f"/proc/{each}/fd")) for each in with_children(pid))


# --- the Synapse side -----------------------------------------------------------------


def bridge_requests(access_log: Path, start: int, users: tuple[str, ...]
                    ) -> tuple[int, int, list[str]]:
    """(requests authenticated as one of the bridge's users, all requests, a few of the
    latter) in the access log after byte `start`. `users`: the appservice's sender
    (`@civicbridge:...`, what the as_token alone authenticates as) and the ghost prefix
    (`@cb_`: the bot and the ghosts, `?user_id=` masquerading)."""
    with access_log.open("rb") as f:
        f.seek(start)
        lines = f.read().decode(errors="replace").splitlines()
    ours = [line for line in lines if any(f"{{{user}" in line for user in users)]
    return len(ours), len(lines), [line.split(" - ", 3)[-1][:200] for line in lines[:5]]


async def encrypted_from(synapse_db: str, senders: list[str], after: int) -> int:
    """How many of `senders` have an m.room.encrypted event after stream ordering `after`."""
    conn = await asyncpg.connect(synapse_db)
    try:
        return int(await conn.fetchval(
            "SELECT COUNT(DISTINCT sender) FROM events WHERE type = 'm.room.encrypted' "
            "AND stream_ordering > $1 AND sender = ANY($2::text[])", after, senders))
    finally:
        await conn.close()


async def max_stream(synapse_db: str) -> int:
    conn = await asyncpg.connect(synapse_db)
    try:
        return int(await conn.fetchval("SELECT COALESCE(MAX(stream_ordering), 0) FROM events"))
    finally:
        await conn.close()


# --- one N ----------------------------------------------------------------------------


@dataclass
class Figures:
    n: int
    pad: int = 0  # citizens in the bridge's database only (--pad)
    start_s: float = 0.0  # the first start on the seeded state (after another node's crash)
    start_cpu_s: float = 0.0
    restart_s: float = 0.0  # after a clean stop
    restart_cpu_s: float = 0.0
    crash_restart_s: float = 0.0  # after a SIGKILL on this host
    crash_restart_cpu_s: float = 0.0
    idle_rss_mb: float = 0.0
    idle_seconds: float = 0.0
    idle_requests: int = 0  # every request Synapse logged in the idle window
    idle_requests_as_bridge: int = 0  # of those, authenticated as the bridge's users
    idle_req_per_s: float = 0.0
    idle_request_samples: list[str] = field(default_factory=list)
    idle_cpu_ms_per_s: float = 0.0
    messages: int = 0
    messages_seconds: float = 0.0
    after_rss_mb: float = 0.0
    after_fds: int = 0
    idle_fds: int = 0
    cpu_bridge_ms: float = 0.0  # per message
    cpu_synapse_ms: float = 0.0  # per message
    explain: list[dict[str, Any]] = field(default_factory=list)
    load_before: str = ""
    load_after: str = ""
    staff_one_time_keys: int = 0  # on the server before the bridge starts


async def restore(n: int, reseed: bool, workdir: Path, stack: AsyncExitStack
                  ) -> tuple[dict[str, Any], str, str]:
    """The seeded state for N, copied into `workdir`; (seed, the bridge's database as a
    SQLAlchemy URL, Synapse's as a libpq URL)."""
    target = cache_dir(n)
    data = None if reseed else load_seed(target)
    if data is None:
        progress(f"seeding {n} citizens into {target} (cached for later runs)")
        await seed(n, target, progress)
        data = load_seed(target)
        assert data is not None
        progress(f"seeded in {data['seed_seconds']:.0f} s")
    await asyncio.to_thread(shutil.copytree, target / "synapse", workdir / "synapse")
    for part in ("store", "nio-staff"):
        if (target / part).exists():
            await asyncio.to_thread(shutil.copytree, target / part, workdir / part)
    urls = []
    for dump, synapse in (("bridge.dump", False), ("synapse.dump", True)):
        name = f"cb_bench_scale_{'synapse_' if synapse else ''}{secrets.token_hex(4)}"
        libpq = await create_database(name, synapse=synapse)
        stack.push_async_callback(drop_database, name)
        await asyncio.to_thread(subprocess.run, ["pg_restore", "--no-owner", "-j", "2", "-d",
                                                 libpq, str(target / dump)], check=True)
        urls.append(libpq)
    # A restore has no planner statistics; production's autovacuum keeps them.
    await vacuum_analyze(*urls)
    return data, sqlalchemy_url(urls[0]), urls[1]


async def wait_ready(http: aiohttp.ClientSession, url: str, proc: asyncio.subprocess.Process,
                     log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.returncode is not None:
            raise BenchError(f"the bridge exited with {proc.returncode}:\n"
                             + log.read_text(errors="replace")[-3000:])
        with suppress(aiohttp.ClientError, TimeoutError, ValueError):
            async with http.get(url, timeout=aiohttp.ClientTimeout(total=5)) as resp:
                body = await resp.json(content_type=None)
                if resp.status == 200 and body.get("role") == "active":
                    return
        if time.monotonic() > deadline:
            raise BenchError(f"the bridge was not ready within {timeout:g} s")
        await asyncio.sleep(0.02)


async def measure(n: int, args: argparse.Namespace) -> Figures:
    fig = Figures(n, pad=args.pad)
    workdir = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix="civic-bench-scale-"))
    try:
        async with AsyncExitStack() as stack:
            data, db_url, synapse_db = await restore(n, args.reseed, workdir, stack)
            if args.pad:
                await pad(db_url, data, args.pad, progress)
            await run_bridge(fig, data, db_url, synapse_db, workdir, stack, args)
    finally:
        await asyncio.to_thread(shutil.rmtree, workdir, True)
    return fig


async def run_bridge(fig: Figures, data: dict[str, Any], db_url: str, synapse_db: str,
                     workdir: Path, stack: AsyncExitStack, args: argparse.Namespace) -> None:
    wa = simulator(data)
    api_base = await wa.start()
    stack.push_async_callback(wa.stop)
    hs_port, as_port, admin_port, metrics_port = free_ports(4)
    raw = raw_config(workdir, data, hs_port=hs_port, as_port=as_port, admin_port=admin_port,
                     metrics_port=metrics_port, db_url=db_url, api_base=api_base)
    config = parse_config(raw, base=workdir)
    config_path = workdir / "config.yaml"
    config_path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    config_path.chmod(0o600)
    registration = workdir / "registration.yaml"
    registration.write_text(registration_yaml(config), encoding="utf-8")
    access_log = workdir / "access.log"
    synapse = local_synapse(workdir / "synapse", registration, hs_port, synapse_db, access_log)
    stack.push_async_callback(synapse.stop)
    progress(f"N={fig.n}: starting Synapse")
    await synapse.start(timeout=180)
    synapse_pid = synapse.pid
    assert synapse_pid is not None
    fig.staff_one_time_keys = await top_up_one_time_keys(
        synapse.url, synapse_db, data["staff"], workdir / "nio-staff", args.messages + 50)
    http = aiohttp.ClientSession()
    stack.push_async_callback(http.close)

    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    # As an installed wheel is: with bytecode. This environment sets
    # PYTHONDONTWRITEBYTECODE, so a source checkout would compile every module of the
    # bridge at each start (measured: ~0.4 s of CPU, several seconds of wall time under load).
    await asyncio.to_thread(compileall.compile_dir, str(Path(bridge.__file__).parent),
                            quiet=1)
    log = workdir / "bridge.log"
    out = log.open("wb")
    stack.callback(out.close)
    await asyncio.sleep(2)  # Synapse's own start-up work off the machine first
    fig.load_before = load_average()
    command = [sys.executable, "-m", "bridge", "run", "-c", str(config_path)]
    procs: list[asyncio.subprocess.Process] = []

    async def start() -> tuple[int, float, float]:
        """Start `run`; (the bridge's pid, seconds until /ready said active, the CPU it
        took to get there: on a shared machine the wall time depends on the load, this
        does not much)."""
        run = command
        if args.profile:  # py-spy samples the bridge from its first instruction (speedscope)
            spy = Path(sys.executable).parent / "py-spy"
            name = f"bridge-{fig.n}-{STARTS[len(procs)]}.speedscope.json"
            run = [str(spy) if spy.exists() else "py-spy", "record", "--idle", "-r", "100",
                   "-f", "speedscope", "-o", str(args.profile.absolute() / name), "--",
                   *command]
        t0 = time.perf_counter()
        proc = await asyncio.create_subprocess_exec(
            *run, cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=out,
            stderr=subprocess.STDOUT)
        procs.append(proc)
        await wait_ready(http, f"http://127.0.0.1:{metrics_port}/ready", proc, log)
        seconds = time.perf_counter() - t0
        pid = child_of(proc.pid) if args.profile else proc.pid
        return pid, seconds, cpu_seconds(pid)

    async def stop(sig: signal.Signals = signal.SIGTERM) -> None:
        """A clean stop (SIGTERM), as a deployment's restart does; or a crash (SIGKILL)."""
        proc = procs[-1]
        if proc.returncode is None:
            if args.profile:  # the bridge itself; py-spy writes its profile when it ends
                with suppress(OSError, ValueError, IndexError):
                    os.kill(child_of(proc.pid), sig)
            else:
                proc.send_signal(sig)
            try:
                await asyncio.wait_for(proc.wait(), 20)
            except TimeoutError:
                proc.kill()
                await proc.wait()
    stack.push_async_callback(stop)
    # The first start on the seeded state, as a failed node's leader leaves it: no grace
    # past the bound of its last proof (bridge.leader).
    await as_left_by_a_failed_node(db_url, args.failed_ago)
    pid, fig.start_s, fig.start_cpu_s = await start()
    progress(f"N={fig.n}: ready in {fig.start_s:.2f} s; idle for {SETTLE_S:g} + {args.idle:g} s")

    await asyncio.sleep(SETTLE_S)
    mark = access_log.stat().st_size
    cpu0, t_idle = cpu_seconds(pid), time.perf_counter()
    await asyncio.sleep(args.idle)
    fig.idle_seconds = time.perf_counter() - t_idle
    fig.idle_cpu_ms_per_s = (cpu_seconds(pid) - cpu0) * 1000 / fig.idle_seconds
    fig.idle_rss_mb = rss_mb(pid)
    fig.idle_fds = open_fds(pid)
    users = (f"@{config.appservice.bot_localpart}:", f"@{config.appservice.ghost_prefix}")
    # Only the bridge talks to this Synapse while idle: every request counts (the
    # unauthenticated ones, e.g. /versions, would be the bridge's too).
    fig.idle_requests_as_bridge, fig.idle_requests, fig.idle_request_samples = \
        bridge_requests(access_log, mark, users)
    fig.idle_req_per_s = fig.idle_requests / fig.idle_seconds

    await send_messages(fig, data, wa, http, as_port, pid, synapse_pid, synapse_db, args)
    fig.after_rss_mb = rss_mb(pid)
    fig.after_fds = open_fds(pid)
    fig.load_after = load_average()
    progress(f"N={fig.n}: EXPLAIN of the hot look-ups")
    fig.explain = await explain_hot_lookups(config, data["citizens"][0]["user_id"])
    if procs[-1].returncode is not None:
        raise BenchError(f"the bridge exited with {procs[-1].returncode}")
    # A restart after that clean stop (a deployment's): the same state, now with 500
    # citizens' devices in the database.
    await stop()
    _, fig.restart_s, fig.restart_cpu_s = await start()
    progress(f"N={fig.n}: restarted after a clean stop in {fig.restart_s:.2f} s")
    await asyncio.sleep(SETTLE_S)
    await stop(signal.SIGKILL)  # a crash; its supervisor (systemd, say) starts it again
    _, fig.crash_restart_s, fig.crash_restart_cpu_s = await start()
    progress(f"N={fig.n}: restarted after a SIGKILL in {fig.crash_restart_s:.2f} s")


async def send_messages(fig: Figures, data: dict[str, Any], wa: Any,
                        http: aiohttp.ClientSession, as_port: int,
                        pid: int, synapse_pid: int, synapse_db: str,
                        args: argparse.Namespace) -> None:
    """`--messages` distinct citizens each send one text; wait until Synapse has them."""
    people = data["citizens"][:args.messages]
    url = f"http://127.0.0.1:{as_port}/whatsapp/webhook"
    deliveries = []
    for i, who in enumerate(people):
        user = SimulatedUser(wa_id=who["wa_id"], user_id=who["user_id"], name=who["name"])
        body = json.dumps(wa.envelope(wa.text_message(user, f"scale {i:05d}")),
                          separators=(",", ":")).encode()
        deliveries.append((body, {"Content-Type": "application/json",
                                  "X-Hub-Signature-256": wa.sign(body)}))
    ghosts = [who["ghost"] for who in people]
    after = await max_stream(synapse_db)
    progress(f"N={fig.n}: {len(people)} citizens send one message each at {args.rate:g}/s")
    failed = 0

    async def post(body: bytes, headers: dict[str, str]) -> None:
        nonlocal failed
        async with http.post(url, data=body, headers=headers) as resp:
            await resp.read()
            failed += resp.status != 200

    cpu0 = cpu_seconds(pid), cpu_seconds(synapse_pid)
    t0 = time.perf_counter()
    tasks = []
    for i, delivery in enumerate(deliveries):
        delay = t0 + i / args.rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(post(*delivery)))
    await asyncio.gather(*tasks)
    if failed:
        raise BenchError(f"{failed} webhook POSTs were not answered 200")
    deadline = time.monotonic() + 120 + len(people)
    while (seen := await encrypted_from(synapse_db, ghosts, after)) < len(people):
        if time.monotonic() > deadline:
            raise BenchError(f"only {seen} of {len(people)} messages reached Synapse")
        await asyncio.sleep(0.25)
    fig.messages_seconds = time.perf_counter() - t0
    await asyncio.sleep(2)  # trailing work: the queues' bookkeeping, Synapse's pushes
    cpu1 = cpu_seconds(pid), cpu_seconds(synapse_pid)
    fig.messages = len(people)
    fig.cpu_bridge_ms = (cpu1[0] - cpu0[0]) * 1000 / len(people)
    fig.cpu_synapse_ms = (cpu1[1] - cpu0[1]) * 1000 / len(people)
    progress(f"N={fig.n}: {len(people)} messages in Synapse after {fig.messages_seconds:.1f} s")


async def run(args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.perf_counter()
    figs = []
    for n in args.n:
        figs.append(await measure(n, args))
    return {"pad": args.pad, "messages": args.messages, "rate": args.rate, "idle": args.idle,
            "failed_ago": args.failed_ago, "figures": [asdict(f) for f in figs],
            "verdicts": verdicts(figs),
            "at": datetime.now(UTC).isoformat(timespec="seconds"),
            "seconds": round(time.perf_counter() - t0, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, nargs="+", default=[1000, 10000],
                        help="citizens with portals (default 1000 10000)")
    parser.add_argument("--messages", type=int, default=500,
                        help="distinct citizens who each send one message (default 500)")
    parser.add_argument("--rate", type=float, default=20.0,
                        help="webhook POSTs per second (default 20)")
    parser.add_argument("--idle", type=float, default=60.0,
                        help="idle window in seconds (default 60)")
    parser.add_argument("--pad", type=int, default=0, metavar="K",
                        help="add K citizens to the bridge's database only (no ghost or "
                             "room on Synapse): a probe of the bridge's own cost of many "
                             "citizens when seeding Synapse that far takes too long")
    parser.add_argument("--failed-ago", type=float, default=25.0, metavar="S",
                        help="the first start takes over from a leader whose node failed, "
                             "whose last proof of the lock is S seconds old (default 25)")
    parser.add_argument("--reseed", action="store_true",
                        help="seed again even if a cached state exists")
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="run the bridge under py-spy (must be on PATH); a speedscope "
                             "profile per N and start (first, restart) goes to DIR "
                             "(figures then include its overhead)")
    add_output_options(parser)
    args = parser.parse_args()
    if args.messages < 1 or min(args.n) < args.messages or args.rate <= 0 or args.idle <= 0:
        parser.error("need 1 <= --messages <= every --n, --rate > 0 and --idle > 0")
    return run_and_report(args, lambda: run(args), print_table)


if __name__ == "__main__":
    sys.exit(main())
