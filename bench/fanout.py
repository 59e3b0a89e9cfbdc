"""Room fan-out at scale: one room, N WhatsApp members, P staff posts, through the outbox.

Not a test: prints the outbox's send throughput against a bare aiohttp client posting
the same bodies to the same Cloud API simulator in the same run (target >= 0.9x), the
time from the first post to the last delivery, and peak RSS over idle (target <= 150 MB),
then checks that every member got every post exactly once and in order.

    .venv/bin/python bench/fanout.py [--members 1000] [--posts 20] [--rate 0] \
        [--interval 0] [--restart-at 0.3] [--blocks 4] [--queue-first] \
        [--database-url URL] [--json] [--profile FILE] [--py-spy FILE]

No Synapse: the posts enter where the relay hands a decrypted room event to
`bridge.rooms_wa.fanout.FanOut.send` (display names and power levels are what Synapse
would add), so the figures are the bridge's own: queueing (one outbox row per member and
post, in the database), and the outbox sending them to Graph (the simulator, which checks
every body against the Graph contract). `--rate` is `whatsapp.max_sends_per_second`
(0 = unlimited; Meta's default is 80, which then bounds both figures), `--interval` is
`whatsapp.recipient_interval_seconds`. `--restart-at F` stops the outbox after a fraction
F of the sends and starts a new one on the same database (a restart: nothing may be lost
or sent twice; the delivery statuses Meta would send are fed to it, as the webhook does).
`--queue-first` queues every post before the outbox starts, so that the figures are
the outbox's alone (by default it sends while `FanOut.send` is still queueing, and the
time to last delivery includes the queueing). SQLite in a temporary directory unless
`--database-url` (an empty database) is given.

The bridge and the bare client take turns: the posts are split into `--blocks` blocks;
the outbox sends a block, stops, and the bare client posts the same bodies, then the
next block. A machine whose speed drifts during the run (other work, a noisy host)
slows both alike; the ratio is of the totals, and the per-block ratios are printed
with it. `--profile` and `--py-spy` cover every block (bare turns included): use
`--blocks 1` to profile the bridge alone.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import cProfile
import json
import logging
import os
import resource
import secrets
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _harness import CPU

from bridge.auditchain import AuditKeys
from bridge.config import RoomsConfig, WhatsAppConfig, parse_config
from bridge.db import Database, upgrade
from bridge.devtools.simulator import SENT_PATH
from bridge.heap import freeze_startup_heap
from bridge.matrix.api import MatrixAPI
from bridge.metrics import Metrics
from bridge.privacy import AAD_IDENTIFIER, AAD_WA_ID, Privacy
from bridge.rooms_wa.fanout import FanOut
from bridge.rooms_wa.members import Members
from bridge.types import EventID, RoomID, UserID
from bridge.whatsapp.graph import GraphClient
from bridge.whatsapp.outbox import Outbox, callback_item
from bridge.whatsapp.pacing import Pacer

PHONE_ID = "109876543210"
ROOM = RoomID("!bench-announcements:localhost")


class Resends(logging.Handler):
    """Counts sends made again after the confirmation window found no status (the
    outbox's at-least-once case: each is a duplicate)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += "sending again" in str(record.msg)


def rss_mb() -> float:
    """Current resident set size (Linux /proc), in MB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3


def _key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


async def populate(db: Database, privacy: Privacy, members: int) -> list[str]:
    """N opted-in WhatsApp members of one announcement room, windows open."""
    await db.rooms.create(ROOM, "announcement", "Avisos del Ayuntamiento", UserID("@a:x"))
    numbers = []
    now = datetime.now(UTC)
    for n in range(members):
        wa_id = f"3460{n:07d}"
        numbers.append(wa_id)
        citizen = await db.citizens.create(
            index_hash=privacy.index.digest(wa_id),
            identifier_ct=privacy.cipher.encrypt(wa_id, aad=AAD_IDENTIFIER),
            wa_id_ct=privacy.cipher.encrypt(wa_id, aad=AAD_WA_ID),
            pseudonym_code=f"B{n:06d}")
        await db.citizens.touch_inbound(citizen.id, now)
        member = await db.wa_rooms.invite(ROOM, citizen.id, f"Vecino/a {n}", "bench", "0" * 64)
        await db.wa_rooms.set_state(member.id, "joined")
    return numbers


async def bare(api_base: str, token: str, bodies: list[dict[str, Any]], concurrency: int
               ) -> float:
    """A bare aiohttp client posting the same bodies with the outbox's concurrency, each
    recipient's in order (as the outbox must); when it started (`time.monotonic()`)."""
    url = f"{api_base}/{PHONE_ID}/messages"
    headers = {"Authorization": f"Bearer {token}"}
    lanes: dict[str, list[dict[str, Any]]] = {}
    for body in bodies:
        lanes.setdefault(str(body.get("to")), []).append(body)
    queue = list(lanes.values())

    async def worker(http: aiohttp.ClientSession) -> None:
        while queue:
            for body in queue.pop():
                async with http.post(url, json=body, headers=headers) as resp:
                    await resp.read()
                    if resp.status != 200:
                        raise RuntimeError(f"bare send refused: {resp.status}")

    async with aiohttp.ClientSession() as http:
        start = time.monotonic()
        await asyncio.gather(*(worker(http) for _ in range(concurrency)))
        return start


class Simulator:
    """The Cloud API simulator in a process of its own, as Graph is on Meta's servers:
    its work (checking every body against the contract) does not compete with the
    bridge's for this process's core. Reads what it accepted over HTTP."""

    def __init__(self) -> None:
        self.access_token = secrets.token_urlsafe(16)
        self.app_secret = secrets.token_hex(16)
        self.sent: list[dict[str, Any]] = []
        self.callback_data: dict[str, str] = {}  # wamid -> biz_opaque_callback_data
        self._proc: asyncio.subprocess.Process | None = None
        self.api_base = ""

    async def start(self) -> str:
        env = {**os.environ, "SIMULATOR_ACCESS_TOKEN": self.access_token,
               "SIMULATOR_APP_SECRET": self.app_secret, "SIMULATOR_PHONE_NUMBER_ID": PHONE_ID}
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bridge.devtools.simulator", env=env,
            stdout=asyncio.subprocess.PIPE, cwd=Path(__file__).resolve().parent.parent)
        assert self._proc.stdout is not None
        self.api_base = (await self._proc.stdout.readline()).decode().strip()
        self._http = aiohttp.ClientSession(
            headers={"Authorization": f"Bearer {self.access_token}"})
        return self.api_base

    async def poll(self) -> int:
        """Fetch the sends accepted since the last poll; how many there are in all."""
        root = self.api_base.rsplit("/", 1)[0]
        async with self._http.get(f"{root}{SENT_PATH}", params={"after": len(self.sent)}
                                  ) as resp:
            data = await resp.json()
        for entry in data["sent"]:
            body = entry["body"]
            self.sent.append(body)
            if "biz_opaque_callback_data" in body:
                self.callback_data[entry["wamid"]] = body["biz_opaque_callback_data"]
        return len(self.sent)

    async def total(self) -> tuple[int, float]:
        """How many sends the simulator has accepted, and when the last one was
        (`time.monotonic()`), without their bodies: polled while the outbox runs, so
        that reading bodies is not charged to the bridge's CPU. The finish line of both
        the bridge and the bare client is that time, not the poll that saw it."""
        root = self.api_base.rsplit("/", 1)[0]
        async with self._http.get(f"{root}{SENT_PATH}", params={"after": 2**62}) as resp:
            data = await resp.json()
        return int(data["total"]), float(data["last_at"])

    def cpu(self) -> float:
        """CPU seconds the simulator has used (utime + stime, from /proc)."""
        assert self._proc is not None
        return CPU(self._proc.pid).now()[1]

    async def stop(self) -> None:
        if self._proc is not None:
            await self._http.close()
            self._proc.terminate()
            await self._proc.wait()


