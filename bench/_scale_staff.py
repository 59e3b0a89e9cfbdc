"""The staff device's one-time keys, for bench/scale.py (not a benchmark itself).

Every portal invites the staff member, whose one E2EE device (made at seeding) does not
sync during the bench. A ghost's first message claims one of that device's one-time keys
to open an Olm session and share its room key. A device uploads 50; a real one tops them
up as they are claimed (its /sync says how many are left), this one cannot. Without
more, from the 51st citizen on, the bridge skips the staff device ("Missing Olm session
... skipping") and each message costs less than it would in production. So before each
run the device's account (from its nio store, copied from the cache) uploads enough
fresh signed one-time keys for every measured message (Synapse holds at most 500 per
device: one per ghost, enough for the default 500 messages). libolm holds at most 100
unpublished keys, so older private halves are dropped: the staff device could not
decrypt those sessions, which the bench never asks it to; the bridge's work to claim
and use them is the same.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import nio

BATCH = 50
SERVER_LIMIT = 500  # Synapse refuses to hold more one-time keys per device (M_TOO_LARGE)


async def top_up_one_time_keys(homeserver: str, synapse_db: str, user_id: str,
                               store: Path, count: int) -> int:
    """Bring `user_id`'s device to `count` one-time keys on the server (at most Synapse's
    limit of 500); returns the server's count. The access token is read from Synapse's database (it
    keeps them in clear); the account from the device's nio store."""
    conn = await asyncpg.connect(synapse_db)
    try:
        row = await conn.fetchrow("SELECT token, device_id FROM access_tokens "
                                  "WHERE user_id = $1 AND device_id IS NOT NULL "
                                  "ORDER BY id DESC LIMIT 1", user_id)
    finally:
        await conn.close()
    if row is None:
        raise RuntimeError(f"no access token for {user_id} in Synapse's database")
    token, device_id = str(row["token"]), str(row["device_id"])
    client = nio.AsyncClient(homeserver, user_id, device_id=device_id, store_path=str(store),
                             config=nio.AsyncClientConfig(encryption_enabled=True,
                                                          store_sync_tokens=False))
    client.restore_login(user_id, device_id, token)
    olm = client.olm
    assert olm is not None
    left = 0
    try:
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as http:
            async def upload(keys: dict[str, Any]) -> int:
                async with http.post(f"{homeserver}/_matrix/client/v3/keys/upload",
                                     json={"one_time_keys": keys}) as resp:
                    body = await resp.json()
                    if resp.status != 200:
                        raise RuntimeError(f"keys/upload: HTTP {resp.status} {body}")
                return int(body.get("one_time_key_counts", {}).get("signed_curve25519", 0))

            left = await upload({})  # only asks for the count
            while left < min(count, SERVER_LIMIT):
                olm.account.generate_one_time_keys(min(BATCH, min(count, SERVER_LIMIT) - left))
                keys: dict[str, Any] = {}
                for key_id, key in olm.account.one_time_keys["curve25519"].items():
                    signed: dict[str, Any] = {"key": key}
                    signed["signatures"] = {
                        user_id: {f"ed25519:{device_id}": olm.sign_json(signed)}}
                    keys[f"signed_curve25519:{key_id}"] = signed
                left = await upload(keys)
                olm.account.mark_keys_as_published()
        olm.save_account()
    finally:
        await client.close()
    return left
