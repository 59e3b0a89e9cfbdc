"""`system` messages: a citizen's number or BSUID changed.

The citizen row moves to the new identity (`CitizenRepo.rekey`), so pseudonym, ghost,
portal and consent stay as they were; the audit log records it; staff get a notice
without any number. Meta's system webhooks carry no `contacts[]`, so the sender may
be known only by the old number while the citizen is keyed by BSUID: then the stored
(encrypted) numbers are searched, off the event loop. Such changes are rare.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from dataclasses import dataclass

from bridge.db import Citizen, CitizenIdentifiers, Database
from bridge.errors import Conflict
from bridge.metrics import Metrics
from bridge.privacy import AAD_IDENTIFIER, AAD_WA_ID, Privacy
from bridge.texts.matrix import default as summaries
from bridge.types import RoomID
from bridge.whatsapp.mirror import txn_id
from bridge.whatsapp.portal import Portals
from bridge.whatsapp.webhook_parse import InboundMessage, Sender, SystemChange

log = logging.getLogger(__name__)

REKEY_TYPES = ("user_changed_number", "user_changed_user_id")


@dataclass(frozen=True, slots=True, repr=False)
class Identity:
    """How a citizen is addressed: `key` (BSUID, else the number) and the number."""

    key: str
    wa_id: str | None


def identity_after(change: SystemChange, old: Identity) -> Identity | None:
    """The identity after `change`, or None when the payload does not say (pure)."""
    keyed_by_bsuid = old.key != old.wa_id
    if change.type == "user_changed_number" and change.new_wa_id:
        # A BSUID-keyed citizen keeps their key unless a new one is given too.
        user_id = change.new_user_id or (old.key if keyed_by_bsuid else None)
        return Identity(user_id or change.new_wa_id, change.new_wa_id)
    if change.type == "user_changed_user_id" and change.new_user_id:
        return Identity(change.new_user_id, old.wa_id)
    return None


class IdentityChanges:
    """Handles `system` messages for the inbound worker."""

    def __init__(self, db: Database, privacy: Privacy, portals: Portals,
                 metrics: Metrics) -> None:
        self._db = db
        self._privacy = privacy
        self._portals = portals
        self._metrics = metrics

    async def handle(self, msg: InboundMessage) -> None:
        change = msg.system
        assert change is not None
        label = change.type if change.type in REKEY_TYPES else "other"
        citizen = await self._find(msg.sender)
        if citizen is None:
            # Nothing to re-key and no room to tell: a contact the bridge never stored.
            log.info("identity change (%s) for an unknown contact", label)
            self._metrics.identity_changes.labels(label, "unknown_citizen").inc()
            return
        old = self._current(citizen)
        new = identity_after(change, old)
        room_id = await self._portals.room_of(citizen)
        if new is None or new == old:
            await self._tell(room_id, summaries.identity_notice(change.type), msg.wamid)
            self._metrics.identity_changes.labels(label, "notice_only").inc()
            return
        new_hash, *_ = hashes = self._privacy.index.digests(new.key)
        taken = await self._db.citizens.by_any_index(hashes)
        if taken is not None and taken.id != citizen.id:
            await self._conflict(citizen, room_id, label, msg.wamid)
            return
        await self._tell(room_id, summaries.identity_notice(change.type), msg.wamid)
        cipher = self._privacy.cipher
        try:
            async with self._db.transaction() as tx:
                await tx.citizens.rekey(
                    citizen.id, index_hash=new_hash,
                    identifier_ct=cipher.encrypt(new.key, aad=AAD_IDENTIFIER),
                    wa_id_ct=cipher.encrypt(new.wa_id, aad=AAD_WA_ID) if new.wa_id else None)
                await tx.audit.append("whatsapp", "citizen.rekey",
                                      f"pseudonym {citizen.pseudonym_code}", "ok", label)
        except Conflict:  # the new identity wrote in between
            await self._conflict(citizen, room_id, label, msg.wamid)
            return
        log.info("citizen %s re-keyed after %s", citizen.pseudonym_code, label)
        self._metrics.identity_changes.labels(label, "rekeyed").inc()

    async def _conflict(self, citizen: Citizen, room_id: RoomID | None, label: str,
                        wamid: str) -> None:
        await self._tell(room_id, summaries.REKEY_CONFLICT_NOTICE, wamid, ":conflict")
        await self._db.audit.append("whatsapp", "citizen.rekey",
                                    f"pseudonym {citizen.pseudonym_code}", "conflict", label)
        log.warning("citizen %s: %s to an identity another citizen has",
                    citizen.pseudonym_code, label)
        self._metrics.identity_changes.labels(label, "conflict").inc()

    async def _tell(self, room_id: RoomID | None, text: str, wamid: str,
                    suffix: str = ":identity") -> None:
        if room_id is not None:
            await self._portals.notice(room_id, text,
                                       txn_id=txn_id(self._privacy.index, wamid, suffix))

    def _current(self, citizen: Citizen) -> Identity:
        cipher = self._privacy.cipher
        key = cipher.decrypt_str(citizen.identifier_ct, aad=AAD_IDENTIFIER)
        wa_id = cipher.decrypt_str(citizen.wa_id_ct, aad=AAD_WA_ID) if citizen.wa_id_ct else None
        return Identity(key, wa_id)

    async def _find(self, sender: Sender) -> Citizen | None:
        index = self._privacy.index
        for key in dict.fromkeys(k for k in (sender.user_id, sender.wa_id) if k):
            if (citizen := await self._db.citizens.by_any_index(index.digests(key))) is not None:
                return citizen
        if sender.wa_id is None:
            return None
        stored = await self._db.citizens.list_identifiers()
        found = await asyncio.to_thread(self._match_number, stored, sender.wa_id)
        return None if found is None else await self._db.citizens.get(found)

    def _match_number(self, stored: list[CitizenIdentifiers], wa_id: str) -> int | None:
        cipher = self._privacy.cipher
        for item in stored:
            if item.wa_id_ct and hmac.compare_digest(
                    cipher.decrypt_str(item.wa_id_ct, aad=AAD_WA_ID).encode(), wa_id.encode()):
                return item.id
        return None
