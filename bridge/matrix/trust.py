"""Cross-signing every device the bridge runs, so Element shows no red shield.

Each ghost (and the bot) gets its own master/self-signing/user-signing keys, generated
once, stored encrypted (AES-GCM bound to the user ID) and re-used forever: regenerating
them would be an identity reset that staff clients flag. A device is signed as soon as
its keys are on the server, before it sends anything.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from pathlib import Path

import aiohttp

from bridge.db import Database
from bridge.matrix import crosssign
from bridge.matrix.crosssign_upload import ensure_cross_signed
from bridge.privacy import Cipher
from bridge.types import DeviceID, UserID

log = logging.getLogger(__name__)

# Set (to the time, ISO 8601) once `Trust.upgrade_existing` has gone through every ghost.
UPGRADED_KEY = "cross_signing_upgraded"


class Trust:
    """The `on_ready` hook of `Devices`: cross-signs a device once its keys are uploaded."""

    def __init__(self, db: Database, http: aiohttp.ClientSession, homeserver_url: str,
                 as_token: str, cipher: Cipher) -> None:
        self._db = db
        self._http = http
        self._url = homeserver_url
        self._as_token = as_token
        self._cipher = cipher

    async def seeds(self, user_id: UserID) -> crosssign.CrossSigningSeeds:
        """The user's cross-signing seeds, generated and stored on first use."""
        ghost = await self._db.ghosts.get(user_id)
        if ghost is None:
            raise LookupError("not a ghost of this bridge")
        aad = user_id.encode()
        if ghost.cross_signing_ct:
            return crosssign.CrossSigningSeeds.from_json(
                self._cipher.decrypt(ghost.cross_signing_ct, aad=aad))
        seeds = crosssign.generate()
        # Stored before anything is uploaded: a crash in between must not lose the identity.
        await self._db.ghosts.set_cross_signing(user_id,
                                                self._cipher.encrypt(seeds.to_json(), aad=aad))
        return seeds

    async def __call__(self, user_id: UserID, device_id: DeviceID) -> None:
        await ensure_cross_signed(self._http, self._url, self._as_token, user_id,
                                            device_id, await self.seeds(user_id))

    async def fingerprints(self) -> list[tuple[str, str, str]]:
        """(user ID, kind, master-key fingerprint) of every identity the bridge holds, for
        staff to compare when verifying. Public values; ghosts without keys are skipped."""
        out: list[tuple[str, str, str]] = []
        for ghost in await self._db.ghosts.all():
            if ghost.cross_signing_ct:
                seeds = await self.seeds(UserID(ghost.user_id))
                out.append((ghost.user_id, ghost.kind,
                            crosssign.fingerprint(seeds.master_public)))
        return out

    async def upgrade_existing(self, store_dir: Path) -> int:
        """Cross-sign devices of ghosts created before cross-signing existed: once.

        Only ghosts whose device was ever opened (crypto state is stored) have device keys
        on the server; the rest are signed when their device first opens. A ghost the
        homeserver refuses (e.g. its device keys never got uploaded because a crash hit
        between login and upload) is logged and skipped, not fatal: it is retried when its
        device next opens, and one such ghost must not keep the whole bridge from starting.

        Every device opened since is signed as it opens (`__call__`, the devices' ready
        hook), before it sends anything; so once a pass has gone through every ghost, a
        later start has nothing to upgrade, and a marker in `kv` (UPGRADED_KEY) spares it
        the walk over every ghost and a `/keys/query` per opened device (10,000 of them
        with 10,000 citizens who ever wrote). A pass that a network error interrupts is
        not marked: the next start runs it again. Returns how many devices this pass
        cross-signed.
        """
        if await self._db.kv.get(UPGRADED_KEY) is not None:
            return 0
        count = skipped = 0
        opened = await self._db.crypto.owners()
        for ghost in await self._db.ghosts.all():
            localpart = ghost.user_id[1:].split(":", 1)[0]
            # A store in the database, or a file store not moved there yet.
            if ghost.registered and (ghost.user_id in opened
                                     or (store_dir / localpart).exists()):
                try:
                    await self(UserID(ghost.user_id), DeviceID(ghost.device_id))
                except crosssign.CrossSigningError as exc:
                    log.warning("not cross-signed at startup (retried when the device"
                                " opens): %s", exc)
                    skipped += 1
                    continue
                count += 1
        await self._db.kv.set(UPGRADED_KEY, datetime.now(UTC).isoformat())
        log.info("cross-signing upgrade of existing devices done: %d signed, %d left to "
                 "their next open", count, skipped)
        return count
