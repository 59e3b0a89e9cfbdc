"""Inbound WhatsApp webhook -> Matrix relay through the bridge vs bare matrix-nio sends.

Not a test: prints throughput, end-to-end latency (webhook POST until a staff device has
the decrypted event) and webhook ack latency, beside a bare client's Synapse send rate
measured the same way in the same run. Targets (issue 16): inbound >= 0.95x bare
throughput at both rates; webhook ack p99 <= 10 ms at 50 msg/s (the bridge on SQLite);
Synapse CPU per relayed message within 5% of a bare send's.

    .venv/bin/python bench/whatsapp_relay.py [--messages 900] [--rate 50] [--citizens 5] \
        [--synapse-db sqlite|postgresql] [--synapse-access-log FILE] [--json]

Setup (all in a temporary directory, removed at exit, also on Ctrl-C):
- Synapse (bridge.devtools.LocalSynapse) with the bridge's appservice registration, on
  SQLite or (--synapse-db postgresql, as production runs it) a throwaway PostgreSQL
  database;
- the Cloud API simulator (bridge.devtools.simulator) as Graph API and webhook sender;
- the bridge in-process (SQLite, WhatsApp enabled against the simulator, a staff user
  as `portals.staff`);
- K citizens opt in the way real ones do (first message, privacy notice with buttons,
  tap "Acepto"), so K portals exist; the staff user's E2EE nio device joins them all;
- a bare user's nio client in K encrypted rooms of the same kind (created by the bridge
  with a portal's state and recorded as agency rooms, bot and staff in them);
  `--bare-room plain` instead lets the bare user create ordinary encrypted rooms with
  only staff in them (no bot, no appservice traffic: a stricter baseline).

A task keeps the staff device syncing (short long-poll, no sync-token writes) and notes
when each message's text first becomes readable. Modes, N messages each:
- inbound @R: signed webhooks, each one text message, round-robin over the K citizens,
  POSTed at R msg/s, open loop (a POST starts on schedule, whether or not earlier ones
  finished); the bridge relays each citizen's messages in order;
- bare @R: message i goes to bare room i % K at R msg/s, each room in order (a send
  waits for the room's previous one), as a real client sends (Element sends one event
  at a time) and as the bridge must: the baseline of the throughput target;
- unordered @R: every send at once into one room. Synapse persists concurrent sends to
  a room in batches, which no order-keeping relay can use; printed for reference;
- bare max / inbound max: back to back (bare: K rooms in parallel, each in order, room
  n's first send `--lane-stagger-ms` x n after room 0's; inbound: one POST as soon as
  the previous one is acknowledged);
- in-step max: bare max with every room's first send at the same instant. Sends that
  reach Synapse in the same millisecond share its per-batch work (appservice push,
  waking syncs), and rooms that start in step stay in step; independent senders never
  do (measured: a 2 ms stagger already costs a fifth of the rate). Printed for reference.
The control of the ack: each paced inbound delivery also goes, at the same instant, to
the issue's bare handler (HMAC check, SQLite commit with synchronous=FULL) in a process
of its own (bench/_bare_webhook.py); its p99 is printed beside the bridge's, so a miss
can be read as the bridge's or the machine's (with every core busy, any handler waits).
Throughput = messages / (first send until the staff device has the last one), summed
over `--blocks` blocks per mode, interleaved ABBA so drift hits all modes alike.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import secrets
import statistics
import string
import sys
import time
from collections.abc import Awaitable, Callable, Iterable
from contextlib import AsyncExitStack, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import nio
from _harness import (
    CPU,
    ENCRYPTION_STATE,
    BenchError,
    NioUser,
    StaffObserver,
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
from _pacing import Sample, offer

from bridge.devtools.simulator import CloudAPISimulator, SimulatedUser
from bridge.services import Bridge
from bridge.types import RoomID
from bridge.whatsapp.consent import OPT_IN_BUTTON

TARGET_RATIO = 0.95  # inbound / bare throughput
TARGET_ACK_P99_MS = 10.0
TARGET_SYNAPSE_CPU = 1.05  # Synapse CPU per message: inbound / bare, at most
TARGET_ACK_RATE = 50.0  # the ack target is stated at this offered rate
PHONE_NUMBER_ID = "109876543210"
PREFIX = "bench "  # every measured message body starts with this
# The staff device's /sync: a short long-poll (it returns at once when there is news);
# a timeline limit above what one sync can bring, so no message is skipped.
# --- the staff device -----------------------------------------------------------------


class Observer(StaffObserver):
    """When did each bench message become readable to the staff device?

    `seen[body]` is the perf_counter() at which the /sync response that made the message
    decryptable arrived (its own event, or a later room key for it).
    """

    def __init__(self, staff: NioUser, rooms: Iterable[str]) -> None:
        super().__init__(staff)
        self.rooms = set(rooms)
        self.seen: dict[str, float] = {}
        self.seen_in: dict[str, str] = {}  # body -> room id
        self._changed = asyncio.Event()

    def wants(self, room_id: str) -> bool:
        return room_id in self.rooms

    def take(self, event: nio.Event, room_id: str, now: float) -> None:
        if isinstance(event, nio.RoomMessageText) and event.body.startswith(PREFIX):
            self.seen.setdefault(event.body, now)
            self.seen_in.setdefault(event.body, room_id)

    def synced(self) -> None:
        self._changed.set()

    async def wait_for(self, bodies: Iterable[str], deadline: float) -> int:
        """Wait (until `deadline`, loop time) for all `bodies`; returns how many are missing."""
        loop = asyncio.get_running_loop()
        missing = {b for b in bodies if b not in self.seen}
        while missing:
            if self._task is not None and self._task.done():
                self._task.result()  # re-raise what stopped the sync loop
                raise BenchError("staff sync loop stopped")
            if loop.time() >= deadline:
                break
            self._changed.clear()
            with suppress(TimeoutError):
                async with asyncio.timeout_at(min(deadline, loop.time() + 1.0)):
                    await self._changed.wait()
            missing = {b for b in missing if b not in self.seen}
        return len(missing)


# --- setup ----------------------------------------------------------------------------


class Webhooks:
    """Meta's side: signed POSTs to the bridge.

    Measured deliveries are sent and timed by a process of their own
    (bench/_meta_sender.py): Meta is another machine, and a sender in this process (its
    loop, or a thread of it) shares the interpreter lock with the bridge, the staff
    device and the bare client; it slowed the bridge during a burst and counted its own
    waits in the acknowledgements it timed. Setup deliveries go from this loop.
    """

    def __init__(self, wa: CloudAPISimulator, url: str, http: aiohttp.ClientSession) -> None:
        self.wa = wa
        self.url = url
        self.http = http
        self._sender: asyncio.subprocess.Process | None = None
        # The control (bench/_bare_webhook.py): paced deliveries go there too.
        self._control: asyncio.subprocess.Process | None = None
        self.control_url: str | None = None

    async def start(self, workdir: Path) -> None:
        self._sender = await asyncio.create_subprocess_exec(
            sys.executable, str(Path(__file__).with_name("_meta_sender.py")),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, limit=1 << 26)
        port = free_ports(1)[0]
        self._control = await asyncio.create_subprocess_exec(
            sys.executable, str(Path(__file__).with_name("_bare_webhook.py")), str(port),
            self.wa.app_secret, str(workdir / "bare-webhook.db"),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        assert self._control.stdout is not None
        if await self._control.stdout.readline() != b"ready\n":
            raise BenchError("the bare webhook handler did not start")
        self.control_url = f"http://127.0.0.1:{port}/whatsapp/webhook"

    async def close(self) -> None:
        for proc in (self._sender, self._control):
            if proc is None:
                continue
            assert proc.stdin is not None
            proc.stdin.close()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()

    def prepare(self, value: dict[str, Any]) -> tuple[bytes, dict[str, str]]:
        """The exact bytes and headers of one delivery (serialised and signed up front)."""
        body = json.dumps(self.wa.envelope(value), separators=(",", ":")).encode()
        return body, {"Content-Type": "application/json", "User-Agent": "facebookexternalua",
                      "X-Hub-Signature-256": self.wa.sign(body)}

    async def post(self, body: bytes, headers: dict[str, str]) -> int:
        async with self.http.post(self.url, data=body, headers=headers) as resp:
            await resp.read()
            return resp.status

    async def deliver(self, value: dict[str, Any]) -> None:
        status = await self.post(*self.prepare(value))
        if status != 200:
            raise BenchError(f"webhook answered {status}")

    async def offer(self, samples: list[Sample], rate: float | None,
                    deliveries: list[tuple[bytes, dict[str, str]]]) -> tuple[float, list[float]]:
        """`offer` the deliveries from the sender's process (paced and timed there); the
        worst slip, and when paced the control's round trips (s) for the same deliveries."""
        sender = self._sender
        assert sender is not None and sender.stdin is not None and sender.stdout is not None
        block = {"url": self.url, "rate": rate,
                 "control_url": self.control_url if rate is not None else None,
                 "deliveries": [[body.decode(), headers] for body, headers in deliveries]}
        sender.stdin.write(json.dumps(block).encode() + b"\n")
        await sender.stdin.drain()
        line = await sender.stdout.readline()
        if not line:
            raise BenchError(f"the webhook sender ended (exit {await sender.wait()})")
        timed = json.loads(line)
        for sample, sent, acked, ok in zip(samples, timed["sent"], timed["acked"],
                                           timed["ok"], strict=True):
            sample.sent, sample.acked, sample.ok = sent, acked, ok
        return float(timed["slip"]), [float(x) for x in timed["control"]]