async def _py_spy(path: str) -> asyncio.subprocess.Process:
    """py-spy sampling this process (every thread) for the sending phase only."""
    spy = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(os.getpid()),
        "--threads", "--rate", "250", "--format", "raw", "--output", path,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    await asyncio.sleep(0.5)  # attached before the first send
    return spy


def _blocks(posts: int, blocks: int) -> list[range]:
    """The posts in `blocks` runs of consecutive posts, as even as they split."""
    blocks = max(1, min(blocks, posts))
    cuts = [round(posts * b / blocks) for b in range(blocks + 1)]
    return [range(cuts[b], cuts[b + 1]) for b in range(blocks)]


async def _restart(box: Outbox, outbox: Callable[[], Outbox], db: Database, sim: Simulator,
                   total: int) -> Outbox:
    """Stop the outbox mid-send and start a new one on the same database, as a restarted
    bridge would; returns the new one."""
    await box.stop()
    await sim.poll()  # what was posted up to the stop
    box = outbox()
    # The delivery statuses Meta sends settle the sends cut short by the stop (in
    # production they come in by the webhook); those of sends already recorded change
    # nothing, and are not fed.
    pending = await db.outbox.due(datetime.now(UTC) + timedelta(days=1), limit=total)
    in_flight = {i.id for i in pending if i.sending_at is not None}
    for wamid, data in sim.callback_data.items():
        if callback_item(data) in in_flight:
            await box.settle_by_status(data, wamid, "sent")
    box.start()
    return box


