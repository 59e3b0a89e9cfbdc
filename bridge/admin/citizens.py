"""A citizen's rights over their data: export (GDPR art. 15/20) and erasure (art. 17).

Citizens are named by their ghost's Matrix ID, the only identifier staff see, or (for
those who only take notices of availability, and have no ghost) by their notices
subscription code. The export
is the one place where the bridge hands out a citizen's WhatsApp identifiers in the
clear: it is for that citizen, and it is audited. Erasure stops relay first (as an
opt-out does), then removes what identifies the person. Kept, by design and documented
in docs/moderation.md: consent records, audit entries and the notice log (legal
evidence, pseudonym only), and the messages already delivered to staff in the
end-to-end encrypted portal (the agency's record of the conversation; the bridge
cannot read or delete them).
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from bridge.admin.notices import notice_entry
from bridge.config import Config
from bridge.db import Citizen, Database
from bridge.errors import NotFound
from bridge.matrix.ghosts import Ghosts
from bridge.privacy import AAD_IDENTIFIER, AAD_WA_ID, Privacy
from bridge.types import Pseudonym, RoomID, UserID
from bridge.whatsapp import consent
from bridge.whatsapp.outbound import drop_held
from bridge.whatsapp.portal import Portals
from bridge.whatsapp.subscriptions import SUBSCRIPTION_CODE, NoticeSubscriptions
from bridge.whatsapp.webhook_parse import citizen_lane, status_lane

log = logging.getLogger(__name__)

ERASED_NOTICE = ("Los datos de esta persona se han borrado a petición suya: el puente ya no "
                 "reenvía mensajes en ninguna dirección.")
KEPT_AFTER_ERASURE = [
    "consent records and audit entries (legal evidence; they name the pseudonym only)",
    "notice log entries (informative; pseudonym only; deleted after "
    "notices.log_retention_days)",
    "messages already delivered to staff in the end-to-end encrypted portal room",
]


def _time(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


class CitizenData:
    """Export and erasure of one citizen's data, for the admin API and CLI."""

    def __init__(self, config: Config, db: Database, privacy: Privacy, portals: Portals,
                 ghosts: Ghosts, subscriptions: NoticeSubscriptions) -> None:
        self._config = config
        self._db = db
        self._privacy = privacy
        self._portals = portals
        self._ghosts = ghosts
        self._subscriptions = subscriptions

    async def find(self, user_id: str) -> Citizen:
        """The citizen of a ghost Matrix ID or notices subscription code; 404 otherwise."""
        return await self._citizen(user_id)

    async def _citizen(self, user_id: str) -> Citizen:
        citizen = None
        if SUBSCRIPTION_CODE.fullmatch(user_id.upper()):
            sub = await self._db.subscriptions.by_code(user_id.upper())
            citizen = await self._db.citizens.get(sub.citizen_id) if sub else None
        else:
            citizen = await self._db.citizens.by_ghost(UserID(user_id))
        if citizen is None:
            raise NotFound("no citizen has this Matrix user id or subscription code")
        return citizen

    async def export(self, user_id: str, actor: str, reason: str) -> dict[str, Any]:
        """Everything the bridge holds about the citizen, machine-readable (audited: it
        re-identifies them)."""
        citizen = await self._citizen(user_id)
        cipher = self._privacy.cipher
        identifier = cipher.decrypt_str(citizen.identifier_ct, aad=AAD_IDENTIFIER)
        wa_id = cipher.decrypt_str(citizen.wa_id_ct, aad=AAD_WA_ID) if citizen.wa_id_ct else None
        portal = await self._db.rooms.portal_for(citizen.id)
        records = await self._db.consent.for_citizen(citizen.id)
        queued = await self._db.inbound.count_lane("whatsapp", citizen_lane(citizen.index_hash))
        sub = await self._db.subscriptions.get(citizen.id)
        notices = await self._db.notices.list(citizen_id=citizen.id, limit=100_000)
        await self._db.audit.append(actor, "citizen.export",
                                    f"pseudonym {citizen.pseudonym_code}", "ok", reason)
        return {
            "pseudonym": citizen.pseudonym_code,
            "matrix_user_id": citizen.ghost_user_id,
            "whatsapp": {"wa_id": wa_id, "identifier": identifier},
            "consent_state": citizen.consent_state,
            "first_contact_at": _time(citizen.created_at),
            "last_message_at": _time(citizen.last_inbound_at),
            "consent_records": [
                {"purpose": r.purpose, "state": r.state, "notice_version": r.notice_version,
                 "notice_hash": r.notice_hash, "channel": r.channel, "language": r.language,
                 "evidence": r.evidence, "staff_id": r.staff_id, "at": _time(r.created_at)}
                for r in records],
            "portal": None if portal is None else {
                "room_id": portal.room_id, "opened_at": _time(portal.created_at),
                "closed_at": _time(portal.closed_at)},
            "queued_messages": queued,
            "notices": {
                "consent_state": sub.state if sub else "unknown",
                "subscription_code": sub.code if sub else None,
                "log": [notice_entry(n) for n in notices]},
            "not_included": "message contents: end-to-end encrypted in the portal room, "
                            "readable by its members, not by the bridge",
        }

    async def erase(self, user_id: str, actor: str, reason: str | None) -> dict[str, Any]:
        """Stop relay, close the portal, delete the citizen's identifiers and queues."""
        citizen = await self._citizen(user_id)
        pseudonym = citizen.pseudonym_code
        if citizen.consent_state == "granted":
            async with self._db.transaction() as tx:  # relay stops first, as on opt-out
                await tx.citizens.set_consent_state(citizen.id, "withdrawn")
                await tx.consent.append(
                    citizen_id=citizen.id, pseudonym=Pseudonym(pseudonym),
                    purpose="mirroring", state="withdrawn",
                    notice_version=self._config.consent.notice_version,
                    notice_hash=consent.notice_hash(self._config.consent), channel="admin",
                    evidence="erasure")
        await self._subscriptions.withdraw(citizen, "erasure", "admin")
        await self._db.notices.fail_unsent(citizen.id, "citizen erased")
        await self._db.outbox.cancel_for_citizen(citizen.id)
        portal = await self._db.rooms.portal_for(citizen.id)
        await self._portals.close(citizen, ERASED_NOTICE)
        if citizen.ghost_user_id is not None:
            # Their reports stay for the moderators, without what they wrote.
            await self._db.reports.forget_reporter(citizen.ghost_user_id)
            await self._ghosts.retire(citizen.ghost_user_id)
        for room_ghost in await self._db.wa_rooms.ghosts_of(citizen.id):
            await self._ghosts.retire(room_ghost)  # their pseudonyms in agency rooms
        # Queued webhooks hold the identifiers (encrypted): every one of their lanes
        # goes, the statuses of sends to them too.
        await self._db.inbound.delete_lane("whatsapp", citizen_lane(citizen.index_hash))
        await self._db.inbound.delete_lane("whatsapp", status_lane(citizen.index_hash))
        if portal is not None:
            await self._db.messages.delete_room(RoomID(portal.room_id))
            await drop_held(self._db, self._privacy.cipher, room_id=portal.room_id)
        await self._db.citizens.delete(citizen.id)
        await self._db.audit.append(actor, "citizen.erase", f"pseudonym {pseudonym}", "ok",
                                    reason)
        log.info("citizen %s erased", pseudonym)
        return {"erased": True, "pseudonym": pseudonym, "kept": KEPT_AFTER_ERASURE}