@dataclass
class Setup:
    bridge: Bridge
    wa: CloudAPISimulator
    hooks: Webhooks
    staff: NioUser
    bare: NioUser
    citizens: list[SimulatedUser]
    portals: list[str]
    bare_rooms: list[str]  # one per citizen; [0] also takes the unordered baseline
    observer: Observer
    synapse_pid: int | None


def new_citizen(index: int) -> SimulatedUser:
    wa_id = "346" + "".join(secrets.choice(string.digits) for _ in range(8))
    bsuid = "ES." + "".join(secrets.choice(string.ascii_letters + string.digits)
                            for _ in range(20))
    return SimulatedUser(wa_id=wa_id, user_id=bsuid, name=f"Bench Citizen {index}")


async def poll(what: str, probe: Callable[[], Awaitable[Any]], timeout: float = 60) -> Any:
    deadline = asyncio.get_running_loop().time() + timeout
    while not (result := await probe()):
        if asyncio.get_running_loop().time() > deadline:
            raise BenchError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)
    return result


async def opt_in(bridge: Bridge, wa: CloudAPISimulator, hooks: Webhooks,
                 citizen: SimulatedUser, index: int) -> str:
    """First message -> privacy notice with buttons -> "Acepto" -> the citizen's portal."""
    await hooks.deliver(wa.text_message(citizen, f"{PREFIX}held {index}"))
    await wa.wait_for_sent(lambda s: s.get("type") == "interactive"
                           and s.get("to") == citizen.wa_id, timeout=60)
    await hooks.deliver(wa.button_reply(citizen, OPT_IN_BUTTON, "Acepto"))
    digest = bridge.privacy.index.digest(citizen.user_id)

    async def portal() -> str | None:
        row = await bridge.db.citizens.by_index(digest)
        if row is None or row.consent_state != "granted":
            return None
        room = await bridge.db.rooms.portal_for(row.id)
        return room.room_id if room else None

    return str(await poll(f"portal of citizen {index}", portal))


