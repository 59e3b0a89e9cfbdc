"""The key the E2EE crypto stores (matrix-nio, under `appservice.store_dir`) are pickled with.

nio pickles every Olm account and Megolm session with one passphrase. Versions before
this module derived it from `privacy.data_key`, so rotating the data key as documented
locked every device out of its own store. The passphrase now comes from a *store key*
of its own: 32 random bytes drawn once, kept in the database (`kv`) sealed with the data
key. Rotating the data key re-wraps that one value (`civic-bridge rekey`); the stores
are never re-pickled.

Upgrade: an installation whose devices were made by an earlier version gets, as its
store key, the value that version derived from the data key, so the existing stores
open as they are. If the data key was rotated meanwhile (and the stores stopped
opening), the keys in `privacy.previous_data_keys` are tried against a local store and
the one that opens it is kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import secrets
import sqlite3
from collections.abc import Sequence
from pathlib import Path

from nio.crypto import OlmAccount

from bridge.db.repos import KVRepo
from bridge.privacy import AAD_STORE_KEY, Cipher, DecryptError

log = logging.getLogger(__name__)

STORE_KEY = "e2ee:store_key"  # kv key of the sealed store key
STORE_KEY_LEN = 32
_LEGACY_PREFIX = b"civic-bridge nio pickle\0"


class StoreKeyError(RuntimeError):
    """The store key cannot be had with the configured data keys; the message says why
    and what fixes it (never any key material)."""


def legacy_store_key(data_key: bytes) -> bytes:
    """The store key of an installation upgraded from a version that derived nio's
    passphrase from the data key: `pickle_passphrase` of it is that passphrase."""
    return hashlib.sha256(_LEGACY_PREFIX + data_key).digest()


def pickle_passphrase(store_key: bytes) -> str:
    """nio's pickle passphrase for a store key (hex: what earlier versions passed)."""
    return store_key.hex()


async def load_store_key(kv: KVRepo, cipher: Cipher, store_dir: Path, *,
                         installed: bool, data_keys: Sequence[bytes]) -> bytes:
    """The store key, made and stored (sealed) on first use.

    `installed`: the database already has the bridge's devices (an upgrade), so their
    stores were pickled with the legacy derivation of one of `data_keys` (the current
    data key first, then the previous ones).
    """
    sealed = await kv.get(STORE_KEY)
    if sealed is None:
        first = await _first_key(store_dir, installed, data_keys)
        await kv.add(STORE_KEY, cipher.encrypt(first, aad=AAD_STORE_KEY))
        sealed = await kv.get(STORE_KEY)  # a racing process may have stored its own
        if sealed is None:
            raise StoreKeyError("the E2EE store key could not be stored")
    try:
        key = cipher.decrypt(sealed, aad=AAD_STORE_KEY)
    except DecryptError as exc:
        raise StoreKeyError(
            f"the E2EE store key does not decrypt ({exc}): it is sealed with a data key "
            "that is no longer configured; put that key back in "
            "privacy.previous_data_keys and run `civic-bridge rekey`") from None
    if len(key) != STORE_KEY_LEN:
        raise StoreKeyError("the stored E2EE store key has the wrong length")
    return key


async def _first_key(store_dir: Path, installed: bool, data_keys: Sequence[bytes]) -> bytes:
    legacy = [legacy_store_key(k) for k in data_keys]
    found = await asyncio.to_thread(_probe, store_dir, legacy)
    if found is None and (installed or _has_stores(store_dir)):
        found = legacy[0]  # devices exist but no local store to try: as before
    if found is None:
        return secrets.token_bytes(STORE_KEY_LEN)  # a new installation
    if found != legacy[0]:
        log.warning("the E2EE stores open with a previous data key's derivation: "
                    "kept as the store key; `civic-bridge rekey` can now retire that key")
    return found


def _has_stores(store_dir: Path) -> bool:
    return any(store_dir.glob("*/*.db"))


def _probe(store_dir: Path, candidates: Sequence[bytes]) -> bytes | None:
    """The candidate whose passphrase opens a local store's Olm account; None if there
    is no local store with an account. Raises StoreKeyError if none opens it."""
    for path in sorted(store_dir.glob("*/*.db")):
        pickled = _account_pickle(path)
        if pickled is None:
            continue
        for key in candidates:
            if _opens(pickled, pickle_passphrase(key)):
                return key
        raise StoreKeyError(
            f"the E2EE stores in {store_dir} do not open with privacy.data_key nor "
            "privacy.previous_data_keys: add the data key they were made with (before "
            "upgrading, the stores were locked with it) to privacy.previous_data_keys")
    return None


def _account_pickle(path: Path) -> bytes | None:
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
            row = conn.execute("SELECT account FROM accounts LIMIT 1").fetchone()
    except sqlite3.Error:
        return None  # not (yet) a nio store
    return bytes(row[0]) if row and row[0] else None


def _opens(pickled: bytes, passphrase: str) -> bool:
    try:
        OlmAccount.from_pickle(pickled, passphrase, False)
    except Exception:  # vodozemac and libolm raise their own unpickling errors
        return False
    return True