async def run(args: argparse.Namespace) -> dict[str, Any]:
    idle = rss_mb()
    resends = Resends()
    logging.getLogger("bridge.whatsapp.outbox_sender").addHandler(resends)
    with tempfile.TemporaryDirectory(prefix="fanout-") as tmp:
        url = args.database_url or f"sqlite+aiosqlite:///{Path(tmp) / 'bench.db'}"
        await upgrade(url)
        sim = Simulator()
        api_base = await sim.start()
        config = parse_config({
            "homeserver": {"url": "http://127.0.0.1:9", "domain": "localhost"},
            "appservice": {"as_token": secrets.token_hex(16), "hs_token": secrets.token_hex(16),
                           "store_dir": str(Path(tmp) / "store")},
            "database": {"url": url},
            "privacy": {"data_key": _key(), "index_key": _key()},
            "audit": {"key": _key()},
            "admin": {"token": secrets.token_hex(16)},
        }, base=Path(tmp)).model_copy(update={
            "whatsapp": WhatsAppConfig(enabled=True, api_base=api_base,
                                       phone_number_id=PHONE_ID, access_token=sim.access_token,
                                       app_secret=sim.app_secret, verify_token="v",
                                       max_sends_per_second=args.rate,
                                       recipient_interval_seconds=args.interval),
            "rooms": RoomsConfig(staff_label="Ayuntamiento · {name}")})
        db = await Database.open(url, audit_keys=AuditKeys.from_base64(config.audit.key, []))
        http = aiohttp.ClientSession()
        privacy = Privacy.from_config(config.privacy)
        metrics = Metrics()
        graph = GraphClient.from_config(http, config.whatsapp)
        api = MatrixAPI(http, config.homeserver.url, config.appservice.as_token)

        async def nobody(room_id: RoomID, text: str) -> None:
            return None

        def outbox() -> Outbox:
            box = Outbox(db, privacy, graph, api, UserID("@bot:localhost"), nobody, metrics,
                         confirm_window=timedelta(seconds=60))
            box.pacer = Pacer(args.rate, args.interval)
            box.concurrency = args.concurrency
            return box

        try:
            await populate(db, privacy, args.members)
            # Only what FanOut.send uses of Members is its database and config.
            members = Members(config, db, api, None, None, None,  # type: ignore[arg-type]
                              outbox(), privacy, metrics)
            room = await db.rooms.get(ROOM)
            assert room is not None
            recipients = await db.wa_rooms.in_room(ROOM)
            box = outbox()
            fan = FanOut(config, db, api, None, members, box, privacy,  # type: ignore[arg-type]
                         metrics)
            total = args.members * args.posts
            freeze_startup_heap()  # as `civic-bridge run` does once ready (bridge.heap)
            spy = await _py_spy(args.py_spy) if args.py_spy else None
            profile = cProfile.Profile() if args.profile else None
            if profile:
                profile.enable()
            # Bridge and bare take turns, block by block, on the same bodies: a machine
            # that speeds up or slows down during the run affects both alike.
            ours = theirs = cpu = bare_cpu = queued = restart = 0.0
            graph_cpu = {"bridge": 0.0, "bare": 0.0}  # the simulator's, in each one's turns
            blocks: list[dict[str, float]] = []
            sends: list[dict[str, Any]] = []  # what the bridge sent, in Graph's order
            restarted = False
            for posts in _blocks(args.posts, args.blocks):
                size = args.members * len(posts)
                base = len(sim.sent)  # the simulator's count before this block
                t0, c0 = time.monotonic(), time.process_time()
                g0 = sim.cpu()
                if not args.queue_first:
                    box.start()
                for p in posts:
                    await fan.send(room, EventID(f"$post{p}"), "m.room.message",
                                   {"msgtype": "m.text", "body": f"Aviso {p + 1:02d}: corte "
                                    "de agua mañana de 9 a 12 en la calle Mayor."},
                                   "Ayuntamiento · Ana", recipients)
                queued += time.monotonic() - t0
                if args.queue_first:  # time the outbox alone: from its start to the last send
                    t0, c0 = time.monotonic(), time.process_time()
                    g0 = sim.cpu()
                    box.start()
                paused = paused_cpu = 0.0  # the restart: left out, printed apart
                while (done := (polled := await sim.total())[0]) < base + size:
                    if (not restarted and args.restart_at
                            and len(sends) + done - base >= args.restart_at * total):
                        t1, c1 = time.monotonic(), time.process_time()
                        box = await _restart(box, outbox, db, sim, total)
                        fan = FanOut(config, db, api, None, members, box,  # type: ignore[arg-type]
                                     privacy, metrics)
                        restarted = True
                        paused += time.monotonic() - t1
                        paused_cpu += time.process_time() - c1
                    await asyncio.sleep(0.1)
                seconds = polled[1] - t0 - paused  # to the last send Graph accepted
                cpu += time.process_time() - c0 - paused_cpu
                graph_cpu["bridge"] += sim.cpu() - g0
                restart += paused
                await asyncio.sleep(1.0)  # anything sent twice would show now
                await box.stop()
                await sim.poll()
                sent = sim.sent[base:]
                sends += sent
                bodies = [{k: v for k, v in b.items() if k != "biz_opaque_callback_data"}
                          for b in sent]
                c0, g0 = time.process_time(), sim.cpu()
                bare_start = await bare(api_base, sim.access_token, bodies[:size],
                                        args.concurrency)
                bare_seconds = (await sim.total())[1] - bare_start
                bare_cpu += time.process_time() - c0
                graph_cpu["bare"] += sim.cpu() - g0
                await sim.poll()
                ours += seconds
                theirs += bare_seconds
                blocks.append({"bridge": round(size / seconds, 1),
                               "bare": round(size / bare_seconds, 1),
                               "ratio": round(bare_seconds / seconds, 3)})
            if profile:
                profile.disable()
                profile.dump_stats(args.profile)
            if spy:
                spy.send_signal(signal.SIGINT)
                await spy.wait()
        finally:
            await http.close()
            await db.close()
            await sim.stop()
    per: dict[str, list[str]] = {}
    for body in sends:
        per.setdefault(str(body.get("to")), []).append(body["text"]["body"][:40])
    expected = [f"*Ayuntamiento · Ana*: Aviso {p + 1:02d}" for p in range(args.posts)]
    in_order = all([t[:len(expected[0])] for t in got] == expected for got in per.values())
    ratios = sorted(b["ratio"] for b in blocks)
    return {"members": args.members, "posts": args.posts, "sends": len(sends),
            "expected": total, "duplicates": len(sends) - total,
            "resent_after_confirm_window": resends.count,
            "recipients": len(per), "in_order_per_citizen": in_order,
            "queue_seconds": round(queued, 2), "restart_seconds": round(restart, 2),
            "blocks": len(blocks),
            # Sending (and queueing, unless --queue-first) with the bare client's turns
            # and the restart left out.
            "last_delivery_seconds": round(ours, 2),
            "bridge_msgs_per_s": round(total / ours, 1),
            "bare_msgs_per_s": round(total / theirs, 1),
            "ratio": round(theirs / ours, 3),
            "ratio_per_block": f"{ratios[0]}-{ratios[-1]} (median {ratios[len(ratios) // 2]})",
            # CPU of this process (the simulator runs in its own) per send: what bounds
            # the throughput once Graph is not the bottleneck, and less noisy on a
            # shared machine than msg/s.
            "bridge_cpu_ms_per_send": round(1000 * cpu / total, 3),
            "bare_cpu_ms_per_send": round(1000 * bare_cpu / total, 3),
            # The simulator's CPU per send in the bridge's turns and in the bare client's
            # (the restart's included in the bridge's): Graph's side of the same bodies.
            "graph_cpu_ms_per_send": f"{1000 * graph_cpu['bridge'] / total:.3f} / "
                                     f"{1000 * graph_cpu['bare'] / total:.3f}",
            "rate_limit": args.rate,
            "concurrency": args.concurrency, "queue_first": args.queue_first,
            "restarted": bool(args.restart_at),
            "rss_idle_mb": round(idle, 1), "rss_peak_mb": round(peak_rss_mb(), 1),
            "rss_over_idle_mb": round(peak_rss_mb() - idle, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--members", type=int, default=1000)
    parser.add_argument("--posts", type=int, default=20)
    parser.add_argument("--rate", type=float, default=0.0)
    parser.add_argument("--interval", type=float, default=0.0)
    parser.add_argument("--concurrency", type=int, default=16,
                        help="whatsapp.outbox_concurrency (sends at once)")
    parser.add_argument("--restart-at", type=float, default=0.3)
    parser.add_argument("--blocks", type=int, default=4,
                        help="bridge and bare take turns over this many blocks of posts")
    parser.add_argument("--queue-first", action="store_true",
                        help="queue every post before starting the outbox, so that the "
                             "throughput is the outbox's alone (sending, not queueing)")
    parser.add_argument("--database-url", default="")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--profile", default="",
                        help="write a cProfile of the sending phase to this file")
    parser.add_argument("--py-spy", default="",
                        help="write py-spy's raw samples of the sending phase (every "
                             "thread) to this file")
    args = parser.parse_args()
    result = asyncio.run(run(args))
    if args.json:
        print(json.dumps(result))
        return
    for key, value in result.items():
        print(f"{key:>24}: {value}")
    ok = (result["duplicates"] == 0 and result["in_order_per_citizen"]
          and result["sends"] == result["expected"] and result["ratio"] >= 0.9
          and result["rss_over_idle_mb"] <= 150)
    print("targets:", "met" if ok else "NOT met")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
