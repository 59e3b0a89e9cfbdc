"""The daily export of the audit chain's head (an anchor) to where an insider cannot
rewrite it: `audit.anchor_command` is run with the anchor, one JSON line, on stdin.

Anchors catch what the keyed chain alone cannot: the newest entries removed, or the
trail rewritten by someone holding `audit.key`. `civic-bridge admin audit verify
--anchor FILE` checks the trail against the exported lines.

Once per UTC day: the day of the last export is kept in the database (kv), so a restart
neither skips nor repeats it, and a failed export is retried at the next check.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import UTC, datetime

from bridge.auditchain import Anchor, anchor_for
from bridge.db import Database
from bridge.metrics import Metrics

log = logging.getLogger(__name__)
LAST_ANCHOR_DAY = "audit.anchor.day"
COMMAND_TIMEOUT = 60.0


class AnchorPublisher:
    """Runs `command` with the current head once per UTC day (see the module doc)."""

    def __init__(self, db: Database, command: list[str], metrics: Metrics,
                 now: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self._db = db
        self._command = command
        self._metrics = metrics
        self._now = now

    async def run(self, every: float = 600.0) -> None:
        """Check every `every` seconds whether today's anchor is still due."""
        while True:
            await self.tick()
            await asyncio.sleep(every)

    async def tick(self) -> Anchor | None:
        """Export today's anchor if not done yet; the anchor exported, else None."""
        today = self._now().date()
        if await self._db.kv.get(LAST_ANCHOR_DAY) == today.isoformat():
            return None
        intact, first_bad = await self._db.audit.verify()
        if not intact:
            # Anchoring a tampered trail would vouch for it; say so every check instead.
            self._metrics.audit_anchors.labels("broken").inc()
            log.error("audit chain broken at entry %s: today's anchor is not exported; "
                      "run `civic-bridge admin audit verify` and investigate", first_bad)
            return None
        head = await self._db.audit.head()
        if head is None:
            return None  # nothing to anchor yet
        anchor = anchor_for(today, head.id, head.hash)
        problem = await self._send(anchor)
        if problem is not None:
            self._metrics.audit_anchors.labels("failed").inc()
            log.warning("audit anchor not exported: audit.anchor_command %s; retrying at "
                        "the next check", problem)
            return None
        await self._db.kv.set(LAST_ANCHOR_DAY, today.isoformat())
        self._metrics.audit_anchors.labels("ok").inc()
        await self._db.audit.append("bridge", "audit.anchor", f"entry {head.id}", "ok",
                                    f"head of {anchor.date} exported")
        log.info("audit anchor exported: entry %d of %s", head.id, anchor.date)
        return anchor

    async def _send(self, anchor: Anchor) -> str | None:
        """None if the command took the anchor, else what went wrong (no output echoed:
        it is the operator's program, and its messages are not ours to log)."""
        try:
            proc = await asyncio.create_subprocess_exec(
                *self._command, stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        except OSError as exc:
            return f"could not be started ({type(exc).__name__}: {exc.strerror})"
        try:
            await asyncio.wait_for(proc.communicate((anchor.line() + "\n").encode()),
                                   COMMAND_TIMEOUT)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            return f"did not finish within {COMMAND_TIMEOUT:.0f}s"
        if proc.returncode != 0:
            return f"exited with status {proc.returncode}"
        return None
