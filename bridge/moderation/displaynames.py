"""Display names watched by the bridge: a citizen's name stays a pseudonym.

Where the homeserver does not refuse it (the project's Synapse module is not installed),
a citizen (an invite-link account or a bridge ghost) may take a display name with a
phone number, an e-mail address or a word reserved for staff. The bridge sees the member
event in the agency room and:
- sets a ghost's name back (the appservice owns ghost accounts);
- sets an invite-link account's name back through Synapse's admin API when
  `moderation.synapse_admin_token` is set; without it, it cannot (a member event for
  someone else may only kick, ban or invite, never rename), and says so;
- tells the management room (the offending name only if it has no digit and no @),
  audits `displayname.revert`, counts `civic_bridge_display_names_refused`.
The offending name is never logged nor audited.
"""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import quote

from bridge.config import Config
from bridge.db import Database
from bridge.matrix.api import MatrixAPI, MatrixError
from bridge.matrix.ghosts import Ghosts
from bridge.metrics import Metrics
from bridge.moderation import texts
from bridge.moderation.notify import ManagementRooms, Reporters
from bridge.moderation.rules import name_problems, showable_name
from bridge.moderation.synapse_admin import SynapseAdmin
from bridge.types import RoomID, UserID

log = logging.getLogger(__name__)
NO_TOKEN = ("moderation.synapse_admin_token is not set, and only a Synapse admin can rename "
            "another account")


class DisplayNameWatch:
    """A relay member handler (called with each m.room.member event)."""

    def __init__(self, config: Config, db: Database, api: MatrixAPI, ghosts: Ghosts,
                 admin: SynapseAdmin | None, management: ManagementRooms,
                 reporters: Reporters, metrics: Metrics) -> None:
        self._config = config
        self._db = db
        self._api = api
        self._ghosts = ghosts
        self._admin = admin
        self._management = management
        self._reporters = reporters
        self._metrics = metrics

    async def __call__(self, event: dict[str, Any]) -> None:
        content = event.get("content")
        if not self._config.moderation.watch_display_names or not isinstance(content, dict) \
                or content.get("membership") != "join":
            return
        name, target = content.get("displayname"), str(event.get("state_key", ""))
        room_id = RoomID(str(event.get("room_id", "")))
        if not isinstance(name, str) or not name or target == self._ghosts.bot:
            return
        pseudonym = await self._pseudonym(target)
        if pseudonym is None or name == pseudonym:
            return  # staff, or the name the bridge gave them
        room = await self._db.rooms.get(room_id)
        if room is None or room.kind == "management":
            return
        problems = name_problems(name, await self._reserved())
        if not problems:
            return
        why_not = await self._revert(UserID(target), pseudonym)
        outcome = "reverted" if why_not is None else "not_reverted"
        self._metrics.display_names.labels(outcome).inc()
        await self._db.audit.append("bridge", "displayname.revert", f"{room_id} {target}",
                                    "ok" if why_not is None else "not reverted",
                                    ", ".join(problems))
        await self._management.post(texts.name_notice(
            room_name=room.name, room_id=room_id, user_id=target, pseudonym=pseudonym,
            problems=problems, shown=name if showable_name(name) else None,
            reverted=why_not is None, why_not=why_not))
        if why_not is None and not self._ghosts.is_ours(target):
            language = await self._reporters.language(UserID(target))
            await self._reporters.tell("matrix", UserID(target), "",
                                       texts.NAME_REVERTED.get(language,
                                                               texts.NAME_REVERTED["es"]))

    async def _pseudonym(self, user_id: str) -> str | None:
        """The name a citizen account must show; None for anyone else."""
        if self._ghosts.is_ours(user_id):
            ghost = await self._db.ghosts.get(UserID(user_id))
            return ghost.display_name if ghost else None
        account = await self._db.invites.account(UserID(user_id))
        return account.display_name if account else None

    async def _reserved(self) -> list[str]:
        """Configured words, the agency's name and every staff member's display name."""
        words = list(self._config.moderation.reserved_names)
        if self._config.consent.agency_name != "la entidad":
            words.append(self._config.consent.agency_name)
        for staff in {*self._config.admin.users, *self._config.portals.staff}:
            try:
                profile = await self._api.request(
                    "GET", f"/_matrix/client/v3/profile/{_q(staff)}/displayname",
                    as_user=self._ghosts.bot)
            except MatrixError:
                continue
            if isinstance(profile.get("displayname"), str):
                words.append(profile["displayname"])
        return words

    async def _revert(self, user_id: UserID, pseudonym: str) -> str | None:
        """Set the name back; None if done, else why not (safe to show)."""
        try:
            if self._ghosts.is_ours(user_id):
                await self._api.set_displayname(user_id, pseudonym)
            elif self._admin is None:
                return NO_TOKEN
            else:
                await self._admin.set_displayname(user_id, pseudonym)
        except MatrixError as exc:
            log.warning("display name of %s not reverted (%s)", user_id, exc.errcode)
            return f"the homeserver refused ({exc.errcode})"
        return None


def _q(value: str) -> str:
    return quote(value, safe="")
