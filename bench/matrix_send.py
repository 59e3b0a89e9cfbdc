"""Ghost-message throughput through the bridge's relay primitive vs a bare matrix-nio client.

Not a test: prints msg/s and p50/p95 latency for both, in one run against one throwaway
Synapse, and the bridge/bare throughput ratio per concurrency (target: >= 0.95, issue 16).

    .venv/bin/python bench/matrix_send.py [--messages 300] [--concurrency 1,10] [--json]

Setup (all in a temporary directory, removed at exit, also on Ctrl-C):
- Synapse (bridge.devtools.LocalSynapse) with the bridge's appservice registration;
- the bridge in-process (migrated SQLite DB, `make_app` on the appservice port);
- a staff user whose E2EE nio device joins every room, so each message is really
  encrypted for a real recipient device (verified at the end: staff decrypts them);
- two encrypted rooms of the same kind, both created through the bridge (the bot is in
  both): one with a ghost (sends with `relay.send_as`), one with an ordinary user whose
  bare nio client sends with `room_send(..., ignore_unverified_devices=True)`.
  `--bare-room plain` instead lets the bare user create an ordinary encrypted room with
  only staff in it (no bot, no appservice traffic): a stricter baseline.

Each mode first sends `--warmup` messages (not measured: the first send claims Olm
sessions and shares the Megolm session). Then, per concurrency C, N messages per mode
are sent by C concurrent workers, in `--blocks` blocks per mode interleaved ABBA (bare,
bridge, bridge, bare, bare, ...) so drift (growing Synapse DB, other load on the machine)
hits both modes alike. Also reported: CPU milliseconds per message of this process
(bridge + nio clients) and of Synapse, which vary less than msg/s on a busy machine.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import nio
from _harness import (
    CPU,
    ENCRYPTION_STATE,
    NioUser,
    add_output_options,
    bench_config,
    check,
    free_ports,
    load_average,
    run_and_report,
    start_bridge,
    start_synapse,
    synapse_pid,
    temp_workdir,
)

from bridge.services import Bridge
from bridge.types import RoomID, UserID

TARGET = 0.95  # issue 16 point 5: "stays >= 0.95x"

SendFn = Callable[[dict[str, Any]], Awaitable[None]]


# --- setup --------------------------------------------------------------------------


@dataclass
class Setup:
    bridge: Bridge
    staff: NioUser
    bare: NioUser
    ghost: UserID
    bridge_room: RoomID
    bare_room: str
    synapse_pid: int | None


async def set_up(workdir: Path, stack: AsyncExitStack, bare_room_kind: str) -> Setup:
    hs_port, as_port = free_ports(2)
    staff_local, bare_local = f"staff_{secrets.token_hex(3)}", f"bare_{secrets.token_hex(3)}"
    config = bench_config(f"http://127.0.0.1:{hs_port}", as_port, workdir,
                          admin=f"@{staff_local}:localhost")
    synapse = await start_synapse(workdir, config, hs_port, stack)
    bridge = await start_bridge(config, stack)

    staff = await NioUser.create(synapse, staff_local, workdir / "nio" / "staff")
    stack.push_async_callback(staff.close)
    bare = await NioUser.create(synapse, bare_local, workdir / "nio" / "bare")
    stack.push_async_callback(bare.close)

    # The room the ghost speaks in: created by the bridge, staff invited as admin.
    bridge_room = await bridge.admin.create_room(staff.user_id, "bench ghost", "citizen")
    ghost = await bridge.ghosts.create()
    await bridge.api.invite(bridge.ghosts.bot, bridge_room, ghost)
    await bridge.api.join(ghost, bridge_room)
    await staff.join(bridge_room)

    if bare_room_kind == "bridge":
        bare_room: str = await bridge.admin.create_room(staff.user_id, "bench bare", "citizen")
        await bridge.admin.invite(staff.user_id, bare_room, bare.user_id)
    else:
        resp = check(await bare.client.room_create(
            name="bench bare", invite=[staff.user_id], initial_state=[ENCRYPTION_STATE]),
            nio.RoomCreateResponse, "room_create")
        bare_room = str(resp.room_id)
    await bare.join(bare_room)  # joining a room one created is a no-op
    await staff.join(bare_room)
    return Setup(bridge, staff, bare, ghost, bridge_room, bare_room, synapse_pid())


# --- measuring ----------------------------------------------------------------------


@dataclass
class Result:
    mode: str
    messages: int
    concurrency: int
    msg_per_s: float
    p50_ms: float
    p95_ms: float
    cpu_bench_ms: float  # per message: this process (bridge, nio clients, event loop)
    cpu_synapse_ms: float  # per message: the Synapse process


class Samples:
    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.elapsed = 0.0
        self.cpu_self = 0.0
        self.cpu_synapse = 0.0

    def result(self, mode: str, concurrency: int) -> Result:
        n = len(self.latencies)
        cuts = statistics.quantiles(self.latencies, n=100, method="inclusive")
        return Result(mode, n, concurrency, n / self.elapsed, cuts[49] * 1000, cuts[94] * 1000,
                      self.cpu_self / n * 1000, self.cpu_synapse / n * 1000)


async def run_segment(send: SendFn, label: str, first: int, count: int, concurrency: int,
                      samples: Samples, cpu: CPU | None = None) -> None:
    """`count` sends by `concurrency` workers pulling from one shared counter."""
    numbers = iter(range(first, first + count))

    async def worker() -> None:
        for i in numbers:
            content = {"msgtype": "m.text", "body": f"bench {label} message {i:06d}"}
            t0 = time.perf_counter()
            await send(content)
            samples.latencies.append(time.perf_counter() - t0)

    cpu_before = cpu.now() if cpu else (0.0, 0.0)
    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    samples.elapsed += time.perf_counter() - t0
    cpu_after = cpu.now() if cpu else (0.0, 0.0)
    samples.cpu_self += cpu_after[0] - cpu_before[0]
    samples.cpu_synapse += cpu_after[1] - cpu_before[1]


def interleave(messages: int, blocks: int) -> list[tuple[str, int]]:
    """`blocks` blocks per mode in ABBA order: bare, bridge, bridge, bare, bare, ..."""
    sizes = [messages // blocks + (i < messages % blocks) for i in range(blocks)]
    order = []
    for i, size in enumerate(sizes):
        pair = [("bare", size), ("bridge", size)]
        order.extend(pair if i % 2 == 0 else pair[::-1])
    return order


async def measure(s: Setup, messages: int, concurrencies: list[int], warmup: int,
                  blocks: int, progress: Callable[[str], None]) -> list[Result]:
    async def bare_send(content: dict[str, Any]) -> None:
        await s.bare.send(s.bare_room, content)

    async def bridge_send(content: dict[str, Any]) -> None:
        await s.bridge.relay.send_as(s.ghost, s.bridge_room, content)

    sends = {"bare": bare_send, "bridge": bridge_send}
    sent = dict.fromkeys(sends, 0)
    for mode, send in sends.items():
        await run_segment(send, f"{mode} warmup", 0, warmup, 1, Samples())
        sent[mode] = warmup

    cpu = CPU(s.synapse_pid)
    results = []
    for c in concurrencies:
        samples = {mode: Samples() for mode in sends}
        for mode, count in interleave(messages, blocks):
            if count:
                await run_segment(sends[mode], mode, sent[mode], count, c, samples[mode], cpu)
                sent[mode] += count
        for mode in sends:
            results.append(samples[mode].result(mode, c))
            progress(f"  {mode:6} c={c:<3} {results[-1].msg_per_s:7.1f} msg/s")
    return results


async def verify(s: Setup) -> dict[str, int]:
    """Staff decrypts the latest messages of both rooms: the sends were real E2EE."""
    timeline_filter = {"room": {"timeline": {"limit": 5}}, "presence": {"not_types": ["*"]}}
    events: dict[str, list[nio.Event]] = {s.bridge_room: [], s.bare_room: []}
    for _ in range(5):  # to-device room keys may span several syncs
        resp = await s.staff.sync(timeout_ms=200, sync_filter=timeline_filter)
        for room_id, info in resp.rooms.join.items():
            if room_id in events and info.timeline.events:
                events[room_id] = list(info.timeline.events)
        if not resp.to_device_events:
            break
    decrypted = {}
    for name, room_id in (("bridge", s.bridge_room), ("bare", s.bare_room)):
        ok = 0
        for event in events[room_id]:
            if isinstance(event, nio.MegolmEvent):
                try:
                    event = s.staff.client.decrypt_event(event)
                except nio.EncryptionError:
                    continue
            if isinstance(event, nio.RoomMessageText) and event.body.startswith(f"bench {name}"):
                ok += 1
        decrypted[name] = ok
    return decrypted


# --- output -------------------------------------------------------------------------


def ratios(results: list[Result]) -> list[dict[str, Any]]:
    by = {(r.mode, r.concurrency): r for r in results}
    out = []
    for c in sorted({r.concurrency for r in results}):
        ratio = by[("bridge", c)].msg_per_s / by[("bare", c)].msg_per_s
        out.append({"concurrency": c, "ratio": round(ratio, 3), "target": TARGET,
                    "verdict": "PASS" if ratio >= TARGET else "MISS"})
    return out


def print_table(report: dict[str, Any]) -> None:
    print(f"\nmatrix_send: {report['messages']} messages per mode and concurrency, "
          f"{report['warmup']} warm-up sends excluded, {report['blocks']} blocks per mode, "
          f"bare room: {report['bare_room']}, "
          f"load average before/after: {report['load_before']} / {report['load_after']}")
    print(f"{'mode':8} {'N':>5} {'conc':>5} {'msg/s':>8} {'p50 ms':>8} {'p95 ms':>8} "
          f"{'CPU ms/msg: bench':>18} {'synapse':>8}")
    for r in report["results"]:
        print(f"{r['mode']:8} {r['messages']:>5} {r['concurrency']:>5} {r['msg_per_s']:>8.1f} "
              f"{r['p50_ms']:>8.1f} {r['p95_ms']:>8.1f} {r['cpu_bench_ms']:>18.1f} "
              f"{r['cpu_synapse_ms']:>8.1f}")
    for r in report["ratios"]:
        print(f"bridge/bare throughput at concurrency {r['concurrency']}: {r['ratio']:.2f} "
              f"(target >= {TARGET}) {r['verdict']}")
    d = report["staff_decrypted"]
    warning = "" if min(d.values()) > 0 else " (WARNING: staff could not decrypt)"
    print(f"staff decrypted the latest messages: bridge room {d['bridge']}, "
          f"bare room {d['bare']}{warning}; total {report['seconds']:.0f} s")


async def run(args: argparse.Namespace) -> dict[str, Any]:
    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    with temp_workdir() as workdir:
        async with AsyncExitStack() as stack:
            progress(f"setting up Synapse and the bridge in {workdir}")
            setup = await asyncio.wait_for(set_up(workdir, stack, args.bare_room), 180)
            load_before = load_average()
            progress(f"sending ({args.messages} per mode and concurrency)")
            results = await measure(setup, args.messages, args.concurrency, args.warmup,
                                    args.blocks, progress)
            load_after = load_average()
            decrypted = await verify(setup)
            progress("stopping")
    return {"messages": args.messages, "warmup": args.warmup, "blocks": args.blocks,
            "bare_room": args.bare_room,
            "results": [{k: round(v, 2) if isinstance(v, float) else v
                         for k, v in asdict(r).items()} for r in results],
            "ratios": ratios(results), "staff_decrypted": decrypted,
            "load_before": load_before, "load_after": load_after,
            "seconds": round(time.perf_counter() - t0, 1)}


def _concurrency(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("a comma-separated list of positive integers")
    return values


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=300, metavar="N",
                        help="measured sends per mode and concurrency (default 300)")
    parser.add_argument("--concurrency", type=_concurrency, default=[1, 10], metavar="C,...",
                        help="concurrent senders, comma-separated (default 1,10)")
    parser.add_argument("--warmup", type=int, default=5,
                        help="unmeasured sends per mode first (default 5)")
    parser.add_argument("--blocks", type=int, default=4,
                        help="blocks per mode, interleaved ABBA (default 4)")
    parser.add_argument("--bare-room", choices=("bridge", "plain"), default="bridge",
                        help="bare client's room: created by the bridge like the ghost's "
                             "(default) or an ordinary room without the bridge")
    add_output_options(parser)
    args = parser.parse_args()
    if args.warmup < 1 or not 1 <= args.blocks <= args.messages // 2:
        parser.error("need --warmup >= 1 and 1 <= --blocks <= --messages / 2")
    return run_and_report(args, lambda: run(args), print_table)


if __name__ == "__main__":
    sys.exit(main())
