"""Processes stored WhatsApp webhook items: consent first, then mirroring or statuses.

Notices keywords and buttons (`bridge.whatsapp.notice_consent`) are answered before
the chat consent machine sees the message and are never mirrored; the chat opt-out
keywords withdraw notices too, the chat notice's «No, gracias» button does not.

Side effects are ordered so that a crash at any point, followed by a retry of the same
queue item, neither loses nor duplicates anything: idempotent actions first, the
consent state change (with its append-only record) last — except opt-out, which flips
the state first so that relay stops at once.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol, TypeVar

from bridge.config import Config
from bridge.db import (
    Citizen,
    ConsentState,
    Database,
    InboundItem,
    InboundStatus,
    Repositories,
    Room,
    outcome,
)
from bridge.errors import Conflict
from bridge.metrics import Metrics
from bridge.privacy import AAD_IDENTIFIER, AAD_WA_ID, Privacy, new_pseudonym_code
from bridge.texts.matrix import default as mx_text
from bridge.texts.whatsapp import default as wa_text
from bridge.types import EventID, Pseudonym, RoomID, WamidHash
from bridge.whatsapp import consent, notice_consent, stored
from bridge.whatsapp.consent import Action
from bridge.whatsapp.identity import IdentityChanges
from bridge.whatsapp.mirror import Mirror
from bridge.whatsapp.outbox import Outbox, reply_key
from bridge.whatsapp.portal import Portals
from bridge.whatsapp.subscriptions import NoticeSubscriptions
from bridge.whatsapp.webhook_parse import (
    InboundMessage,
    Sender,
    StatusUpdate,
    follow_up_target,
)

log = logging.getLogger(__name__)
Standing = TypeVar("Standing")
# Within this long of a citizen's last message, the time of the next one is recorded
# with its outcome (`WhatsAppInbound._sender`): the 24-hour window is open regardless.
RECENT_INBOUND = timedelta(hours=1)
# Looks at a granted citizen's message before it is mirrored; True = it was a report
# (bridge.moderation.intake.WhatsAppReports) and is not mirrored.
ReportHook = Callable[[Citizen, RoomID, InboundMessage], Awaitable[bool]]


class RoomsHook(Protocol[Standing]):
    """Sees every message of a citizen (with their open portal, if any) before the
    consent flow (bridge.rooms_wa)."""

    async def standing(self, citizen: Citizen, repos: Repositories) -> Standing:
        """What the call needs to know of the citizen's rooms, read in the message's
        first transaction (a lane's every session waits for SQLite's one writer)."""

    async def __call__(self, citizen: Citizen, item: InboundItem, msg: InboundMessage,
                       portal: RoomID | None, standing: Standing) -> bool:
        """True = it was for an agency room they are a member of."""

# A send WhatsApp accepted then reported failed, not a portal's: (its wamid's keyed hash,
# WhatsApp's error title); rooms over WhatsApp say so in the room.
FailedHook = Callable[[WamidHash, str], Awaitable[None]]

# A citizen, their portal and their rooms (the rooms hook's standing), as read.
SenderSnapshot = tuple[Citizen, Room | None, Any]


@dataclass(frozen=True)
class Prepared:
    """An item read ahead (WhatsAppInbound.prepare)."""

    item_id: int
    parsed: InboundMessage | StatusUpdate | None
    sender: SenderSnapshot | None


OPT_IN_CONFIRMATION = wa_text.CHAT_OPT_IN_CONFIRMATION
OPT_OUT_CONFIRMATION = wa_text.CHAT_OPT_OUT_CONFIRMATION


class WhatsAppInbound:
    """The inbound worker's handler for `source == "whatsapp"` items."""

    def __init__(self, config: Config, db: Database, privacy: Privacy, portals: Portals,
                 mirror: Mirror, outbox: Outbox, metrics: Metrics,
                 subscriptions: NoticeSubscriptions) -> None:
        self._config = config
        self._db = db
        self._privacy = privacy
        self._portals = portals
        self._mirror = mirror
        self._outbox = outbox
        self._metrics = metrics
        self._subscriptions = subscriptions
        self._identity = IdentityChanges(db, privacy, portals, metrics)
        self._report_hook: ReportHook | None = None
        self._rooms_hook: RoomsHook[Any] | None = None
        self._failed_hook: FailedHook | None = None

    def set_report_hook(self, hook: ReportHook) -> None:
        self._report_hook = hook

    def set_rooms_hook(self, hook: RoomsHook[Any]) -> None:
        self._rooms_hook = hook

    def set_failed_hook(self, hook: FailedHook) -> None:
        self._failed_hook = hook

    async def __call__(self, item: InboundItem) -> InboundStatus | None:
        ready = outcome.prepared()
        if isinstance(ready, Prepared) and ready.item_id == item.id:
            parsed, known = ready.parsed, ready.sender
        else:
            parsed, known = self._open(item), None
        if isinstance(parsed, StatusUpdate):
            await self._status(parsed)
        # A failure is retried for as long as it is transient; a permanent one makes
        # the item a dead letter, announced in the portal (bridge.deadletters).
        if isinstance(parsed, InboundMessage):
            return await self._message(item, parsed, known)
        return None

    async def prepare(self, item: InboundItem) -> Prepared:
        """Only reads (bridge.worker runs it while the citizen's previous message is
        still being relayed): the row opened, and a recent sender's snapshot."""
        parsed = self._open(item)
        known = await self._recent_sender(parsed) \
            if isinstance(parsed, InboundMessage) and parsed.kind != "system" else None
        return Prepared(item.id, parsed, known)

    def _open(self, item: InboundItem) -> InboundMessage | StatusUpdate | None:
        # The row holds the parsed message or status (bridge.whatsapp.stored).
        return stored.open_row(self._privacy.cipher, item.payload,
                               self._config.whatsapp.phone_number_id)

    # --- citizens ---------------------------------------------------------------------

    async def citizen_for(self, sender: Sender, repos: Repositories | None = None) -> Citizen:
        cipher = self._privacy.cipher
        index, *previous = self._privacy.index.digests(sender.key)
        if previous:
            # The index key was rotated and `rekey` has not rehashed everyone yet: a
            # known citizen is found under an old key and moved to the current one, so
            # their row and the webhook's lanes (current key) agree again.
            found = await (repos or self._db).citizens.by_any_index([index, *previous])
            if found is not None:
                if found.index_hash != index and \
                        await (repos or self._db).citizens.set_index_hash(found.id, index):
                    found = replace(found, index_hash=index)
                return found
        for _ in range(5):  # a pseudonym code collision is rare; draw again
            try:
                citizen, _ = await (repos or self._db).citizens.get_or_create(
                    index_hash=index,
                    identifier_ct=cipher.encrypt(sender.key, aad=AAD_IDENTIFIER),
                    wa_id_ct=cipher.encrypt(sender.wa_id, aad=AAD_WA_ID) if sender.wa_id
                    else None,
                    pseudonym_code=new_pseudonym_code())
                return citizen
            except Conflict:
                continue
        raise Conflict("could not allocate a pseudonym code")

    async def _sender(self, msg: InboundMessage, known: SenderSnapshot | None = None
                      ) -> SenderSnapshot:
        """What every message needs: who sent it, their portal, their rooms; and the
        time of their message recorded (the reply window).

        A citizen who wrote recently is read from a snapshot (`_recent_sender`, maybe
        read ahead: `known`) and the time lands with the item's outcome
        (bridge.db.outcome): their window is open for hours yet. Anyone else (new,
        silent for a while, found under a rotated index key) in a transaction that
        records the time first, so that what this message makes the bridge send them
        (the privacy notice, a backlog) finds the window open."""
        if known is None:
            known = await self._recent_sender(msg)
        if known is not None:
            who, at = known[0].id, msg.timestamp
            await outcome.with_outcome(self._db, lambda tx: tx.citizens.touch_inbound(who, at))
            return known
        async with self._db.transaction() as tx:
            citizen = await self.citizen_for(msg.sender, tx)
            await tx.citizens.touch_inbound(citizen.id, msg.timestamp)
            return citizen, *await self._where(citizen, tx)

    async def _recent_sender(self, msg: InboundMessage) -> SenderSnapshot | None:
        """A citizen who wrote recently, their portal and rooms, read from a snapshot (on
        SQLite, without waiting for the one writer); None for anyone else."""
        index, *previous = self._privacy.index.digests(msg.sender.key)
        if previous:
            return None
        async with self._db.reading() as tx:
            known = await tx.citizens.by_index(index)
            if known is None or known.last_inbound_at is None or \
                    known.last_inbound_at < datetime.now(UTC) - RECENT_INBOUND:
                return None
            return known, *await self._where(known, tx)

    async def _where(self, citizen: Citizen, tx: Repositories) -> tuple[Room | None, Any]:
        rooms = None if self._rooms_hook is None else \
            await self._rooms_hook.standing(citizen, tx)
        return await tx.rooms.portal_for(citizen.id), rooms

    async def _record(self, citizen: Citizen, state: ConsentState, wamid_hash: WamidHash
                      ) -> None:
        cfg = self._config.consent
        async with self._db.transaction() as tx:
            await tx.citizens.set_consent_state(citizen.id, state)
            await tx.consent.append(
                citizen_id=citizen.id, pseudonym=Pseudonym(citizen.pseudonym_code),
                purpose="mirroring", state=state, notice_version=cfg.notice_version,
                notice_hash=consent.notice_hash(cfg), channel="whatsapp",
                language=cfg.notice_language, evidence=consent.message_evidence(wamid_hash))
            await tx.audit.append("citizen", f"consent.{state}",
                                  f"pseudonym {citizen.pseudonym_code}", "ok", "mirroring")
        self._metrics.consent_changes.labels("mirroring", state).inc()

    # --- messages ---------------------------------------------------------------------

    async def _message(self, item: InboundItem, msg: InboundMessage,
                       known: SenderSnapshot | None = None) -> InboundStatus | None:
        if msg.kind == "system":
            # Not something the citizen wrote: no consent prompt, no reply window;
            # a number or BSUID change re-keys the citizen.
            await self._identity.handle(msg)
            return None
        citizen, portal, rooms = await self._sender(msg, known)
        if msg.context_id or follow_up_target(msg):
            # About another message, maybe the lane's previous one (started before this
            # one's outcome was recorded, bridge.worker): its message map first.
            await outcome.settled()
        room_id = RoomID(portal.room_id) if portal and portal.closed_at is None else None
        # What is kept of this message's id (consent evidence, reply keys): its keyed hash.
        wamid_hash = self._privacy.index.wamid(msg.wamid)
        if self._config.notices.enabled:
            notices_intent = notice_consent.intent_of(msg, self._config.notices)
            if notices_intent is not None:
                await self._subscriptions.handle(citizen, notices_intent, wamid_hash)
                return None
        if self._rooms_hook is not None and \
                await self._rooms_hook(citizen, item, msg, room_id, rooms):
            return None
        if self._report_hook is not None and citizen.consent_state == "granted" and \
                room_id is not None and await self._report_hook(citizen, room_id, msg):
            return None
        intent = consent.intent_of(msg, self._config.consent)
        decision = consent.decide(citizen.consent_state, intent)
        result: InboundStatus | None = None
        opt_out_text = OPT_OUT_CONFIRMATION
        if intent == "opt_out" and msg.button_id != consent.OPT_OUT_BUTTON and \
                await self._subscriptions.withdraw(
                    citizen, consent.message_evidence(wamid_hash), "whatsapp"):
            # A plain BAJA/STOP withdraws every purpose; the confirmation says so.
            opt_out_text += notice_consent.also_notices(self._config)
        if decision.actions == (Action.MIRROR,) and decision.state == citizen.consent_state:
            # All it changes is its message map and reply window, recorded with its
            # outcome: the citizen's next message may start meanwhile.
            outcome.may_overlap()
        if decision.state != citizen.consent_state and intent == "opt_out":
            await self._record(citizen, decision.state, wamid_hash)  # stop relay first
        for action in decision.actions:
            result = await self._perform(action, citizen, item, msg, wamid_hash, room_id,
                                         opt_out_text) or result
        if decision.state != citizen.consent_state and intent != "opt_out":
            await self._record(citizen, decision.state, wamid_hash)
        return result

    async def _perform(self, action: Action, citizen: Citizen, item: InboundItem,
                       msg: InboundMessage, wamid_hash: WamidHash, room_id: RoomID | None,
                       opt_out_text: str = OPT_OUT_CONFIRMATION) -> InboundStatus | None:
        agency = self._config.consent.agency_name
        if action is Action.SEND_NOTICE:
            await self._outbox.system_buttons(
                citizen, reply_key("notice", wamid_hash),
                consent.notice_text(self._config.consent),
                [(consent.OPT_IN_BUTTON, wa_text.ACCEPT_BUTTON),
                 (consent.OPT_OUT_BUTTON, wa_text.DECLINE_BUTTON)])
        elif action is Action.HOLD:
            until = datetime.now(UTC) + timedelta(hours=self._config.consent.hold_hours)
            await self._db.inbound.hold(item.id, citizen.id, until)
            return "held"
        elif action is Action.OPEN_PORTAL:
            portal = await self._portals.open(citizen)
            # Held messages become pending again; they have lower ids than this item,
            # so the worker relays them next, in their original order.
            await self._db.inbound.release_held(citizen.id)
            log.info("citizen opted in; portal %s", portal)
        elif action is Action.CONFIRM_OPT_IN:
            await self._outbox.system_text(citizen, reply_key("optin", wamid_hash),
                                           OPT_IN_CONFIRMATION.format(agency=agency))
        elif action is Action.CONFIRM_OPT_OUT:
            await self._outbox.system_text(citizen, reply_key("optout", wamid_hash),
                                           opt_out_text)
        elif action is Action.CLOSE_PORTAL:
            await self._db.outbox.cancel_for_citizen(citizen.id)
            await self._portals.close(citizen)
        elif action is Action.DROP_HELD:
            for held in await self._db.inbound.held_for(citizen.id):
                await self._db.inbound.set_status(held.id, "dropped")
        elif action is Action.MIRROR:
            # `citizen` and `room_id` were read for this message: a granted citizen's
            # ghost and portal were set before consent was recorded.
            if room_id is None:
                raise RuntimeError("granted citizen without an open portal")
            await self._mirror.relay(citizen, room_id, msg)
        return None

    # --- delivery statuses ------------------------------------------------------------

    async def _status(self, status: StatusUpdate) -> None:
        if status.callback_data is not None:
            # First: a send whose Graph answer was lost (crash mid-send) is settled by
            # its status, which links the wamid for what follows.
            code = next((e.code for e in status.errors if e.code is not None), None)
            await self._outbox.settle_by_status(status.callback_data, status.wamid,
                                                status.status, code)
        wamid_hash = self._privacy.index.wamid(status.wamid)
        link = await self._db.messages.by_wamid(wamid_hash)
        if link is None or link.direction != "out":
            await self._notice_status(status, wamid_hash)
            if status.status == "failed" and self._failed_hook is not None:
                await self._failed_hook(wamid_hash, next(
                    (e.title for e in status.errors if e.title), "error desconocido"))
            return
        room_id, event_id = RoomID(link.room_id), EventID(link.event_id)
        citizen = await self._citizen_of_room(room_id)
        if status.status == "read" and citizen and citizen.ghost_user_id:
            await self._portals.read_receipt(citizen.ghost_user_id, room_id, event_id)
        elif status.status == "failed":
            title = next((e.title for e in status.errors if e.title),
                         mx_text.DELIVERY_FAILED_UNKNOWN)
            await self._portals.notice(room_id, mx_text.DELIVERY_FAILED_NOTICE.format(title=title))

    async def _notice_status(self, status: StatusUpdate, wamid_hash: WamidHash) -> None:
        """A status of a notice of availability fills in its log entry (first report wins)."""
        title = next((e.title for e in status.errors if e.title), None)
        if await self._db.notices.record_status(wamid_hash, status.status,
                                                status.timestamp, title) \
                and status.status in ("delivered", "read", "failed"):
            self._metrics.notices.labels(status.status).inc()

    async def _citizen_of_room(self, room_id: RoomID) -> Citizen | None:
        room = await self._db.rooms.get(room_id)
        if room is None or room.citizen_id is None:
            return None
        return await self._db.citizens.get(room.citizen_id)