async def set_up(workdir: Path, stack: AsyncExitStack, citizens: int, bare_room_kind: str,
                 progress: Callable[[str], None], access_log: Path | None = None,
                 synapse_db: str = "sqlite") -> Setup:
    hs_port, as_port = free_ports(2)
    staff_local, bare_local = f"staff_{secrets.token_hex(3)}", f"bare_{secrets.token_hex(3)}"
    staff_id = f"@{staff_local}:localhost"

    wa = CloudAPISimulator(access_token=secrets.token_urlsafe(24),
                           app_secret=secrets.token_hex(16), phone_number_id=PHONE_NUMBER_ID,
                           display_phone_number="+34 900 000 000")
    api_base = await wa.start()
    stack.push_async_callback(wa.stop)
    config = bench_config(f"http://127.0.0.1:{hs_port}", as_port, workdir, admin=staff_id,
                          extra={"whatsapp": {"enabled": True, "api_base": api_base,
                                              "phone_number_id": PHONE_NUMBER_ID,
                                              "access_token": wa.access_token,
                                              "app_secret": wa.app_secret,
                                              "verify_token": secrets.token_urlsafe(16)},
                                 "portals": {"staff": [staff_id]}})
    synapse = await start_synapse(workdir, config, hs_port, stack, access_log, synapse_db)
    bridge = await start_bridge(config, stack)
    http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
    stack.push_async_callback(http.close)
    hooks = Webhooks(wa, f"http://127.0.0.1:{as_port}/whatsapp/webhook", http)
    await hooks.start(workdir)
    stack.push_async_callback(hooks.close)

    # No sync-token writes: the staff device syncs many times a second in this process.
    staff = await NioUser.create(synapse, staff_local, workdir / "nio" / "staff",
                                 store_sync_tokens=False)
    stack.push_async_callback(staff.close)
    bare = await NioUser.create(synapse, bare_local, workdir / "nio" / "bare",
                                store_sync_tokens=False)
    stack.push_async_callback(bare.close)

    progress(f"opting in {citizens} citizens")
    people = [new_citizen(i) for i in range(citizens)]
    portals = list(await asyncio.gather(*(opt_in(bridge, wa, hooks, c, i)
                                          for i, c in enumerate(people))))
    for room_id in portals:
        await staff.join(room_id)

    bare_rooms = [await bare_room(bridge, bare, staff_id, bare_room_kind)
                  for _ in range(citizens)]
    for room_id in bare_rooms:
        await bare.join(room_id)
        await staff.join(room_id)

    observer = Observer(staff, [*portals, *bare_rooms])
    observer.start()
    stack.push_async_callback(observer.stop)  # before staff.close (LIFO)
    return Setup(bridge, wa, hooks, staff, bare, people, portals, bare_rooms, observer,
                 synapse_pid())


