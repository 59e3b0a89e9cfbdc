"""The demo's live progress lines: what the bridge relayed, one line per step.

Read-only: it follows the bridge's inbound queue (WhatsApp webhooks, by queue id) and
the simulator's record of what the bridge sent to WhatsApp, and describes each step
with the citizen's pseudonym. The simulated citizens' numbers never appear; message
texts do, since in the demo they are what you typed. Notices of availability get lines
of their own: the citizen's notices consent, the template sent, its delivery reports.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from bridge.db import Citizen, InboundItem
from bridge.devtools.demo_text import Print, quote
from bridge.devtools.simulator import CloudAPISimulator
from bridge.privacy import AAD_PAYLOAD
from bridge.services import Bridge
from bridge.whatsapp import consent, notice_consent, stored
from bridge.whatsapp.notice_consent import NOTICES_IN_BUTTON, NOTICES_OUT_BUTTON
from bridge.whatsapp.subscriptions import SUBSCRIPTION_CODE
from bridge.whatsapp.webhook_parse import InboundMessage, StatusUpdate

StaffReplySeen = Callable[[str], Awaitable[None]]
OUTBOX_LOOKUP_SECONDS = 5.0  # the bridge records a send's wamid just after Graph answers
# Sends are shown this late so that the inbound step that caused them (e.g. an opt-in,
# marked done just after its confirmation went out) is printed first.
SEND_DELAY_SECONDS = 0.5


def short_wamid(wamid: str) -> str:
    return wamid[:14] + "…" if len(wamid) > 15 else wamid


@dataclass
class _Sent:
    index: int
    seen_at: float


class RelayWatcher:
    """Polls a few times a second; `prime()` first so earlier runs are not replayed."""

    def __init__(self, bridge: Bridge, sim: CloudAPISimulator, out: Print,
                 on_staff_reply: StaffReplySeen | None = None) -> None:
        self._bridge = bridge
        self._sim = sim
        self._out = out
        self._on_staff_reply = on_staff_reply
        self._last_id = 0
        self._open: dict[int, str] = {}  # queue id -> last status seen (pending/held)
        self._sent_cursor = 0
        self._waiting: list[_Sent] = []  # sends whose outbox row is not marked yet

    async def prime(self) -> None:
        """Skip what is already in the queue (a resumed demo)."""
        while items := await self._bridge.db.inbound.after(self._last_id, 500):
            self._last_id = items[-1].id
        self._sent_cursor = len(self._sim.sent)

    async def drained(self, timeout: float = 10.0) -> None:  # noqa: ASYNC109
        """Wait (at most `timeout`) until the bridge is idle and every step is printed."""
        b = self._bridge
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if (b.outbox.idle.is_set() and b.worker.idle["whatsapp"].is_set()
                    and self._sent_cursor == len(self._sim.sent) and not self._waiting
                    and all(status == "held" for status in self._open.values())
                    and not await b.db.inbound.after(self._last_id, 1)):
                return
            await asyncio.sleep(0.1)

    async def run(self, every: float = 0.25) -> None:
        while True:
            try:
                await self.poll()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a progress line is not worth stopping the demo for
                self._out(f"(progress display error: {type(exc).__name__})")
            await asyncio.sleep(every)

    async def poll(self) -> None:
        await self._inbound()
        await self._outbound()

    # --- WhatsApp → bridge → Matrix -------------------------------------------------

    async def _inbound(self) -> None:
        db = self._bridge.db.inbound
        changed: list[InboundItem] = []
        for item_id, status in list(self._open.items()):
            item = await db.get(item_id)
            if item is None:
                del self._open[item_id]
            elif item.status != status:
                changed.append(item)
        new = await db.after(self._last_id)
        if new:
            self._last_id = new[-1].id
        far_future = datetime.max.replace(tzinfo=UTC)
        for item in sorted(changed + new, key=lambda i: (i.processed_at or far_future, i.id)):
            if item.status in ("pending", "held"):
                self._open[item.id] = item.status
            else:
                self._open.pop(item.id, None)
            if item.status != "pending":
                line = await self._describe_inbound(item)
                if line:
                    self._out(line)

    async def _describe_inbound(self, item: InboundItem) -> str | None:
        if item.source != "whatsapp":
            return (f"Matrix → bridge     an event could not be processed ({item.error}); "
                    "see bridge.log") if item.status == "failed" else None
        b = self._bridge
        parsed = stored.open_row(b.privacy.cipher, item.payload,
                                 b.config.whatsapp.phone_number_id)
        if isinstance(parsed, StatusUpdate):
            status = parsed
            if await self._is_notice(status):
                return (f"WhatsApp → bridge   the citizen's phone reports the notice "
                        f"{status.status}: noted in its log entry (informative, not proof "
                        "of notification)") if status.status in ("delivered", "read") else None
            return ("WhatsApp → Matrix   the citizen's phone reports the reply read: "
                    "read receipt shown in the portal") if status.status == "read" else None
        if parsed is None:
            return None
        msg = parsed
        citizen = await b.db.citizens.by_index(b.privacy.index.digest(msg.sender.key))
        who = await self._who(citizen)
        if item.status == "held":
            return (f"WhatsApp → bridge   message from {who} held, encrypted, until they "
                    "answer the privacy notice")
        if item.status == "failed":
            return f"WhatsApp → bridge   message from {who} failed ({item.error}); see bridge.log"
        if item.status == "dropped":
            return f"WhatsApp → bridge   held message from {who} deleted: no consent"
        return await self._done(msg, citizen, who)

    async def _done(self, msg: InboundMessage, citizen: Citizen | None, who: str) -> str:
        b = self._bridge
        link = await b.db.messages.by_wamid(b.privacy.index.wamid(msg.wamid))
        if link is not None and link.direction == "in":
            what = quote(msg.text) if msg.kind == "text" else f"[{msg.kind}]"
            return f"WhatsApp → Matrix   {what} from {who} relayed into the portal (E2EE)"
        if citizen is not None and b.config.notices.enabled:
            notices = notice_consent.intent_of(msg, b.config.notices)
            if notices is not None:  # a command of its own, answered before the chat's
                return await self._notices_step(msg, citizen, who)
        intent = consent.intent_of(msg, b.config.consent)
        state = citizen.consent_state if citizen else "unknown"
        if intent == "opt_in" and state == "granted":
            room_id = await b.portals.room_of(citizen) if citizen else None
            return (f"WhatsApp → bridge   {who} accepted the privacy notice: consent "
                    f"recorded, portal {room_id} open, staff invited")
        if intent == "opt_out":
            return (f"WhatsApp → bridge   {who} opted out: relay stopped both ways, "
                    "their ghost left the portal")
        return f"WhatsApp → bridge   message from {who} not relayed (consent: {state})"

    async def _notices_step(self, msg: InboundMessage, citizen: Citizen, who: str) -> str:
        """A notices keyword or button, by the consent record this message caused."""
        said = (f"tapped «{msg.button_title}»" if msg.kind == "button"
                else f"wrote {quote(msg.text)}")
        evidence = consent.message_evidence(self._bridge.privacy.index.wamid(msg.wamid))
        records = [r for r in await self._bridge.db.consent.for_citizen(citizen.id)
                   if r.purpose == "notices" and r.evidence == evidence]
        state = records[-1].state if records else None
        if state == "prompted":
            what = "asks for notices of availability (a command: nothing reaches Matrix)"
        elif state == "granted":
            what = ("consent to notices recorded (purpose “notices”, separate from the chat)"
                    + ("" if citizen.ghost_user_id else "; no ghost, no portal"))
        elif state == "withdrawn":
            what = "notices withdrawn, unsent ones cancelled"
        elif state == "refused":
            what = "declined notices"
        else:
            what = "no change to their notices consent"
        return f"WhatsApp → bridge   {who} {said}: {what}"

    async def _is_notice(self, status: StatusUpdate) -> bool:
        b = self._bridge
        item = await b.db.outbox.by_wamid(b.privacy.index.wamid(status.wamid))
        return item is not None and \
            b.privacy.cipher.decrypt_json(item.payload, aad=AAD_PAYLOAD).get("type") == "template"

    async def _who(self, citizen: Citizen | None) -> str:
        """What staff see: the ghost's display name; nothing identifying before opt-in.
        A citizen who only takes notices has no ghost: the pseudonym their log shows."""
        if citizen is not None and citizen.ghost_user_id:
            ghost = await self._bridge.db.ghosts.get(citizen.ghost_user_id)
            if ghost is not None:
                return ghost.display_name
        if citizen is not None and await self._bridge.db.subscriptions.get(citizen.id):
            return f"pseudonym {citizen.pseudonym_code}"
        return "a new contact"

    # --- Matrix → bridge → WhatsApp -------------------------------------------------

    async def _outbound(self) -> None:
        now = time.monotonic()
        sent = self._sim.sent
        while self._sent_cursor < len(sent):
            if "status" not in sent[self._sent_cursor]:  # skip mark-as-read calls
                self._waiting.append(_Sent(self._sent_cursor, now))
            self._sent_cursor += 1
        still: list[_Sent] = []
        for entry in self._waiting:
            if now - entry.seen_at < SEND_DELAY_SECONDS:
                still.append(entry)
                continue
            described = await self._describe_sent(entry, now)
            if described is None:
                still.append(entry)
                continue
            line, staff_wamid = described
            self._out(line)
            if staff_wamid and self._on_staff_reply is not None:
                await self._on_staff_reply(staff_wamid)
        self._waiting = still

    async def _describe_sent(self, entry: _Sent, now: float) -> tuple[str, str | None] | None:
        """(line, wamid if it was a staff message), or None to look again later."""
        body = self._sim.sent[entry.index]
        wamid = self._sim.sent_ids[entry.index] or ""
        b = self._bridge
        item = await b.db.outbox.by_wamid(b.privacy.index.wamid(wamid))
        if item is None and now - entry.seen_at < OUTBOX_LOOKUP_SECONDS:
            return None  # not marked sent yet; look again next poll
        payload: dict[str, Any] = (b.privacy.cipher.decrypt_json(item.payload, aad=AAD_PAYLOAD)
                                   if item else {})
        citizen = await b.db.citizens.get(item.citizen_id) if item else None
        who = await self._who(citizen)
        kind = body.get("type", "text")
        if kind == "interactive":
            return self._buttons_sent(body["interactive"], who), None
        if kind == "template":
            return await self._notice_sent(body, payload, who), None
        text = body.get("text", {}).get("body") if kind == "text" else None
        if payload.get("system"):
            return f"bridge → WhatsApp   confirmation sent to {who}: {quote(text, 60)}", None
        what = quote(text) if text is not None else f"[{kind}]"
        return (f"Matrix → WhatsApp   staff reply {what} delivered to the simulator for {who} "
                f"({short_wamid(wamid)})", wamid)


    def _buttons_sent(self, interactive: dict[str, Any], who: str) -> str:
        buttons = interactive["action"]["buttons"]
        titles = " ".join(f"[{b['reply']['title']}]" for b in buttons)
        ids = {b["reply"]["id"] for b in buttons}
        if NOTICES_IN_BUTTON in ids:
            return f"bridge → WhatsApp   notices consent text with buttons {titles} sent to {who}"
        if NOTICES_OUT_BUTTON in ids:  # only the opt-out button: the confirmation
            code = SUBSCRIPTION_CODE.search(interactive["body"]["text"])
            return (f"bridge → WhatsApp   confirmation with subscription code "
                    f"{code.group() if code else '?'} and button {titles} sent to {who}")
        return f"bridge → WhatsApp   privacy notice with buttons {titles} sent to {who}"

    async def _notice_sent(self, body: dict[str, Any], payload: dict[str, Any],
                           who: str) -> str:
        """The template exactly as WhatsApp received it; the reference only from the log."""
        template = body["template"]
        params = [str(p.get("text")) for c in template.get("components", [])
                  for p in c.get("parameters", [])]
        shown = ", ".join(quote(p) for p in params) or "none"
        line = (f"bridge → WhatsApp   notice of availability sent to {who}: template "
                f"{template['name']} ({template['language']['code']}), "
                f"{'its only parameter' if len(params) == 1 else 'parameters'} {shown}")
        notice_id = payload.get("notice_id")
        notice = await self._bridge.db.notices.get(int(notice_id)) if notice_id else None
        if notice is not None:
            sent = json.dumps(body, ensure_ascii=False)
            where = "not in the message" if notice.reference not in sent else \
                "IN THE MESSAGE (a bug)"
            line += f"; reference {notice.reference} {where}"
        return line


async def stop_task(task: asyncio.Task[None] | None) -> None:
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
