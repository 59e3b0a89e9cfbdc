"""Publishing a ghost's cross-signing keys and its device signature: the homeserver side
of `bridge.matrix.crosssign`, which decides what to upload."""

from __future__ import annotations

import logging

import aiohttp

from bridge.matrix.crosssign import (
    CrossSigningError,
    CrossSigningSeeds,
    JsonDict,
    device_signing_upload_body,
    plan,
)

log = logging.getLogger(__name__)


async def _post(
    session: aiohttp.ClientSession,
    url: str,
    token: str,
    params: dict[str, str],
    body: JsonDict,
    step: str,
) -> JsonDict:
    async with session.post(
        url, params=params, json=body, headers={"Authorization": f"Bearer {token}"}
    ) as resp:
        try:
            data = await resp.json(content_type=None)
        except (ValueError, aiohttp.ContentTypeError):
            data = None
        if resp.status != 200 or not isinstance(data, dict):
            errcode = data.get("errcode", "?") if isinstance(data, dict) else "?"
            if resp.status == 401 and isinstance(data, dict) and "flows" in data:
                errcode = "user-interactive auth required (use the as_token)"
            raise CrossSigningError(f"{step}: homeserver answered {resp.status} {errcode}")
        return data


async def ensure_cross_signed(
    session: aiohttp.ClientSession,
    homeserver_url: str,
    as_token: str,
    user_id: str,
    device_id: str,
    seeds: CrossSigningSeeds,
    *,
    allow_replace: bool = False,
    masquerade: bool = True,
) -> None:
    """Make the server hold our cross-signing keys for `user_id` and our signature on its
    device `device_id`. Idempotent: when all is in place it costs one `/keys/query`.

    Acts as the appservice (`as_token` plus `?user_id=`), which also lets a key
    replacement skip user-interactive auth. With `masquerade=False`, `as_token` is the
    user's own access token instead (tests, non-appservice users); a replacement then
    fails with UIA.

    A different master key on the server is replaced only if `allow_replace`: that is
    an identity reset which clients that saw the old identity flag. Otherwise, and on
    any refusal by the server, raises `CrossSigningError`. The device keys must be on the
    server already (nio uploads them after login).
    """
    base = homeserver_url.rstrip("/") + "/_matrix/client/v3/keys"
    params = {"user_id": user_id} if masquerade else {}

    query = await _post(
        session,
        f"{base}/query",
        as_token,
        params,
        {"device_keys": {user_id: [device_id]}},
        "keys/query",
    )
    todo = plan(query, user_id, device_id, seeds)
    if todo.nothing_to_do:
        return

    if todo.upload_keys:
        if todo.replaces_identity and not allow_replace:
            raise CrossSigningError(
                f"{user_id} has a different cross-signing identity on the server;"
                " replacing it is an identity reset (allow_replace=True)"
            )
        await _post(
            session,
            f"{base}/device_signing/upload",
            as_token,
            params,
            device_signing_upload_body(user_id, seeds),
            "keys/device_signing/upload",
        )
        if todo.replaces_identity:
            log.warning(
                "replaced the cross-signing identity of %s: clients will show an identity reset",
                user_id,
            )
        else:
            log.info("published cross-signing keys of %s", user_id)

    if todo.signed_device is not None:
        answer = await _post(
            session,
            f"{base}/signatures/upload",
            as_token,
            params,
            {user_id: {device_id: todo.signed_device}},
            "keys/signatures/upload",
        )
        # Always 200: a rejected signature only shows up in `failures`.
        failures = answer.get("failures") or {}
        if failures:
            errcodes = sorted(
                {
                    str(f.get("errcode", "?"))
                    for per_user in failures.values()
                    if isinstance(per_user, dict)
                    for f in per_user.values()
                    if isinstance(f, dict)
                }
            )
            raise CrossSigningError(
                f"keys/signatures/upload rejected the signature on {user_id} {device_id}:"
                f" {', '.join(errcodes) or '?'}"
            )
        log.info("cross-signed device %s of %s", device_id, user_id)
