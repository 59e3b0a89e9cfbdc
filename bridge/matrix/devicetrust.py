"""Which staff devices their owner cross-signed: the only ones owed earlier room keys.

Earlier room keys (bridge.matrix.keyshare) open every message a ghost sent before a
device appeared. A password is enough to log a new device in, so a phished service-desk
password would read every portal's history. With `e2ee.forward_keys_to: cross-signed`
those keys go only to a device signed by its user's self-signing key, itself signed by
the user's master key: what Element does when the owner verifies a new session from one
they already had. A user with no cross-signing identity has no such device.

nio ignores cross-signing, so the check reads `/keys/query` itself. `cross_signed` is
pure; `CrossSignedDevices` asks the homeserver and remembers refusals for a while (an
unsigned device would otherwise cost a query on every forwarding round) until the
owner's device list changes, which is what signing a device does.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
from collections.abc import Iterable
from typing import Any

from bridge.matrix.api import MatrixAPI
from bridge.matrix.crosssign import verify_signed_json
from bridge.matrix.keyshare import Target
from bridge.metrics import Metrics

log = logging.getLogger(__name__)

JsonDict = dict[str, Any]

# A refusal is re-checked after this long even if no device-list change was reported.
RECHECK_SECONDS = 300.0


def _only_ed25519(key_object: object, user_id: str, usage: str) -> bytes | None:
    """The raw public key of a cross-signing key object for `user_id` and `usage`."""
    if not isinstance(key_object, dict) or key_object.get("user_id") != user_id:
        return None
    if usage not in (key_object.get("usage") or []):
        return None
    keys = key_object.get("keys")
    if not isinstance(keys, dict) or len(keys) != 1:
        return None
    ((key_id, value),) = keys.items()
    if not isinstance(value, str) or key_id != f"ed25519:{value}":
        return None
    try:
        raw = base64.b64decode(value + "=" * (-len(value) % 4), validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw if len(raw) == 32 else None


def cross_signed(query: JsonDict, user_id: str) -> dict[str, str]:
    """device id -> curve25519 key of `user_id`'s devices their owner cross-signed, from
    a `/keys/query` answer: the device carries a valid signature of the user's
    self-signing key, which carries a valid signature of the user's master key."""
    master = _only_ed25519(query.get("master_keys", {}).get(user_id), user_id, "master")
    ssk_object = query.get("self_signing_keys", {}).get(user_id)
    self_signing = _only_ed25519(ssk_object, user_id, "self_signing")
    if master is None or self_signing is None or \
            not verify_signed_json(ssk_object, user_id, master):
        return {}
    devices = query.get("device_keys", {}).get(user_id)
    out: dict[str, str] = {}
    for device_id, device in (devices if isinstance(devices, dict) else {}).items():
        if not isinstance(device, dict) or device.get("user_id") != user_id or \
                device.get("device_id") != device_id:
            continue
        curve = (device.get("keys") or {}).get(f"curve25519:{device_id}")
        if isinstance(curve, str) and verify_signed_json(device, user_id, self_signing):
            out[device_id] = curve
    return out


class CrossSignedDevices:
    """The `key_trust` of `Devices`: keeps the targets their owner cross-signed.

    One instance for every device of the bridge; `users_changed` (device lists reported
    in appservice transactions) forgets what was refused for those users.
    """

    def __init__(self, api: MatrixAPI, metrics: Metrics | None = None) -> None:
        self._api = api
        self._metrics = metrics
        # (user, device, curve25519) -> when it was found not cross-signed
        self._refused: dict[tuple[str, str, str], float] = {}

    async def __call__(self, as_user: str, targets: Iterable[Target]) -> set[Target]:
        now = asyncio.get_running_loop().time()
        wanted = [t for t in set(targets)
                  if now - self._refused.get((t.user_id, t.device_id, t.curve25519),
                                             float("-inf")) >= RECHECK_SECONDS]
        if not wanted:
            return set()
        users = sorted({t.user_id for t in wanted})
        query = await self._api.request("POST", "/_matrix/client/v3/keys/query",
                                        as_user=as_user,
                                        json={"device_keys": {u: [] for u in users}})
        signed = {u: cross_signed(query, u) for u in users}
        allowed: set[Target] = set()
        for target in wanted:
            if signed[target.user_id].get(target.device_id) == target.curve25519:
                allowed.add(target)
            else:
                self._refused[(target.user_id, target.device_id, target.curve25519)] = now
        if len(allowed) < len(wanted):
            if self._metrics is not None:
                self._metrics.room_keys_withheld.inc(len(wanted) - len(allowed))
            log.info("earlier room keys withheld from %d device(s) not cross-signed by "
                     "their owner", len(wanted) - len(allowed))
        return allowed

    def users_changed(self, users: Iterable[str]) -> None:
        """These users' devices changed (e.g. one was just signed): check them again."""
        changed = set(users)
        for key in [k for k in self._refused if k[0] in changed]:
            del self._refused[key]
