"""Portal rooms: one private E2EE room per opted-in WhatsApp citizen.

The citizen appears as their ghost (pseudonym, own device); `portals.staff` are invited
when the portal is created. History is visible from invitation so staff who join late
can still read the first messages (the ghost's device shares keys with invited devices).
"""

from __future__ import annotations

import logging
import secrets
from typing import Any
from urllib.parse import quote

from bridge.config import Config
from bridge.db import Citizen, Database
from bridge.matrix.api import MatrixAPI, MatrixError
from bridge.matrix.ghosts import Ghosts
from bridge.matrix.relay import Relay
from bridge.matrix.room_policy import portal_state_keys
from bridge.matrix.rooms import Rooms
from bridge.texts.matrix import default as mx_text
from bridge.types import EventID, RoomID, UserID

log = logging.getLogger(__name__)


# + citizen id -> the creation token of the portal being created (see Portals._create)
PORTAL_INTENT = "portal-creating:"

OPTED_OUT_NOTICE = mx_text.OPTED_OUT_NOTICE


class Portals:
    def __init__(self, config: Config, db: Database, api: MatrixAPI, ghosts: Ghosts,
                 rooms: Rooms, relay: Relay) -> None:
        self._config = config
        self._db = db
        self._api = api
        self._ghosts = ghosts
        self._rooms = rooms
        self._relay = relay

    async def ghost_for(self, citizen: Citizen) -> UserID:
        if citizen.ghost_user_id:
            ghost = citizen.ghost_user_id
        else:
            existing = await self._db.ghosts.by_citizen(citizen.id)
            ghost = UserID(existing.user_id) if existing else await self._ghosts.create(
                "citizen", citizen.id)
            await self._db.citizens.set_ghost(citizen.id, ghost)
        # A retry after the homeserver was down mid-creation finishes the registration
        # here rather than only at the next restart.
        await self._ghosts.ensure_registered(ghost)
        return ghost

    async def open(self, citizen: Citizen) -> RoomID:
        """The citizen's portal with their ghost joined (idempotent)."""
        ghost = await self.ghost_for(citizen)
        room = await self._db.rooms.portal_for(citizen.id)
        if room is None or room.closed_at is not None:
            room_id = await self._create(citizen, ghost)
        else:
            room_id = RoomID(room.room_id)
            await self._invite_quietly(room_id, ghost)
        await self._api.join(ghost, room_id)
        return room_id

    async def _create(self, citizen: Citizen, ghost: UserID) -> RoomID:
        """Create and record the portal, once, even if a crash splits the two steps.

        Before `createRoom` a random creation token is stored; the room is created with
        an alias made from it (the bridge's alias namespace; a random token, never an
        identifier). A retry that finds the token looks the alias up and records the
        room that already exists instead of creating another. The alias goes once the
        room is recorded.
        """
        key = PORTAL_INTENT + str(citizen.id)
        token = await self._db.kv.get(key)
        room_id = None
        if token is not None:
            room_id = await self._api.resolve_alias(self._alias(token))
            if room_id is not None and await self._db.rooms.get(room_id) is not None:
                room_id = None  # an earlier portal whose alias was left: not this one
            if room_id is not None and not await self._complete(room_id):
                # Synapse stopped mid-createRoom persists a prefix of the room's events:
                # one the bot never joined (no prev_events), or one without its
                # encryption or join rules yet. Never use such a room: make a new one.
                log.warning("portal %s left incomplete by an interrupted creation; "
                            "creating another", room_id)
                await self._abandon(room_id, token)
                room_id = None
        ghost_row = await self._db.ghosts.get(ghost)
        name = mx_text.PORTAL_NAME.format(
            pseudonym=ghost_row.display_name if ghost_row else mx_text.PORTAL_NAME_UNKNOWN)
        if room_id is None:
            token = secrets.token_hex(12)
            await self._db.kv.set(key, token)
            room_id = await self._rooms.create(
                "portal", name, topic=mx_text.PORTAL_TOPIC,
                invite=[*self._config.portals.staff, ghost],
                alias_localpart=self._alias_localpart(token))
        else:
            # createRoom may have been cut short after the room existed but before its
            # invites went out (Synapse stopped mid-request): invite again, quietly.
            log.info("portal %s found after an interrupted creation", room_id)
            for user_id in (*self._config.portals.staff, ghost):
                await self._invite_quietly(room_id, user_id)
        await self._db.rooms.create(room_id, "portal", name, self._ghosts.bot,
                                    citizen_id=citizen.id)
        await self._db.kv.delete(key)
        assert token is not None
        try:
            await self._api.delete_alias(self._ghosts.bot, self._alias(token))
        except MatrixError as exc:  # harmless if left: random, and ignored once recorded
            log.warning("portal alias not removed (%s)", exc.errcode)
        log.info("portal %s opened", room_id)
        return room_id

    async def _complete(self, room_id: RoomID) -> bool:
        """Whether `room_id` holds every state event a portal's createRoom sends before
        its invites (the bot's own join included: the state is only readable when it is
        joined). A 5xx or 429 is raised: ask again later."""
        try:
            state = await self._api.request(
                "GET", f"/_matrix/client/v3/rooms/{quote(room_id, safe='')}/state",
                as_user=self._ghosts.bot)
        except MatrixError as exc:
            if exc.status >= 500 or exc.status == 429:
                raise
            return False
        events: Any = state  # GET /state answers a JSON list
        present: set[tuple[Any, Any]] = {
            (e.get("type"), e.get("state_key")) for e in events if isinstance(e, dict)
        } if isinstance(events, list) else set()
        return all(key in present for key in portal_state_keys())

    async def _abandon(self, room_id: RoomID, token: str) -> None:
        """Best effort: nobody was invited into an incomplete room (invites come last),
        so the bot leaving it and its alias going leaves nothing behind."""
        for step in (self._api.delete_alias(self._ghosts.bot, self._alias(token)),
                     self._api.leave(self._ghosts.bot, room_id)):
            try:
                await step
            except MatrixError as exc:
                log.info("abandoned portal %s: cleanup step refused (%s)", room_id, exc.errcode)

    def _alias_localpart(self, token: str) -> str:
        return f"{self._config.appservice.ghost_prefix}portal_{token}"

    def _alias(self, token: str) -> str:
        return f"#{self._alias_localpart(token)}:{self._config.homeserver.domain}"

    async def _invite_quietly(self, room_id: RoomID, user_id: str) -> None:
        try:
            await self._api.invite(self._ghosts.bot, room_id, user_id)
        except MatrixError as exc:
            if exc.status != 403:  # 403: already a member
                raise

    async def room_of(self, citizen: Citizen) -> RoomID | None:
        room = await self._db.rooms.portal_for(citizen.id)
        return RoomID(room.room_id) if room and room.closed_at is None else None

    async def close(self, citizen: Citizen, notice: str = OPTED_OUT_NOTICE) -> None:
        """Opt-out or erasure: staff are told, the ghost leaves (no-op if it already left)."""
        room_id = await self.room_of(citizen)
        if room_id is None or citizen.ghost_user_id is None:
            return
        await self.notice(room_id, notice)
        try:
            await self._api.leave(citizen.ghost_user_id, room_id)
        except MatrixError as exc:
            log.warning("ghost leave failed: %s", exc.errcode)

    async def read_receipt(self, ghost: UserID, room_id: RoomID, event_id: EventID) -> None:
        """The citizen read a staff message on WhatsApp: their ghost marks it read."""
        await self._api.receipt(ghost, room_id, event_id)

    async def notice(self, room_id: RoomID, text: str, *, txn_id: str | None = None
                     ) -> EventID:
        """A bridge notice to staff in the room (encrypted by the bot's device);
        `txn_id` makes a retried notice the same event, not a second one."""
        return await self._relay.send_as(self._ghosts.bot, room_id,
                                         {"msgtype": "m.notice", "body": text},
                                         txn_id=txn_id)
