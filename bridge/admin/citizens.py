"""A person's rights over their data: export (GDPR art. 15/20) and erasure (art. 17).

A WhatsApp citizen is named by their ghost's Matrix ID (the only identifier staff see),
their notices subscription code, their pseudonym code (what a look-up by phone number
answers: a contact who never consented has nothing else), or their phone number
(`*_by_phone`, found as `bridge.admin.identify` finds it). The Matrix ID of an account
made through an invite link names that account (bridge.invites.rights). The export
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
import re
from datetime import datetime
from typing import Any

from bridge.admin.copies import copies
from bridge.admin.identify import check_reason, citizens_with_number, normalise_phone
from bridge.admin.notices import notice_entry
from bridge.config import Config
from bridge.db import Citizen, Database
from bridge.errors import NotFound
from bridge.invites.rights import InviteAccounts
from bridge.matrix.ghosts import Ghosts
from bridge.model import room_purpose
from bridge.privacy import AAD_IDENTIFIER, AAD_WA_ID, Privacy
from bridge.rooms_wa.policy import INVITATION_LANGUAGE as ROOM_LANGUAGE
from bridge.rooms_wa.policy import INVITATION_VERSION as ROOM_NOTICE_VERSION
from bridge.texts.matrix import default as mx_text
from bridge.types import Pseudonym, RoomID, UserID
from bridge.whatsapp import consent
from bridge.whatsapp.portal import Portals
from bridge.whatsapp.subscriptions import SUBSCRIPTION_CODE, NoticeSubscriptions
from bridge.whatsapp.webhook_parse import citizen_lane, status_lane

log = logging.getLogger(__name__)

ERASED_NOTICE = mx_text.ERASED_NOTICE
KEPT_AFTER_ERASURE = [
    "consent records and audit entries (legal evidence; they name the pseudonym only; "
    "a message given as evidence is named by a keyed hash of its id)",
    "notice log entries (informative; pseudonym only, no message id; deleted after "
    "notices.log_retention_days)",
    "messages already delivered to staff in the end-to-end encrypted portal room",
]
PSEUDONYM_CODE = re.compile(r"[A-Z0-9]{4}-[A-Z0-9]{4}")


def _time(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


class CitizenData:
    """Export and erasure of one citizen's data, for the admin API and CLI."""

    def __init__(self, config: Config, db: Database, privacy: Privacy, portals: Portals,
                 ghosts: Ghosts, subscriptions: NoticeSubscriptions,
                 accounts: InviteAccounts) -> None:
        self._config = config
        self._db = db
        self._privacy = privacy
        self._portals = portals
        self._ghosts = ghosts
        self._subscriptions = subscriptions
        self.accounts = accounts

    async def find(self, user_id: str) -> Citizen:
        """The citizen of a ghost Matrix ID or notices subscription code; 404 otherwise."""
        return await self._citizen(user_id)

    async def _citizen(self, user_id: str, *, by_code: bool = False) -> Citizen:
        citizen = None
        if SUBSCRIPTION_CODE.fullmatch(user_id.upper()):
            sub = await self._db.subscriptions.by_code(user_id.upper())
            citizen = await self._db.citizens.get(sub.citizen_id) if sub else None
        elif by_code and PSEUDONYM_CODE.fullmatch(user_id.upper()):
            citizen = await self._db.citizens.by_pseudonym(user_id.upper())
        else:
            citizen = await self._db.citizens.by_ghost(UserID(user_id))
            if citizen is None:  # one of their pseudonyms in an agency room
                member = await self._db.wa_rooms.by_ghost(UserID(user_id))
                citizen = await self._db.citizens.get(member.citizen_id) if member else None
        if citizen is None:
            raise NotFound("no citizen has this Matrix user id, pseudonym or subscription "
                           "code")
        return citizen

    async def by_phone(self, actor: str, phone: object, reason: object) -> list[Citizen]:
        """The citizens with this phone number (audited as `citizen.lookup`, by
        pseudonym, with the reason); 404 if none."""
        why = check_reason(reason)
        found = await citizens_with_number(self._db, self._privacy, normalise_phone(phone))
        if not found:
            await self._db.audit.append(actor, "citizen.lookup", "-", "not_found", why)
            raise NotFound("no citizen has this phone number")
        await self._db.audit.append(
            actor, "citizen.lookup",
            ("pseudonym " + ",".join(c.pseudonym_code for c in found))[:255], "ok", why)
        return found

    async def export(self, user_id: str, actor: str, reason: str) -> dict[str, Any]:
        """Everything the bridge holds about the person named by `user_id` (a citizen's
        ghost, subscription or pseudonym code, or an invite-link account)."""
        account = await self.accounts.find(user_id)
        if account is not None:
            return await self.accounts.export(account, actor, reason)
        return await self.export_citizen(await self._citizen(user_id, by_code=True), actor,
                                         reason)

    async def export_by_phone(self, actor: str, phone: object, reason: object
                              ) -> dict[str, Any]:
        """The export of every citizen with this phone number."""
        found = await self.by_phone(actor, phone, reason)
        return {"citizens": [await self.export_citizen(c, actor, check_reason(reason))
                             for c in found]}

    async def export_citizen(self, citizen: Citizen, actor: str, reason: str
                             ) -> dict[str, Any]:
        """Everything the bridge holds about the citizen, machine-readable (audited: it
        re-identifies them)."""
        cipher = self._privacy.cipher
        identifier = cipher.decrypt_str(citizen.identifier_ct, aad=AAD_IDENTIFIER)
        wa_id = cipher.decrypt_str(citizen.wa_id_ct, aad=AAD_WA_ID) if citizen.wa_id_ct else None
        portal = await self._db.rooms.portal_for(citizen.id)
        records = await self._db.consent.for_citizen(citizen.id)
        queued = await self._db.inbound.count_lane("whatsapp", citizen_lane(citizen.index_hash))
        sub = await self._db.subscriptions.get(citizen.id)
        notices = await self._db.notices.list(citizen_id=citizen.id, limit=100_000)
        held_and_queued = await copies(self._db, cipher, citizen)
        memberships = await self._db.wa_rooms.of_citizen_all(citizen.id)
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
            "room_memberships": [
                {"room_id": m.room_id, "pseudonym": m.display_name,
                 "matrix_user_id": m.ghost_user_id, "state": m.state,
                 "invited_by": m.invited_by, "invitation_hash": m.notice_hash,
                 "invited_at": _time(m.created_at), "last_chosen_at": _time(m.chosen_at)}
                for m in memberships],
            "queued_messages": queued,
            **held_and_queued,
            "notices": {
                "consent_state": sub.state if sub else "unknown",
                "subscription_code": sub.code if sub else None,
                "log": [notice_entry(n) for n in notices]},
            "not_included": "message contents: end-to-end encrypted in the portal room, "
                            "readable by its members, not by the bridge",
        }

    async def erase(self, user_id: str, actor: str, reason: str | None) -> dict[str, Any]:
        """Erase the person named by `user_id` (as for `export`)."""
        account = await self.accounts.find(user_id)
        if account is not None:
            return await self.accounts.erase(account, actor, reason)
        return await self.erase_citizen(await self._citizen(user_id, by_code=True), actor,
                                        reason)

    async def erase_by_phone(self, actor: str, phone: object, reason: object
                             ) -> dict[str, Any]:
        """Erase every citizen with this phone number."""
        found = await self.by_phone(actor, phone, reason)
        return {"erased": [await self.erase_citizen(c, actor, check_reason(reason))
                           for c in found]}

    async def erase_citizen(self, citizen: Citizen, actor: str, reason: str | None, *,
                            keep_new_messages: bool = False) -> dict[str, Any]:
        """Stop relay, close the portal, delete the citizen's identifiers and queues (also
        the retention purge's way to remove a contact who never consented).

        `keep_new_messages` (the purge): a message that arrived while the contact was
        being removed stays queued and is handled as a new first contact, never lost."""
        pseudonym = citizen.pseudonym_code
        if citizen.consent_state == "granted":
            async with self._db.transaction() as tx:  # relay stops first, as on opt-out
                await tx.citizens.set_consent_state(citizen.id, "withdrawn")
                await tx.consent.append(
                    citizen_id=citizen.id, pseudonym=Pseudonym(pseudonym),
                    purpose="mirroring", state="withdrawn",
                    notice_version=self._config.consent.notice_version,
                    notice_hash=consent.notice_hash(self._config.consent), channel="admin",
                    language=self._config.consent.notice_language, evidence="erasure")
        await self._subscriptions.withdraw(citizen, "erasure", "admin")
        await self._db.notices.fail_unsent(citizen.id, "citizen erased")
        # The log entries stay, unlinked from the messages they were (a late status
        # finds nothing to update).
        await self._db.notices.forget_wamids(citizen.id)
        await self._db.outbox.cancel_for_citizen(citizen.id)
        portal = await self._db.rooms.portal_for(citizen.id)
        await self._portals.close(citizen, ERASED_NOTICE)
        if citizen.ghost_user_id is not None:
            # Their reports stay for the moderators, without what they wrote.
            await self._db.reports.forget_reporter(citizen.ghost_user_id)
            await self._db.reactions.forget_ghost(citizen.ghost_user_id)
            await self._db.mutes.forget_user(citizen.ghost_user_id)
            await self._ghosts.retire(citizen.ghost_user_id)
        await self._erase_room_memberships(citizen)
        # Queued webhooks hold the identifiers (encrypted): every one of their lanes
        # goes, the statuses of sends to them too.
        await self._db.inbound.delete_lane("whatsapp", citizen_lane(citizen.index_hash),
                                           keep_pending=keep_new_messages)
        await self._db.inbound.delete_lane("whatsapp", status_lane(citizen.index_hash))
        if portal is not None:
            await self._db.messages.delete_room(RoomID(portal.room_id))
            await self._db.held.purge(room_id=RoomID(portal.room_id))
        await self._db.citizens.delete(citizen.id)
        await self._db.audit.append(actor, "citizen.erase", f"pseudonym {pseudonym}", "ok",
                                    reason)
        log.info("citizen %s erased", pseudonym)
        return {"erased": True, "pseudonym": pseudonym, "kept": KEPT_AFTER_ERASURE}

    async def _erase_room_memberships(self, citizen: Citizen) -> None:
        """Their places in agency rooms over WhatsApp (bridge.rooms_wa): each room's
        consent is withdrawn (the record stays, like every consent record), each room
        pseudonym is retired (deactivated: it leaves the room, and its link to them
        goes with its record), then memberships, kept backlog and wamid pairs go."""
        members = await self._db.wa_rooms.of_citizen_all(citizen.id)
        for member in members:
            if member.state == "joined":
                await self._db.consent.append(
                    citizen_id=citizen.id, pseudonym=Pseudonym(citizen.pseudonym_code),
                    purpose=room_purpose(member.room_id), state="withdrawn",
                    notice_version=ROOM_NOTICE_VERSION, notice_hash=member.notice_hash,
                    channel="admin", language=ROOM_LANGUAGE, evidence="erasure")
        for member in members:
            if member.ghost_user_id is not None:
                await self._ghosts.retire(member.ghost_user_id)
        await self._db.wa_rooms.erase_citizen(citizen.id)
