"""The accounts made through invite links: their holders' export and erasure (GDPR arts.
15, 17, 20), and the retirement of accounts nobody ever used (retention).

Such an account is an ordinary Synapse user outside the appservice's namespace, so only
a Synapse admin can deactivate it: both erasure and retirement use
`moderation.synapse_admin_token` (Synapse's admin API, `erase: true`). What the bridge
holds on the account is small: the link it came through, when, its display name, its
membership consent records; what it wrote lives on the homeserver.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from bridge.db import Database
from bridge.db.invites import InviteAccount
from bridge.errors import Unavailable
from bridge.matrix.api import MatrixAPI, MatrixError
from bridge.moderation.synapse_admin import SynapseAdmin
from bridge.types import Pseudonym, UserID

log = logging.getLogger(__name__)

NO_ADMIN_TOKEN = ("erasing an invite-link account needs moderation.synapse_admin_token (a "
                  "Synapse admin's token): only a Synapse admin can deactivate it")
KEPT_AFTER_ERASURE = [
    "membership consent records and audit entries (legal evidence; they name the "
    "pseudonymous Matrix ID only)",
    "what the account wrote in rooms: kept by the homeserver, hidden from anyone who "
    "joins later (the account was erased)",
]
# Rooms the bridge's bot can see a member of; portals hold one WhatsApp citizen only.
ROOM_KINDS = ("citizen", "announcement", "team")
BATCH = 200


def _time(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


class InviteAccounts:
    """Export, erasure and retirement of invite-link accounts; `admin` is None without
    moderation.synapse_admin_token."""

    def __init__(self, db: Database, api: MatrixAPI, bot: UserID,
                 admin: SynapseAdmin | None) -> None:
        self._db = db
        self._api = api
        self._bot = bot
        self._admin = admin

    async def find(self, user_id: str) -> InviteAccount | None:
        return await self._db.invites.account(UserID(user_id))

    async def export(self, account: InviteAccount, actor: str, reason: str) -> dict[str, Any]:
        """What the bridge holds on the account (audited, as every export)."""
        link = await self._db.invites.get(account.link_id) if account.link_id else None
        records = await self._db.consent.for_pseudonym(Pseudonym(account.user_id))
        rooms = await self._rooms(account.user_id)
        await self._db.audit.append(actor, "citizen.export", f"invite account {account.user_id}",
                                    "ok", reason)
        return {
            "kind": "invite_account",
            "matrix_user_id": account.user_id,
            "display_name": account.display_name,
            "account_created_at": _time(account.created_at),
            "invite_link": None if link is None else {
                "id": link.id, "room_id": link.room_id, "created_at": _time(link.created_at),
                "expires_at": _time(link.expires_at), "uses": link.uses,
                "max_uses": link.max_uses, "revoked_at": _time(link.revoked_at)},
            "invited_to": account.room_id,
            "rooms": rooms,
            "consent_records": [
                {"purpose": r.purpose, "state": r.state, "notice_version": r.notice_version,
                 "notice_hash": r.notice_hash, "channel": r.channel, "language": r.language,
                 "evidence": r.evidence, "at": _time(r.created_at)} for r in records],
            "not_included": "what the account wrote: held by the homeserver in end-to-end "
                            "encrypted rooms, readable by their members, not by the bridge",
        }

    async def _rooms(self, user_id: UserID) -> list[dict[str, Any]]:
        """The agency rooms the account is or was a member of, as the bot sees them."""
        found = []
        for room in await self._db.rooms.list(include_closed=True):
            if room.kind not in ROOM_KINDS:
                continue
            try:
                member = await self._api.get_state_event(self._bot, room.room_id,
                                                         "m.room.member", user_id)
            except MatrixError:
                continue  # never a member (404), or the bot left the room (403)
            found.append({"room_id": room.room_id, "name": room.name, "kind": room.kind,
                          "membership": member.get("membership")})
        return found

    async def erase(self, account: InviteAccount, actor: str, reason: str | None
                    ) -> dict[str, Any]:
        """Deactivate and erase the account on the homeserver, then forget it here."""
        if self._admin is None:
            raise Unavailable(NO_ADMIN_TOKEN)
        await self._retire(account, actor, "citizen.erase", reason)
        log.info("invite account erased")
        return {"erased": True, "matrix_user_id": account.user_id, "kept": KEPT_AFTER_ERASURE}

    async def _retire(self, account: InviteAccount, actor: str, action: str,
                      reason: str | None, *, on_homeserver: bool = True) -> None:
        assert self._admin is not None
        # The homeserver first: a failure leaves the row, so the next attempt finds it.
        if on_homeserver:
            await self._admin.deactivate(account.user_id)
        await self._db.reports.forget_reporter(account.user_id)
        await self._db.invites.delete_account(account.user_id)
        await self._db.audit.append(actor, action, f"invite account {account.user_id}", "ok",
                                    reason)

    async def purge_unused(self, made_before: datetime, *, dry_run: bool = False
                           ) -> tuple[int, int, int]:
        """Retire accounts made before `made_before` that were never used (no login, no
        room): (retired, failed, left unchecked for want of the admin token)."""
        candidates = await self._db.invites.unused_accounts(made_before, BATCH)
        if self._admin is None:
            return 0, 0, len(candidates)
        retired = failed = 0
        for account in candidates:
            try:
                used = await self._admin.account_in_use(account.user_id)
                if used:
                    if not dry_run:
                        await self._db.invites.mark_in_use(account.user_id)
                    continue
                if not dry_run:
                    # None: deactivated (or removed) on the homeserver already.
                    await self._retire(account, "retention", "invite_account.retire",
                                       "never used: no login, no room" if used is False
                                       else "already deactivated on the homeserver",
                                       on_homeserver=used is False)
                retired += 1
            except Exception as exc:
                log.warning("unused invite account not retired (%s)", type(exc).__name__)
                failed += 1
        return retired, failed, 0