async def bare_room(bridge: Bridge, bare: NioUser, staff_id: str, kind: str) -> str:
    if kind == "portal":
        # A portal's state, made by the bridge, and recorded as an agency room: any other
        # room the bot is in counts as a management room (each message a command, each
        # answered). No citizen: staff-side handlers ignore it, as they ignore ghosts.
        room_id = await bridge.rooms.create(
            "portal", "bench bare", topic="bench baseline", invite=[staff_id, bare.user_id])
        await bridge.db.rooms.create(RoomID(room_id), "portal", "bench bare",
                                     bridge.ghosts.bot)
        return str(room_id)
    resp = check(await bare.client.room_create(
        name="bench bare", invite=[staff_id], initial_state=[ENCRYPTION_STATE]),
        nio.RoomCreateResponse, "room_create")
    return str(resp.room_id)


# --- measuring ------------------------------------------------------------------------


@dataclass
class Mode:
    kind: str  # "bare", "inbound", "unordered" or "in-step"
    rate: float | None  # offered msg/s, open loop; None = one after the other
    stagger: float = 0.0  # s between the lanes' first sends, back to back only
    samples: list[Sample] = field(default_factory=list)
    elapsed: float = 0.0
    seen: int = 0
    slip: float = 0.0  # worst lateness of a scheduled send (the load generator lagging)
    cpu_self: float = 0.0
    cpu_synapse: float = 0.0
    control: list[float] = field(default_factory=list)  # the bare handler's round trips

    @property
    def offered(self) -> str:
        return "max" if self.rate is None else f"{self.rate:g}/s"

    @property
    def tag(self) -> str:
        return f"{self.kind}-{'max' if self.rate is None else f'{self.rate:g}'}"


