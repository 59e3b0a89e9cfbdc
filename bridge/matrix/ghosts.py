"""Ghost users: pseudonymous Matrix accounts in the bridge's namespace.

A ghost's user ID is `@{ghost_prefix}{16 random letters}:{domain}` and its display name
comes from `privacy.pseudonym_template` with a random letter code: nothing is derived
from the phone number or BSUID it stands for.
"""

from __future__ import annotations

import logging
import secrets
import string

from bridge.db import Database, GhostKind
from bridge.matrix.api import MatrixAPI
from bridge.matrix.devices import Device, Devices
from bridge.privacy import Privacy, new_localpart, new_pseudonym_code
from bridge.types import DeviceID, RoomID, UserID

log = logging.getLogger(__name__)

BOT_DISPLAY_NAME = "civic-bridge"


def new_device_id() -> DeviceID:
    return DeviceID("CB" + "".join(secrets.choice(string.ascii_uppercase) for _ in range(10)))


class Ghosts:
    """Creates ghosts (durably: DB row first, then the homeserver) and opens their devices."""

    def __init__(self, db: Database, api: MatrixAPI, devices: Devices, privacy: Privacy,
                 prefix: str, domain: str) -> None:
        self._db = db
        self._api = api
        self._devices = devices
        self._privacy = privacy
        self._prefix = prefix
        self._domain = domain
        self.bot = UserID(f"@{prefix}bot:{domain}")
        devices.is_ours = self.is_ours

    def room_changed(self, room_id: str) -> None:
        self._devices.room_changed(room_id)

    async def open_keepers(self, room_id: RoomID) -> None:
        """Open the closed devices that kept earlier keys of the room (after a restart
        a ghost's device opens only when it speaks): opening restores their ledger, and
        their first upkeep forwards what a member who just arrived is owed."""
        for user_id in await self._db.room_keys.owners_in(room_id):
            if self._devices.get_open(user_id) is None:
                try:
                    await self.device(user_id)
                except LookupError:  # erased meanwhile: its keys go with it
                    continue

    def is_ours(self, user_id: str) -> bool:
        return user_id.startswith(f"@{self._prefix}") and user_id.endswith(f":{self._domain}")

    async def ensure_bot(self) -> Device:
        """Register the bot (once) and open its device."""
        row = await self._db.ghosts.get(self.bot)
        if row is None:
            await self._db.ghosts.create(user_id=self.bot, device_id=new_device_id(),
                                         display_name=BOT_DISPLAY_NAME, kind="bot")
        # Only when needed: a display name set makes Synapse rewrite the bot's membership
        # in every room it is in (every portal), one room after another.
        if (row is None or not row.registered
                or await self._api.display_name(self.bot) != BOT_DISPLAY_NAME):
            await self._register(self.bot, BOT_DISPLAY_NAME)
        return await self.device(self.bot)

    async def create(self, kind: GhostKind = "citizen", citizen_id: int | None = None,
                     display_name: str | None = None) -> UserID:
        """A new pseudonymous ghost; returns its user ID. `display_name`: one drawn
        beforehand (a room member is told theirs in the invitation), else a new one."""
        user_id = UserID(f"@{new_localpart(self._prefix)}:{self._domain}")
        display = display_name or self._privacy.display_name(new_pseudonym_code())
        await self._db.ghosts.create(user_id=user_id, device_id=new_device_id(),
                                     display_name=display, kind=kind, citizen_id=citizen_id)
        await self._register(user_id, display)
        return user_id

    async def resume_unregistered(self) -> None:
        """Finish ghosts whose registration a crash interrupted."""
        for ghost in await self._db.ghosts.unregistered():
            await self._register(UserID(ghost.user_id), ghost.display_name)

    async def ensure_registered(self, user_id: UserID) -> None:
        """Finish this ghost's registration if it was cut short (the homeserver was
        down when it was created): its stored row alone cannot join a room."""
        ghost = await self._db.ghosts.get(user_id)
        if ghost is not None and not ghost.registered:
            await self._register(user_id, ghost.display_name)

    async def _register(self, user_id: UserID, display_name: str) -> None:
        await self._api.register(user_id[1:].split(":", 1)[0])
        await self._api.set_displayname(user_id, display_name)
        await self._db.ghosts.mark_registered(user_id)

    async def retire(self, user_id: UserID) -> None:
        """An erased citizen's ghost: its device and keys go, the homeserver account is
        deactivated (it can never log in or be shown again), the record goes last so a
        failed step is retried by repeating the erasure."""
        await self._devices.forget(user_id)
        await self._api.deactivate(user_id)
        await self._db.ghosts.delete(user_id)

    async def device(self, user_id: UserID) -> Device:
        open_device = self._devices.get_open(user_id)
        if open_device:
            return open_device
        ghost = await self._db.ghosts.get(user_id)
        if ghost is None:
            raise LookupError("not a ghost of this bridge")
        return await self._devices.open(user_id, DeviceID(ghost.device_id))
