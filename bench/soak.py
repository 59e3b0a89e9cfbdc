"""Soak: minutes of mixed traffic through a real bridge process; is anything lost,
duplicated or stuck, and do its memory and file descriptors stay flat?

Not a test: prints figures every minute and verdicts at the end; the exit status is 1
if a target is missed. Targets: 0 lost and 0 duplicated each way, nothing left in the
bridge's queues after the drain, the bridge's RSS and open file descriptors flat after
warm-up (<= 10% growth from minute 2 to the last minute).

    .venv/bin/python bench/soak.py [--minutes 10] [--citizens 20] [--inbound-rate 5] \
        [--staff-rate 2] [--bridge-db sqlite|postgresql] [--json]

A throwaway Synapse, the Cloud API simulator in this process (Graph API, and Meta's
webhooks: statuses echoing `biz_opaque_callback_data`, redelivery until answered 200),
and the bridge as its own process (`python -m bridge run`: its RSS, fds and CPU come
from /proc/PID). K citizens opt in the real way; a staff E2EE nio device joins every
portal. Open loop for `--minutes`: inbound text and images, staff replies, `sent`,
`delivered` and `read` for every Graph send, citizens' reactions to a share of the
replies; then a drain until everything has arrived and the queues are empty. Latency:
inbound = webhook POST until the staff device decrypted it; outbound = the staff
device's `room_send` until the simulator recorded the Graph body. bench/README.md says
more.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import os
import random
import re
import secrets
import statistics
import string
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import nio
import yaml
from _harness import (
    CPU,
    BenchError,
    NioUser,
    StaffObserver,
    add_output_options,
    check,
    free_ports,
    load_average,
    random_key,
    run_guarded,
    setup_logging,
    start_synapse,
    synapse_database,
    synapse_pid,
    temp_workdir,
)
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from bridge.config import ENV_PREFIX, parse_config
from bridge.db.engine import upgrade
from bridge.devtools.simulator import CloudAPISimulator, SimulatedUser
from bridge.whatsapp.consent import OPT_IN_BUTTON

PHONE_NUMBER_ID = "109876543210"
PREFIX = "soak "  # every body the bench sends starts with this
TARGET_GROWTH = 0.10  # RSS and fds, first measured minute after warm-up to the last
SAMPLE_SECONDS = 5.0  # RSS, fds and queue depths are sampled this often
IDLE_SECONDS = 20.0  # after the drain, before the last sample
REACTIONS = ("👍", "❤️", "🙏")
SYNC_FAILURES_TOLERATED = 30  # in a row, 2 s apart


def progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# --- what was sent and what arrived ---------------------------------------------------


@dataclass
class Item:
    """One message (or reaction) the bench sent, and what became of it."""

    kind: str  # "text", "image", "reply" or "reaction"
    lane: int  # the citizen (portal) it belongs to
    seq: int  # its place in its kind's sequence
    sent: float = math.nan  # perf_counter() when the POST / room_send started
    accepted: bool = False  # webhook answered 200 / Synapse took the send
    arrived: float = math.nan  # staff decrypted it / the simulator recorded it
    copies: int = 0  # distinct Matrix events / Graph bodies that carry it
    event_id: str = ""  # staff replies: the Matrix event (reactions point at it)

    @property
    def latency(self) -> float:
        return self.arrived - self.sent


@dataclass
class Tracker:
    inbound: dict[str, Item] = field(default_factory=dict)  # body -> item
    outbound: dict[str, Item] = field(default_factory=dict)  # body -> item
    reactions: dict[str, Item] = field(default_factory=dict)  # staff event id -> item
    order_in: dict[int, list[int]] = field(default_factory=dict)  # citizen -> seqs seen
    order_out: dict[int, list[int]] = field(default_factory=dict)  # citizen -> seqs at Graph
    webhook_redeliveries: int = 0
    staff_send_errors: int = 0
    statuses: int = 0
    slip: float = 0.0  # worst lateness of a scheduled send (the load generator lagging)

    def arrive(self, item: Item, now: float, order: dict[int, list[int]]) -> None:
        item.copies += 1
        if item.copies == 1:
            item.arrived = now
            if item.kind != "reaction":
                order.setdefault(item.lane, []).append(item.seq)

    def pending(self) -> int:
        """Accepted items that have not arrived yet."""
        return sum(1 for group in (self.inbound, self.outbound, self.reactions)
                   for i in group.values() if i.accepted and not i.copies)


# --- the bridge process ---------------------------------------------------------------


class BridgeProcess:
    """`python -m bridge run -c CONFIG`; stderr (JSON log lines) goes to a file."""

    def __init__(self, config_path: Path, url: str, metrics_url: str) -> None:
        self.config_path = config_path
        self.url = url  # the public listener
        self.metrics_url = metrics_url
        self.log = config_path.parent / "bridge.log"
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def start(self, http: aiohttp.ClientSession) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
        with self.log.open("ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "bridge", "run", "-c", str(self.config_path),
                cwd=self.config_path.parent, env=env,
                stdout=asyncio.subprocess.DEVNULL, stderr=log)
        deadline = time.monotonic() + 120
        while not await self._ready(http):
            if not self.alive():
                raise BenchError(f"the bridge exited with {self.proc.returncode}:\n"
                                 + self.tail())
            if time.monotonic() > deadline:
                raise BenchError("the bridge was not ready after 120 s:\n" + self.tail())
            await asyncio.sleep(0.3)

    async def _ready(self, http: aiohttp.ClientSession) -> bool:
        try:
            async with http.get(self.url + "/ready",
                                timeout=aiohttp.ClientTimeout(total=3)) as resp:
                body = await resp.json(content_type=None)
                return resp.status == 200 and body.get("started") is True
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return False

    async def stop(self) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 20)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()

    def tail(self, lines: int = 20) -> str:
        try:
            return "".join(self.log.read_text(errors="replace").splitlines(True)[-lines:])
        except OSError:
            return ""

    def rss_kib(self) -> int:
        status = Path(f"/proc/{self.pid}/status").read_text()
        match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
        return int(match.group(1)) if match else 0

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def log_summary(self) -> dict[str, int]:
        """Warnings and errors the bridge logged, by level and message (digits as #)."""
        seen: Counter[str] = Counter()
        try:
            lines = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return {}
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                seen["unparsed " + re.sub(r"\d+", "#", line[:80])] += 1
                continue
            if record.get("level") in ("WARNING", "ERROR", "CRITICAL"):
                message = re.sub(r"[0-9]+", "#", str(record.get("msg")))[:100]
                seen[f"{record['level']} {message}"] += 1
        return dict(seen.most_common())


async def metrics(http: aiohttp.ClientSession, url: str) -> dict[str, float]:
    """The bridge's counters that say something went wrong (summed over labels)."""
    wanted = ("civic_bridge_undecryptable_events", "civic_bridge_inbound_retries",
              "civic_bridge_outbox_retries", "civic_bridge_webhook_rejects")
    try:
        async with http.get(url + "/metrics") as resp:
            body = await resp.text()
    except aiohttp.ClientError:
        return {}
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            if s.name.removesuffix("_total") in wanted and s.name.endswith("_total"):
                out[s.name] = out.get(s.name, 0.0) + s.value
    return out


# --- Meta's side ----------------------------------------------------------------------


def new_citizen(index: int) -> SimulatedUser:
    wa_id = "346" + "".join(secrets.choice(string.digits) for _ in range(8))
    bsuid = "ES." + "".join(secrets.choice(string.ascii_letters + string.digits)
                            for _ in range(20))
    return SimulatedUser(wa_id=wa_id, user_id=bsuid, name=f"Soak Citizen {index}")


class Meta:
    """Signed webhooks to the bridge, delivered again until answered 200 (as Meta does),
    and the statuses and reactions that answer what the bridge sends to Graph."""

    def __init__(self, wa: CloudAPISimulator, url: str, http: aiohttp.ClientSession,
                 tracker: Tracker, citizens: list[SimulatedUser], rng: random.Random,
                 reaction_share: float) -> None:
        self.wa = wa
        self.url = url
        self.http = http
        self.tracker = tracker
        self.citizens = citizens
        self.by_wa_id = {c.wa_id: i for i, c in enumerate(citizens)}
        self.rng = rng
        self.reaction_share = reaction_share
        self.reacting = False  # reactions only while traffic runs
        self.tasks: set[asyncio.Task[Any]] = set()
        self.errors: list[BaseException] = []
        self.seen_sends = 0  # simulator records looked at so far

    def spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and (error := task.exception()) is not None:
            self.errors.append(error)  # raised by the next sample

    def check(self) -> None:
        if self.errors:
            raise BenchError(f"a traffic task failed: {self.errors[0]!r}") from self.errors[0]

    async def deliver(self, value: dict[str, Any], give_up_after: float = 300) -> bool:
        body = json.dumps(self.wa.envelope(value), separators=(",", ":")).encode()
        headers = {"Content-Type": "application/json", "User-Agent": "facebookexternalua",
                   "X-Hub-Signature-256": self.wa.sign(body)}
        deadline = time.monotonic() + give_up_after
        while True:
            try:
                async with self.http.post(self.url, data=body, headers=headers) as resp:
                    await resp.read()
                    if resp.status == 200:
                        return True
            except (aiohttp.ClientError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                return False
            self.tracker.webhook_redeliveries += 1
            await asyncio.sleep(1.0)

    async def watch_graph(self) -> None:
        """Runs until cancelled: notes every Graph send as the simulator records it and
        answers it with statuses (and, for a share of staff replies, a reaction)."""
        while True:
            n = self.seen_sends

            def news(_: dict[str, Any], n: int = n) -> bool:
                return len(self.wa.sent) > n
            # The simulator's public wait: returns as soon as there is a record past n.
            await self.wa.wait_for_sent(news, timeout=3600)
            now = time.perf_counter()
            self.seen_sends = len(self.wa.sent)
            for index in range(n, self.seen_sends):
                self._on_sent(self.wa.sent[index], self.wa.sent_ids[index], now)

    def _on_sent(self, body: dict[str, Any], wamid: str | None, now: float) -> None:
        if wamid is None:
            return  # a mark-as-read call
        lane = self.by_wa_id.get(str(body.get("to", "")))
        if lane is None:
            return  # not to one of our citizens
        text_body = str((body.get("text") or {}).get("body", ""))
        item = self.tracker.outbound.get(text_body)
        if item is not None:
            self.tracker.arrive(item, now, self.tracker.order_out)
            if item.copies == 1 and self.reacting and self.rng.random() < self.reaction_share:
                self.spawn(self._react(item, lane, wamid, self.rng.uniform(2.0, 5.0)))
        self.spawn(self._statuses(wamid, lane))

    async def _statuses(self, wamid: str, lane: int) -> None:
        for status, delay in (("sent", self.rng.uniform(0.2, 0.6)),
                              ("delivered", self.rng.uniform(0.5, 1.5)),
                              ("read", self.rng.uniform(1.0, 4.0))):
            await asyncio.sleep(delay)
            if await self.deliver(self.wa.status_update(wamid, status, self.citizens[lane])):
                self.tracker.statuses += 1

    async def _react(self, reply: Item, lane: int, wamid: str, delay: float) -> None:
        await asyncio.sleep(delay)  # a person reads, then reacts
        if not reply.event_id:
            return
        item = self.tracker.reactions[reply.event_id] = Item("reaction", lane, reply.seq)
        item.sent = time.perf_counter()
        item.accepted = await self.deliver(
            self.wa.reaction_message(self.citizens[lane], wamid, self.rng.choice(REACTIONS)))


# --- the staff device -----------------------------------------------------------------


class Observer(StaffObserver):
    """The staff device: which bench messages it can read, when."""

    def __init__(self, staff: NioUser, tracker: Tracker) -> None:
        super().__init__(staff, failures_tolerated=SYNC_FAILURES_TOLERATED)
        self.tracker = tracker
        self.portal_of: dict[int, str] = {}  # citizen -> portal room
        self.event_ids: set[str] = set()
        self.notices: Counter[str] = Counter()  # bridge notices to staff, by text

    def take(self, event: nio.Event, room_id: str, now: float) -> None:
        if event.sender == self.staff.user_id or event.event_id in self.event_ids:
            return
        self.event_ids.add(event.event_id)
        t = self.tracker
        if isinstance(event, nio.ReactionEvent):
            if (item := t.reactions.get(event.reacts_to)) is not None:
                t.arrive(item, now, {})
            return
        body = getattr(event, "body", None)
        if isinstance(event, nio.RoomMessageNotice) and isinstance(body, str):
            self.notices[re.sub(r"[0-9]+", "#", body)[:120]] += 1
        elif isinstance(body, str) and body.startswith(PREFIX):
            if (item := t.inbound.get(body)) is not None:
                t.arrive(item, now, t.order_in)
            elif (m := re.fullmatch(rf"{PREFIX}w c(\d+)", body)) is not None:
                self.portal_of[int(m.group(1))] = room_id  # warm-up: which portal is whose


# --- setup ----------------------------------------------------------------------------


@dataclass
class Setup:
    wa: CloudAPISimulator
    meta: Meta
    bridge: BridgeProcess
    staff: NioUser
    observer: Observer
    citizens: list[SimulatedUser]
    queues: AsyncEngine
    http: aiohttp.ClientSession
    synapse_pid: int | None


async def bridge_database(workdir: Path, kind: str, stack: AsyncExitStack) -> str:
    if kind == "sqlite":
        return f"sqlite+aiosqlite:///{workdir / 'bridge.db'}"
    # A throwaway database made (and dropped) by the harness helper Synapse uses.
    dsn = await synapse_database(stack)
    return dsn.replace("postgresql://", "postgresql+asyncpg://", 1)


async def set_up(workdir: Path, stack: AsyncExitStack, args: argparse.Namespace,
                 tracker: Tracker, rng: random.Random) -> Setup:
    hs_port, as_port, admin_port, metrics_port = free_ports(4)
    staff_local = f"staff_{secrets.token_hex(3)}"
    staff_id = f"@{staff_local}:localhost"
    wa = CloudAPISimulator(access_token=secrets.token_urlsafe(24),
                           app_secret=secrets.token_hex(16), phone_number_id=PHONE_NUMBER_ID,
                           display_phone_number="+34 900 000 000")
    api_base = await wa.start()
    stack.push_async_callback(wa.stop)
    db_url = await bridge_database(workdir, args.bridge_db, stack)
    raw: dict[str, Any] = {
        "homeserver": {"url": f"http://127.0.0.1:{hs_port}", "domain": "localhost"},
        "appservice": {"listen_host": "127.0.0.1", "listen_port": as_port,
                       "as_token": secrets.token_hex(32), "hs_token": secrets.token_hex(32),
                       "store_dir": str(workdir / "store")},
        "database": {"url": db_url},
        "privacy": {"data_key": random_key(), "index_key": random_key()},
        "audit": {"key": random_key()},
        "admin": {"token": secrets.token_hex(32), "listen_port": admin_port},
        "metrics": {"listen_port": metrics_port},
        "portals": {"staff": [staff_id]},
        "whatsapp": {"enabled": True, "api_base": api_base, "phone_number_id": PHONE_NUMBER_ID,
                     "access_token": wa.access_token, "app_secret": wa.app_secret,
                     "verify_token": secrets.token_urlsafe(16)},
        "logging": {"level": "INFO" if args.verbose else "WARNING", "format": "json"},
    }
    config = parse_config(raw, base=workdir)
    config_path = workdir / "config.yaml"
    config_path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    config_path.chmod(0o600)
    synapse = await start_synapse(workdir, config, hs_port, stack, synapse_db=args.synapse_db)
    await upgrade(db_url)
    http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
    stack.push_async_callback(http.close)
    bridge = BridgeProcess(config_path, f"http://127.0.0.1:{as_port}",
                           f"http://127.0.0.1:{metrics_port}")
    stack.push_async_callback(bridge.stop)
    await bridge.start(http)
    queues = create_async_engine(db_url, pool_size=1) if args.bridge_db == "postgresql" \
        else create_async_engine(db_url)
    stack.push_async_callback(queues.dispose)

    staff = await NioUser.create(synapse, staff_local, workdir / "nio" / "staff",
                                 store_sync_tokens=False)
    stack.push_async_callback(staff.close)
    citizens = [new_citizen(i) for i in range(args.citizens)]
    meta = Meta(wa, bridge.url + "/whatsapp/webhook", http, tracker, citizens, rng,
                args.reaction_share)
    watcher = asyncio.create_task(meta.watch_graph(), name="graph watcher")

    async def stop_meta() -> None:
        watcher.cancel()
        for task in list(meta.tasks):
            task.cancel()
        await asyncio.gather(watcher, *meta.tasks, return_exceptions=True)
    stack.push_async_callback(stop_meta)

    progress(f"opting in {len(citizens)} citizens")
    await asyncio.gather(*(opt_in(meta, c, i) for i, c in enumerate(citizens)))
    await join_portals(staff, len(citizens))
    observer = Observer(staff, tracker)
    observer.start()
    stack.push_async_callback(observer.stop)  # before staff.close (LIFO)
    return Setup(wa, meta, bridge, staff, observer, citizens, queues, http, synapse_pid())


async def opt_in(meta: Meta, citizen: SimulatedUser, index: int) -> None:
    """First message (held) -> privacy notice with buttons -> tap "Acepto"."""
    if not await meta.deliver(meta.wa.text_message(citizen, f"{PREFIX}h c{index}"), 60):
        raise BenchError(f"citizen {index}: first message refused")
    await meta.wa.wait_for_sent(lambda s: s.get("type") == "interactive"
                                and s.get("to") == citizen.wa_id, timeout=120)
    if not await meta.deliver(meta.wa.button_reply(citizen, OPT_IN_BUTTON, "Acepto"), 60):
        raise BenchError(f"citizen {index}: opt-in refused")


async def join_portals(staff: NioUser, count: int) -> None:
    """Join the `count` portals the bridge invites staff to (nothing else invites them)."""
    joined: set[str] = set()
    deadline = time.monotonic() + 180
    while len(joined) < count or not all(
            r in staff.client.rooms and staff.client.rooms[r].encrypted for r in joined):
        if time.monotonic() > deadline:
            raise BenchError(f"staff joined {len(joined)} of {count} portals in 180 s")
        await staff.sync(timeout_ms=500)
        for room_id in list(staff.client.invited_rooms):
            if room_id not in joined:
                check(await staff.client.join(room_id), nio.JoinResponse, "join")
                joined.add(room_id)


async def warm_up(s: Setup) -> None:
    """Unmeasured: every ghost has sent and staff has answered once in every portal
    (Olm sessions claimed, Megolm sessions shared), and we learn whose portal is whose."""
    count = len(s.citizens)
    for i, citizen in enumerate(s.citizens):
        s.meta.spawn(s.meta.deliver(s.wa.text_message(citizen, f"{PREFIX}w c{i}")))
    deadline = time.monotonic() + 180
    while len(s.observer.portal_of) < count:
        s.observer.check_running()
        if time.monotonic() > deadline:
            raise BenchError(f"staff read {len(s.observer.portal_of)} of {count} warm-up "
                             "messages in 180 s")
        await asyncio.sleep(0.2)
    for i in range(count):
        body = f"{PREFIX}ow c{i}"
        await s.staff.send(s.observer.portal_of[i], {"msgtype": "m.text", "body": body})
        def answered(sent: dict[str, Any], body: str = body) -> bool:
            return bool((sent.get("text") or {}).get("body") == body)
        await s.wa.wait_for_sent(answered, timeout=120)


# --- traffic --------------------------------------------------------------------------


async def paced(rate: float, stop_at: float, fire: Callable[[int], Awaitable[None]],
                s: Setup, tracker: Tracker) -> int:
    """Start fire(0), fire(1), ... at `rate`/s until loop time `stop_at` (open loop: each
    starts on schedule whether or not earlier ones finished); returns how many."""
    if rate <= 0:
        return 0
    loop = asyncio.get_running_loop()
    start, i = loop.time(), 0
    while (due := start + i / rate) < stop_at:
        delay = due - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        else:
            tracker.slip = max(tracker.slip, -delay)
        s.meta.spawn(fire(i))
        i += 1
    return i


def inbound_sender(s: Setup, tracker: Tracker, rng: random.Random, media_share: float,
                   image_bytes: int) -> Callable[[int], Awaitable[None]]:
    async def fire(i: int) -> None:
        lane = i % len(s.citizens)
        citizen = s.citizens[lane]
        body = f"{PREFIX}i{i:06d} c{lane}"
        if rng.random() < media_share:
            item = tracker.inbound[body] = Item("image", lane, i)
            media_id = s.wa.add_media(os.urandom(image_bytes), "image/jpeg")
            value = s.wa.media_message(citizen, "image", media_id, caption=body)
        else:
            item = tracker.inbound[body] = Item("text", lane, i)
            value = s.wa.text_message(citizen, body)
        item.sent = time.perf_counter()
        item.accepted = await s.meta.deliver(value)
    return fire


def staff_sender(s: Setup, tracker: Tracker) -> Callable[[int], Awaitable[None]]:
    turns = [asyncio.Lock() for _ in s.citizens]  # each room in order, as Element sends

    async def fire(j: int) -> None:
        lane = j % len(s.citizens)
        body = f"{PREFIX}o{j:06d} c{lane}"
        item = tracker.outbound[body] = Item("reply", lane, j)
        async with turns[lane]:
            item.sent = time.perf_counter()
            resp = await s.staff.client.room_send(
                s.observer.portal_of[lane], "m.room.message", {"msgtype": "m.text", "body": body},
                ignore_unverified_devices=True)
        if isinstance(resp, nio.RoomSendResponse):
            item.accepted, item.event_id = True, resp.event_id
        else:
            tracker.staff_send_errors += 1
    return fire


# --- sampling and per-minute figures ------------------------------------------------


@dataclass
class Sample:
    t: float  # seconds since the measured run started
    rss_kib: int
    fds: int
    inbound_pending: int  # every inbound row pending: the sum of the three below
    messages_pending: int  # WhatsApp messages (citizens' lanes)
    statuses_pending: int  # WhatsApp delivery statuses (the bridge gives them one lane)
    matrix_pending: int  # Matrix events from appservice transactions
    outbox_pending: int
    cpu: tuple[float, float, float]  # CPU seconds so far: bench, bridge, Synapse


async def sample(s: Setup, t0: float, cpu_bridge: CPU, cpu_synapse: CPU) -> Sample:
    if not s.bridge.alive():
        raise BenchError("the bridge process exited:\n" + s.bridge.tail())
    s.observer.check_running()
    s.meta.check()
    async with s.queues.connect() as conn:
        # 'statuses' is the lane the bridge's webhook gives every delivery status.
        row = (await conn.execute(text(
            "SELECT (SELECT count(*) FROM inbound WHERE status = 'pending' "
            "AND source = 'whatsapp' AND lane <> 'statuses'), "
            "(SELECT count(*) FROM inbound WHERE status = 'pending' "
            "AND source = 'whatsapp' AND lane = 'statuses'), "
            "(SELECT count(*) FROM inbound WHERE status = 'pending' AND source = 'matrix'), "
            "(SELECT count(*) FROM outbox WHERE status = 'pending')"))).one()
    bench, bridge = cpu_bridge.now()
    messages, statuses, matrix, outbox = (int(x) for x in row)
    return Sample(time.perf_counter() - t0, s.bridge.rss_kib(), s.bridge.fds(),
                  messages + statuses + matrix, messages, statuses, matrix, outbox,
                  (bench, bridge, cpu_synapse.now()[1]))


def _ms(values: list[float], q: int) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return round(values[0] * 1000, 1)
    return round(statistics.quantiles(values, n=100, method="inclusive")[q - 1] * 1000, 1)


def window_row(label: str, a: float, b: float, tracker: Tracker, first: Sample,
               last: Sample) -> dict[str, Any]:
    """Figures of the window [a, b) (perf_counter times); samples at its two ends."""
    seconds = max(b - a, 1e-9)
    inb = [i for i in tracker.inbound.values() if a <= i.arrived < b]
    out = [i for i in tracker.outbound.values() if a <= i.arrived < b]
    cpu = [round((y - x) / (last.t - first.t) * 100, 1) if last.t > first.t else None
           for x, y in zip(first.cpu, last.cpu, strict=True)]
    return {
        "window": label, "seconds": round(b - a, 1),
        "in_sent_per_s": round(sum(a <= i.sent < b for i in tracker.inbound.values())
                               / seconds, 2),
        "in_per_s": round(len(inb) / seconds, 2),
        "in_p50_ms": _ms([i.latency for i in inb], 50),
        "in_p99_ms": _ms([i.latency for i in inb], 99),
        "out_sent_per_s": round(sum(a <= i.sent < b for i in tracker.outbound.values())
                                / seconds, 2),
        "out_per_s": round(len(out) / seconds, 2),
        "out_p50_ms": _ms([i.latency for i in out], 50),
        "out_p99_ms": _ms([i.latency for i in out], 99),
        "rss_mib": round(last.rss_kib / 1024, 1), "fds": last.fds,
        "messages_pending": last.messages_pending, "statuses_pending": last.statuses_pending,
        "matrix_pending": last.matrix_pending, "outbox_pending": last.outbox_pending,
        "cpu_pct_bench": cpu[0], "cpu_pct_bridge": cpu[1], "cpu_pct_synapse": cpu[2],
        "load": load_average(),
    }


def print_row(r: dict[str, Any], file: Any = sys.stderr) -> None:
    def f(v: Any) -> str:
        return "-" if v is None else f"{v:g}" if isinstance(v, float) else str(v)
    print(f"{r['window']:>7} {f(r['in_sent_per_s']):>6} {f(r['in_per_s']):>6} "
          f"{f(r['in_p50_ms']):>8} {f(r['in_p99_ms']):>8} {f(r['out_sent_per_s']):>6} "
          f"{f(r['out_per_s']):>6} {f(r['out_p50_ms']):>8} {f(r['out_p99_ms']):>8} "
          f"{f(r['rss_mib']):>7} {r['fds']:>4} {r['messages_pending']:>5} "
          f"{r['statuses_pending']:>5} {r['matrix_pending']:>5} "
          f"{r['outbox_pending']:>5} {f(r['cpu_pct_bridge']):>6} {f(r['cpu_pct_synapse']):>6} "
          f"{f(r['cpu_pct_bench']):>6}  {r['load']}", file=file, flush=True)


HEADER = (f"{'window':>7} {'in off':>6} {'in/s':>6} {'in p50':>8} {'in p99':>8} "
          f"{'out off':>6} {'out/s':>6} {'out p50':>8} {'out p99':>8} {'RSS MiB':>7} "
          f"{'fds':>4} {'inQ':>5} {'stQ':>5} {'mxQ':>5} {'outQ':>5} {'%br':>6} {'%syn':>6} "
          f"{'%bench':>6}  load")


async def run_traffic(s: Setup, args: argparse.Namespace, tracker: Tracker,
                      rng: random.Random) -> tuple[list[dict[str, Any]], list[Sample]]:
    """The measured minutes, then the drain; per-minute rows and every sample."""
    cpu_bridge, cpu_synapse = CPU(s.bridge.pid), CPU(s.synapse_pid)
    loop = asyncio.get_running_loop()
    t0 = time.perf_counter()
    stop_at = loop.time() + args.minutes * 60
    samples = [await sample(s, t0, cpu_bridge, cpu_synapse)]
    rows: list[dict[str, Any]] = []
    s.meta.reacting = True
    generators = asyncio.gather(
        paced(args.inbound_rate, stop_at, inbound_sender(
            s, tracker, rng, args.media_share, args.image_kib * 1024), s, tracker),
        paced(args.staff_rate, stop_at, staff_sender(s, tracker), s, tracker))
    progress(HEADER)
    minute_start, ticks = samples[0], 0
    per_minute = round(60 / SAMPLE_SECONDS)
    try:
        while not generators.done():
            ticks += 1  # on a fixed grid, so that sample times do not drift
            await asyncio.wait([generators], timeout=max(
                0.0, t0 + ticks * SAMPLE_SECONDS - time.perf_counter()))
            samples.append(await sample(s, t0, cpu_bridge, cpu_synapse))
            now = samples[-1]
            if ticks % per_minute == 0 or (generators.done() and now.t - minute_start.t > 2):
                rows.append(window_row(f"min {len(rows) + 1}", t0 + minute_start.t,
                                       t0 + now.t, tracker, minute_start, now))
                print_row(rows[-1])
                minute_start = now
        generators.result()
    finally:
        s.meta.reacting = False
        if not generators.done():  # interrupted
            generators.cancel()
            with suppress(asyncio.CancelledError):
                await generators
    # Drain: everything accepted arrives, every status is posted, the queues empty.
    drain_start, deadline = samples[-1], loop.time() + args.drain_seconds
    while loop.time() < deadline:
        now = samples[-1]
        if not tracker.pending() and not s.meta.tasks and not now.inbound_pending \
                and not now.outbox_pending:
            break
        await asyncio.sleep(1.0)
        samples.append(await sample(s, t0, cpu_bridge, cpu_synapse))
    settled = samples[-1].t - drain_start.t
    # Idle, so that the last sample is comparable with the first (taken idle, after the
    # warm-up): HTTP keep-alive connections close after 15 s unused. A duplicate would
    # show up meanwhile too.
    await asyncio.sleep(IDLE_SECONDS)
    samples.append(await sample(s, t0, cpu_bridge, cpu_synapse))
    rows.append(window_row("drain", t0 + drain_start.t, t0 + samples[-1].t + 1, tracker,
                           drain_start, samples[-1]) | {"settled_s": round(settled, 1)})
    print_row(rows[-1])
    return rows, samples


# --- verdicts -------------------------------------------------------------------------


def tally(group: dict[str, Item]) -> dict[str, int]:
    items = list(group.values())
    return {"sent": len(items),
            "refused": sum(not i.accepted for i in items),  # never accepted (no 200)
            "arrived": sum(i.copies > 0 for i in items),
            "lost": sum(i.accepted and not i.copies for i in items),
            "duplicated": sum(i.copies > 1 for i in items)}


def out_of_order(order: dict[int, list[int]]) -> int:
    """Messages that arrived after a later one of the same citizen."""
    return sum(1 for seqs in order.values() for x, y in itertools.pairwise(seqs)
               if y < x)


def growth(samples: list[Sample], minutes: float, what: str) -> dict[str, Any]:
    """Median of the last traffic minute against the median of minute 2 (minute 1 is
    warm-up); n/a for runs shorter than three minutes (nothing to compare)."""
    def median(a: float, b: float) -> float | None:
        values = [getattr(x, what) for x in samples if a <= x.t < b]
        return statistics.median(values) if values else None
    end = minutes * 60
    base = median(60, 120) if minutes >= 3 else None
    last = median(end - 60, end + 0.5) if minutes >= 3 else None
    if base is None or last is None:
        return {"target": f"{what}_growth", "verdict": "n/a", "value": None,
                "baseline": base, "last": last, "limit": TARGET_GROWTH}
    value = last / base - 1
    return {"target": f"{what}_growth", "value": round(value, 4), "baseline": base,
            "last": last, "limit": TARGET_GROWTH,
            "verdict": "PASS" if value <= TARGET_GROWTH else "MISS"}


def verdicts(counts: dict[str, dict[str, int]], samples: list[Sample],
             minutes: float) -> list[dict[str, Any]]:
    out = []
    for way, c in counts.items():
        lost = c["lost"] + c["refused"]
        out.append({"target": f"{way}_lost", "value": lost, "limit": 0,
                    "verdict": "PASS" if lost == 0 else "MISS"})
        out.append({"target": f"{way}_duplicated", "value": c["duplicated"], "limit": 0,
                    "verdict": "PASS" if c["duplicated"] == 0 else "MISS"})
    stuck = samples[-1].inbound_pending + samples[-1].outbox_pending
    out.append({"target": "queued_after_drain", "value": stuck, "limit": 0,
                "verdict": "PASS" if stuck == 0 else "MISS"})
    out.append(growth(samples, minutes, "rss_kib"))
    out.append(growth(samples, minutes, "fds"))
    return out


# --- run and report -------------------------------------------------------------------


async def run(args: argparse.Namespace) -> dict[str, Any]:
    seed = args.seed if args.seed is not None else secrets.randbits(32)
    rng = random.Random(seed)
    tracker = Tracker()
    started = time.perf_counter()
    with temp_workdir() as workdir:
        async with AsyncExitStack() as stack:
            progress(f"setting up Synapse, the Cloud API simulator and the bridge in {workdir}")
            s = await asyncio.wait_for(set_up(workdir, stack, args, tracker, rng), 300)
            progress("warming up")
            await warm_up(s)
            load_before = load_average()
            progress(f"soaking for {args.minutes:g} min: {args.inbound_rate:g} inbound/s "
                     f"({args.media_share:.0%} images), {args.staff_rate:g} staff replies/s, "
                     f"{len(s.citizens)} citizens; bridge pid {s.bridge.pid} "
                     "(RSS, fds and CPU are that process's)")
            rows, samples = await run_traffic(s, args, tracker, rng)
            bridge_metrics = await metrics(s.http, s.bridge.metrics_url)
            obs = s.observer
            staff = {"syncs": obs.syncs, "sync_errors": obs.sync_errors,
                     "undecryptable": obs.undecryptable,
                     "timeline_gaps": obs.limited, "notices": dict(obs.notices.most_common()),
                     "send_errors": tracker.staff_send_errors}
            progress("stopping")
            await s.bridge.stop()
            bridge_log = s.bridge.log_summary()
    counts = {"inbound": tally(tracker.inbound), "outbound": tally(tracker.outbound),
              "reactions": tally(tracker.reactions)}
    images = [i for i in tracker.inbound.values() if i.kind == "image"]
    everything = {"in": [i.latency for i in tracker.inbound.values() if i.copies],
                  "out": [i.latency for i in tracker.outbound.values() if i.copies]}
    return {
        "minutes": args.minutes, "citizens": args.citizens, "inbound_rate": args.inbound_rate,
        "staff_rate": args.staff_rate, "media_share": args.media_share,
        "image_kib": args.image_kib, "reaction_share": args.reaction_share,
        "bridge_db": args.bridge_db, "synapse_db": args.synapse_db, "seed": seed,
        "cpus": os.cpu_count(), "load_before": load_before, "load_after": load_average(),
        "rows": rows,
        "samples": [{"t": round(x.t, 1), "rss_kib": x.rss_kib, "fds": x.fds,
                     "messages_pending": x.messages_pending,
                     "statuses_pending": x.statuses_pending, "matrix_pending": x.matrix_pending,
                     "outbox_pending": x.outbox_pending}
                    for x in samples],
        "counts": counts,
        "idle": {"before_traffic": {"rss_kib": samples[0].rss_kib, "fds": samples[0].fds},
                 "after_drain": {"rss_kib": samples[-1].rss_kib, "fds": samples[-1].fds}},
        "images": {"sent": len(images), "arrived": sum(i.copies > 0 for i in images)},
        "latency_ms": {way: {"p50": _ms(v, 50), "p99": _ms(v, 99)}
                       for way, v in everything.items()},
        "out_of_order": {"inbound": out_of_order(tracker.order_in),
                         "outbound": out_of_order(tracker.order_out)},
        "statuses_posted": tracker.statuses,
        "webhook_redeliveries": tracker.webhook_redeliveries,
        "load_generator_lag_ms": round(tracker.slip * 1000, 1),
        "staff": staff, "bridge_metrics": bridge_metrics, "bridge_log": bridge_log,
        "verdicts": verdicts(counts, samples, args.minutes),
        "seconds": round(time.perf_counter() - started, 1),
    }


def print_table(r: dict[str, Any]) -> None:
    print(f"\nsoak: {r['minutes']:g} min, {r['citizens']} citizens, {r['inbound_rate']:g} "
          f"inbound/s ({r['media_share']:.0%} images of {r['image_kib']} KiB), "
          f"{r['staff_rate']:g} staff replies/s, reactions to {r['reaction_share']:.0%} of "
          f"replies; bridge DB {r['bridge_db']}, Synapse DB {r['synapse_db']}; seed "
          f"{r['seed']}; {r['cpus']} CPUs, load average before/after {r['load_before']} / "
          f"{r['load_after']}")
    print(HEADER)
    for row in r["rows"]:
        print_row(row, sys.stdout)
    print("(per window: off = offered/s, in/s and out/s = arrived/s; latency ms: in = webhook "
          "POST until staff decrypted it, out = staff send until Graph got it; RSS, fds, "
          "%br = the bridge process; queues at the window's end: inQ = WhatsApp messages "
          "pending, stQ = statuses pending, mxQ = Matrix events pending, outQ = outbox not "
          "sent; %CPU of one core)")
    idle = r["idle"]
    print(f"bridge right after the warm-up: RSS "
          f"{idle['before_traffic']['rss_kib'] / 1024:.1f} MiB, {idle['before_traffic']['fds']} "
          f"fds; after the drain and {IDLE_SECONDS:g} s idle: RSS "
          f"{idle['after_drain']['rss_kib'] / 1024:.1f} MiB, {idle['after_drain']['fds']} fds "
          "(fds while busy follow the open HTTP connections)")
    lat = r["latency_ms"]
    print(f"drain: {r['rows'][-1]['settled_s']:g} s until everything had arrived and the "
          "queues were empty (or --drain-seconds ran out)")
    print(f"whole run latency p50/p99: inbound {lat['in']['p50']} / {lat['in']['p99']} ms, "
          f"outbound {lat['out']['p50']} / {lat['out']['p99']} ms")
    for way, c in r["counts"].items():
        print(f"{way:9}: sent {c['sent']}, arrived {c['arrived']}, lost {c['lost']}, "
              f"never accepted {c['refused']}, duplicated {c['duplicated']}")
    print(f"images: {r['images']['arrived']} of {r['images']['sent']} arrived; statuses "
          f"posted: {r['statuses_posted']}; webhook redeliveries: {r['webhook_redeliveries']}; "
          f"out of order (per citizen): in {r['out_of_order']['inbound']}, out "
          f"{r['out_of_order']['outbound']}; load generator lag <= "
          f"{r['load_generator_lag_ms']:g} ms")
    staff = r["staff"]
    print(f"staff: {staff['syncs']} syncs ({staff['sync_errors']} failed), "
          f"{staff['undecryptable']} undecryptable, "
          f"{staff['timeline_gaps']} timeline gaps, {staff['send_errors']} send errors")
    for body, n in staff["notices"].items():
        print(f"  bridge notice x{n}: {body}")
    if r["bridge_metrics"]:
        print("bridge counters: " + ", ".join(f"{k} {v:g}" for k, v in
                                              r["bridge_metrics"].items()))
    for line, n in r["bridge_log"].items():
        print(f"  bridge log x{n}: {line}")
    for v in r["verdicts"]:
        if v["target"].endswith("_growth"):
            base, last = v["baseline"], v["last"]
            def unit(x: float, rss: bool = v["target"].startswith("rss")) -> str:
                return f"{x / 1024:.1f} MiB" if rss else f"{x:g}"
            detail = (f"{unit(base)} (minute 2) -> {unit(last)} (last minute): "
                      f"{v['value']:+.1%}" if v["value"] is not None
                      else "needs --minutes >= 3")
            print(f"{v['target']}: {detail} (target <= {v['limit']:.0%}) {v['verdict']}")
        else:
            print(f"{v['target']}: {v['value']} (target {v['limit']}) {v['verdict']}")
    print(f"total {r['seconds']:.0f} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0,
                        help="minutes of traffic; the first is warm-up (default 10)")
    parser.add_argument("--citizens", type=int, default=20, metavar="K",
                        help="opted-in citizens, one portal each (default 20)")
    parser.add_argument("--inbound-rate", type=float, default=5.0, metavar="R",
                        help="inbound WhatsApp messages per second (default 5)")
    parser.add_argument("--staff-rate", type=float, default=2.0, metavar="R",
                        help="staff replies per second (default 2)")
    parser.add_argument("--media-share", type=float, default=0.2, metavar="F",
                        help="share of inbound messages that are images (default 0.2)")
    parser.add_argument("--image-kib", type=int, default=64,
                        help="size of each image in KiB (default 64)")
    parser.add_argument("--reaction-share", type=float, default=0.25, metavar="F",
                        help="share of staff replies the citizen reacts to (default 0.25)")
    parser.add_argument("--drain-seconds", type=float, default=180.0,
                        help="after the traffic, wait at most this long for everything to "
                             "arrive and the queues to empty (default 180)")
    parser.add_argument("--bridge-db", choices=("sqlite", "postgresql"), default="sqlite",
                        help="the bridge's database: sqlite (default) or a throwaway "
                             "PostgreSQL database ($CIVIC_BRIDGE_BENCH_PG)")
    parser.add_argument("--synapse-db", choices=("sqlite", "postgresql"), default="sqlite",
                        help="Synapse's own store (default sqlite)")
    parser.add_argument("--seed", type=int, help="seed of the traffic's random choices")
    add_output_options(parser)
    args = parser.parse_args()
    if (args.minutes <= 0 or args.citizens < 1 or args.inbound_rate < 0 or args.staff_rate < 0
            or not 0 <= args.media_share <= 1 or not 0 <= args.reaction_share <= 1
            or args.image_kib < 1 or args.drain_seconds < 0):
        parser.error("need --minutes > 0, --citizens >= 1, rates >= 0, shares in [0, 1], "
                     "--image-kib >= 1 and --drain-seconds >= 0")
    setup_logging(args.verbose)
    report = run_guarded(lambda: run(args))
    if report is None:
        return 130
    if args.json:
        print(json.dumps(report, indent=2, ensure_ascii=False))
    else:
        print_table(report)
    return 1 if any(v["verdict"] == "MISS" for v in report["verdicts"]) else 0


if __name__ == "__main__":
    sys.exit(main())