@dataclass
class Result:
    mode: str
    offered: str
    messages: int
    seen: int
    errors: int  # sends / POSTs that failed (non-200)
    msg_per_s: float
    e2e_p50_ms: float
    e2e_p99_ms: float
    ack_p50_ms: float
    ack_p99_ms: float
    max_slip_ms: float
    cpu_bench_ms: float  # per message: this process (bridge, nio clients, event loop)
    cpu_synapse_ms: float  # per message: the Synapse process
    control_ack_p99_ms: float  # the bare handler's, for the same deliveries (paced inbound)


def _quantiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return (values[0] * 1000, values[0] * 1000) if values else (math.nan, math.nan)
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return cuts[49] * 1000, cuts[98] * 1000


def result(mode: Mode, seen: dict[str, float]) -> Result:
    n = len(mode.samples)
    e2e = [seen[s.body] - s.sent for s in mode.samples if s.body in seen]
    acks = [s.acked - s.sent for s in mode.samples if s.ok]
    e50, e99 = _quantiles(e2e)
    a50, a99 = _quantiles(acks)
    return Result(mode.kind, mode.offered, n, mode.seen, sum(not s.ok for s in mode.samples),
                  mode.seen / mode.elapsed if mode.elapsed else math.nan, e50, e99, a50, a99,
                  mode.slip * 1000, mode.cpu_self / max(n, 1) * 1000,
                  mode.cpu_synapse / max(n, 1) * 1000, _quantiles(mode.control)[1])


async def bare_send(s: Setup, room_id: str, body: str) -> bool:
    resp = await s.bare.client.room_send(room_id, "m.room.message",
                                         {"msgtype": "m.text", "body": body},
                                         ignore_unverified_devices=True)
    return isinstance(resp, nio.RoomSendResponse)


async def settle(bridge: Bridge) -> None:
    """Let the bridge finish the block's trailing work (appservice echoes) first."""
    await asyncio.sleep(0.3)
    with suppress(TimeoutError):
        async with asyncio.timeout(15):
            for source in ("whatsapp", "matrix"):
                await bridge.worker.idle[source].wait()


async def run_block(s: Setup, mode: Mode, first: int, count: int, cpu: CPU) -> None:
    samples = [Sample(f"{PREFIX}{mode.tag} {i:06d}") for i in range(first, first + count)]
    lanes, stagger = 1, 0.0
    if mode.kind == "inbound":
        deliveries = [s.hooks.prepare(s.wa.text_message(s.citizens[i % len(s.citizens)],
                                                        sample.body))
                      for i, sample in zip(range(first, first + count), samples, strict=True)]

    elif mode.kind in ("bare", "in-step"):
        # Like a real client (Element sends one event at a time): each room in order.
        # Message i goes to room i % K, as inbound message i comes from citizen i % K.
        lanes = len(s.bare_rooms)
        stagger = mode.stagger
        turns = [asyncio.Lock() for _ in s.bare_rooms]  # FIFO: tasks start in order

        async def send(i: int) -> bool:
            async with turns[(first + i) % lanes]:
                return await bare_send(s, s.bare_rooms[(first + i) % lanes], samples[i].body)
    else:  # unordered: every send at once into one room, Synapse batches them
        async def send(i: int) -> bool:
            return await bare_send(s, s.bare_rooms[0], samples[i].body)

    loop = asyncio.get_running_loop()
    deadline = loop.time() + 60 + count / 2  # bounded even if the bridge stalls
    cpu_before = cpu.now()
    if mode.kind == "inbound":
        slip, control = await s.hooks.offer(samples, mode.rate, deliveries)
        mode.control.extend(control)
    else:
        slip = await offer(samples, mode.rate, send, lanes, stagger)
    mode.slip = max(mode.slip, slip)
    missing = await s.observer.wait_for((x.body for x in samples), deadline)
    seen = [s.observer.seen[x.body] for x in samples if x.body in s.observer.seen]
    if seen:
        mode.elapsed += max(seen) - min(x.sent for x in samples)
    mode.seen += count - missing
    mode.samples.extend(samples)
    await settle(s.bridge)
    cpu_after = cpu.now()
    mode.cpu_self += cpu_after[0] - cpu_before[0]
    mode.cpu_synapse += cpu_after[1] - cpu_before[1]


async def warm_up(s: Setup, bare_messages: int) -> None:
    """Unmeasured: every ghost and the bare client have sent, and staff read it."""
    bodies = []
    for i, citizen in enumerate(s.citizens):
        body = f"{PREFIX}warmup inbound {i:06d}"
        await s.hooks.deliver(s.wa.text_message(citizen, body))
        bodies.append(body)
    for i in range(len(s.bare_rooms) + bare_messages):
        body = f"{PREFIX}warmup bare {i:06d}"
        await s.bare.send(s.bare_rooms[i % len(s.bare_rooms)], {"msgtype": "m.text",
                                                                "body": body})
        bodies.append(body)
    loop = asyncio.get_running_loop()
    if missing := await s.observer.wait_for(bodies, loop.time() + 60):
        raise BenchError(f"staff never read {missing} of {len(bodies)} warm-up messages")
    await settle(s.bridge)


def schedule(messages: int, blocks: int, count: int) -> list[tuple[int, int, int]]:
    """(mode index, first, count): `blocks` blocks per mode, ABBA across `count` modes."""
    modes = list(range(count))
    sizes = [messages // blocks + (i < messages % blocks) for i in range(blocks)]
    out, first = [], 0
    for i, size in enumerate(sizes):
        out.extend((m, first, size) for m in (modes if i % 2 == 0 else modes[::-1]))
        first += size
    return [x for x in out if x[2]]


async def measure(s: Setup, args: argparse.Namespace,
                  progress: Callable[[str], None]) -> list[Result]:
    rate = args.rate or None
    modes = [Mode("bare", None, args.lane_stagger_ms / 1000), Mode("in-step", None),
             Mode("inbound", None)]
    if rate is not None:
        modes = [Mode("bare", rate), Mode("inbound", rate), Mode("unordered", rate), *modes]
    cpu = CPU(s.synapse_pid)
    for index, first, count in schedule(args.messages, args.blocks, len(modes)):
        mode = modes[index]
        await run_block(s, mode, first, count, cpu)
        progress(f"  {mode.kind:9} {mode.offered:>6}: {first + count:4} sent, "
                 f"{mode.seen:4} read by staff")
    return [result(m, s.observer.seen) for m in modes]


# --- output ---------------------------------------------------------------------------


def verdicts(results: list[Result], rate: float) -> list[dict[str, Any]]:
    by = {(r.mode, r.offered): r for r in results}
    out: list[dict[str, Any]] = []
    for offered in dict.fromkeys(r.offered for r in results if r.mode == "inbound"):
        bare, inbound = by[("bare", offered)], by[("inbound", offered)]
        ratio = inbound.msg_per_s / bare.msg_per_s
        ok = ratio >= TARGET_RATIO and inbound.seen == inbound.messages
        out.append({"target": "throughput", "offered": offered, "value": round(ratio, 3),
                    "limit": TARGET_RATIO, "verdict": "PASS" if ok else "MISS"})
        cpu = inbound.cpu_synapse_ms / bare.cpu_synapse_ms
        out.append({"target": "synapse_cpu", "offered": offered, "value": round(cpu, 3),
                    "limit": TARGET_SYNAPSE_CPU,
                    "verdict": "PASS" if cpu <= TARGET_SYNAPSE_CPU else "MISS"})
        for kind in ("unordered", "in-step"):
            if (other := by.get((kind, offered))) is not None:
                out.append({"target": f"throughput_vs_{kind}", "offered": offered,
                            "value": round(inbound.msg_per_s / other.msg_per_s, 3),
                            "limit": None, "verdict": "info"})
    paced = by.get(("inbound", f"{rate:g}/s"))
    if paced is not None:
        ok = paced.ack_p99_ms <= TARGET_ACK_P99_MS and paced.errors == 0
        out.append({"target": "ack_p99_ms", "offered": paced.offered,
                    "value": round(paced.ack_p99_ms, 1), "limit": TARGET_ACK_P99_MS,
                    "bare_handler": round(paced.control_ack_p99_ms, 1),
                    "verdict": ("PASS" if ok else "MISS") if rate == TARGET_ACK_RATE
                    else "n/a"})
    return out


def print_table(report: dict[str, Any]) -> None:
    print(f"\nwhatsapp_relay: {report['messages']} messages per mode, "
          f"portals (opted-in citizens): {report['citizens']}, {report['blocks']} blocks per mode, "
          f"bare rooms: {report['bare_room']} (max: first sends {report['lane_stagger_ms']:g} ms "
          f"apart), Synapse store: {report['synapse_db']}, "
          f"public listener: {report.get('ingest', 'process')}, "
          f"load average before/after: {report['load_before']} / {report['load_after']}")
    verdict = {}
    for v in report["verdicts"]:
        if v["verdict"] == "info":
            continue
        label = {"throughput": "thr", "synapse_cpu": "syn"}.get(v["target"], "ack")
        verdict.setdefault(v["offered"], []).append(f"{label} {v['verdict']}")
    ratio = {v["offered"]: v["value"] for v in report["verdicts"] if v["target"] == "throughput"}
    print(f"{'mode':9} {'N':>4} {'offered':>7} {'msg/s':>6} {'e2e p50':>8} {'e2e p99':>8} "
          f"{'ack p50':>8} {'ack p99':>8} {'lost':>4} {'CPU ms/msg':>10} {'synapse':>7} "
          f"{'vs bare':>7}  targets")
    for r in report["results"]:
        inbound = r["mode"] == "inbound"
        lost = r["messages"] - r["seen"]
        print(f"{r['mode']:9} {r['messages']:>4} {r['offered']:>7} {r['msg_per_s']:>6.1f} "
              f"{r['e2e_p50_ms']:>8.1f} {r['e2e_p99_ms']:>8.1f} {r['ack_p50_ms']:>8.1f} "
              f"{r['ack_p99_ms']:>8.1f} {lost:>4} {r['cpu_bench_ms']:>10.1f} "
              f"{r['cpu_synapse_ms']:>7.1f} "
              f"{format(ratio[r['offered']], '.2f') if inbound else '':>7}  "
              f"{', '.join(verdict.get(r['offered'], [])) if inbound else ''}")
    print("(ms; e2e = send until the staff device has the decrypted text; ack = the webhook "
          "POST's round trip, for bare the room_send call; bare = K rooms, each in order; "
          "unordered = one room, every send at once; in-step = bare, the rooms' first sends "
          "at one instant)")
    for v in report["verdicts"]:
        if v["target"] == "throughput":
            print(f"inbound/bare throughput, {v['offered']}: {v['value']:.2f} "
                  f"(target >= {v['limit']}) {v['verdict']}")
        elif v["target"] == "synapse_cpu":
            print(f"Synapse CPU per message, inbound/bare, {v['offered']}: {v['value']:.2f} "
                  f"(target <= {v['limit']:g}) {v['verdict']}")
        elif v["target"] == "throughput_vs_unordered":
            print(f"inbound/unordered-bare throughput, {v['offered']}: {v['value']:.2f} "
                  f"(no target: no ordered relay can batch like this)")
        elif v["target"] == "throughput_vs_in-step":
            print(f"inbound/in-step-bare throughput, {v['offered']}: {v['value']:.2f} "
                  f"(no target: independent senders are never in step)")
        else:
            print(f"webhook ack p99 at {v['offered']}: {v['value']:.1f} ms "
                  f"(target <= {v['limit']:g} ms at {TARGET_ACK_RATE:g} msg/s) {v['verdict']}; "
                  f"the bare handler's under the same load (bench/_bare_webhook.py): "
                  f"{v['bare_handler']:.1f} ms")
    c = report["staff"]
    warnings = []
    if c["undecryptable"]:
        warnings.append(f"{c['undecryptable']} undecryptable")
    if c["timeline_gaps"]:
        warnings.append(f"{c['timeline_gaps']} timeline gaps")
    worst = max((r["max_slip_ms"] for r in report["results"]), default=0.0)
    print(f"staff decrypted {c['inbound']} inbound and {c['bare']} bare messages (with warm-up) in "
          f"{c['syncs']} syncs{' (WARNING: ' + ', '.join(warnings) + ')' if warnings else ''}; "
          f"load generator lag <= {worst:.0f} ms; total {report['seconds']:.0f} s")


async def run(args: argparse.Namespace) -> dict[str, Any]:
    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    with temp_workdir() as workdir:
        async with AsyncExitStack() as stack:
            progress(f"setting up Synapse, the Cloud API simulator and the bridge in {workdir}")
            setup = await asyncio.wait_for(
                set_up(workdir, stack, args.citizens, args.bare_room, progress,
                       args.synapse_access_log, args.synapse_db), 240)
            progress("warming up")
            await warm_up(setup, args.warmup)
            load_before = load_average()
            ingest = setup.bridge.config.appservice.ingest
            progress(f"measuring ({args.messages} messages per mode)")
            results = await measure(setup, args, progress)
            load_after = load_average()
            obs = setup.observer
            rooms = list(obs.seen_in.values())
            staff = {"inbound": sum(r in setup.portals for r in rooms),
                     "bare": sum(r in setup.bare_rooms for r in rooms), "syncs": obs.syncs,
                     "undecryptable": obs.undecryptable, "timeline_gaps": obs.limited}
            progress("stopping")
    return {"messages": args.messages, "rate": args.rate, "citizens": args.citizens,
            "blocks": args.blocks, "warmup": args.warmup, "bare_room": args.bare_room,
            "synapse_db": args.synapse_db, "lane_stagger_ms": args.lane_stagger_ms,
            "ingest": ingest,
            "results": [{k: round(v, 2) if isinstance(v, float) else v
                         for k, v in asdict(r).items()} for r in results],
            "verdicts": verdicts(results, args.rate), "staff": staff,
            "load_before": load_before, "load_after": load_after,
            "seconds": round(time.perf_counter() - t0, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=900, metavar="N",
                        help="measured messages per mode (default 900)")
    parser.add_argument("--rate", type=float, default=50.0, metavar="R",
                        help="offered msg/s of the paced modes; 0 = only the max modes "
                             "(default 50)")
    parser.add_argument("--citizens", type=int, default=5, metavar="K",
                        help="opted-in citizens (portals) the messages are spread over "
                             "(default 5)")
    parser.add_argument("--blocks", type=int, default=6,
                        help="blocks per mode, interleaved ABBA (default 6)")
    parser.add_argument("--warmup", type=int, default=5,
                        help="unmeasured bare sends first (each citizen sends one too; "
                             "default 5)")
    parser.add_argument("--bare-room", choices=("portal", "plain"), default="portal",
                        help="bare client's room: made by the bridge with a portal's state "
                             "(default) or an ordinary room without the bridge")
    parser.add_argument("--synapse-db", choices=("sqlite", "postgresql"), default="sqlite",
                        help="Synapse's own store (the bridge's is SQLite either way): "
                             "sqlite (default) or postgresql, as production Synapse runs")
    parser.add_argument("--synapse-access-log", type=Path, metavar="FILE",
                        help="keep Synapse's access log (every request with its CPU time) "
                             "in FILE, for profiling")
    parser.add_argument("--lane-stagger-ms", type=float, default=20.0, metavar="MS",
                        help="bare max: room n's first send starts n x MS after room 0's, "
                             "as independent senders do (default 20: the spacing of the "
                             "paced modes at 50 msg/s)")
    add_output_options(parser)
    args = parser.parse_args()
    if (args.messages < 2 or args.citizens < 1 or args.rate < 0 or args.warmup < 1
            or args.lane_stagger_ms < 0 or not 1 <= args.blocks <= args.messages // 2):
        parser.error("need --messages >= 2, --citizens >= 1, --rate >= 0, --warmup >= 1, "
                     "--lane-stagger-ms >= 0 and 1 <= --blocks <= --messages / 2")
    return run_and_report(args, lambda: run(args), print_table)


if __name__ == "__main__":
    sys.exit(main())
