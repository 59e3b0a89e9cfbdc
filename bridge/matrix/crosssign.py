"""Cross-signing for ghost users whose device keys matrix-nio uploaded.

matrix-nio has no cross-signing, and Element shows every message from an unsigned
device with a red shield ("Encrypted by a device not verified by its owner"). The
bridge therefore holds three Ed25519 keys per ghost (master, self-signing,
user-signing), publishes them and signs the ghost's device with the self-signing key.

The signing and the decision what to do (`plan`) are pure functions, here (no I/O
library: tests/unit/test_core_imports.py); `bridge.matrix.crosssign_upload` is the thin
adapter that talks to the homeserver. The seeds are an identity: losing or
regenerating them is an identity reset that clients flag, so callers persist them
(encrypted) and reuse them.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from dataclasses import dataclass, field
from typing import Any

from canonicaljson import encode_canonical_json
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from bridge.errors import BridgeError

log = logging.getLogger(__name__)

JsonDict = dict[str, Any]

SEED_LENGTH = 32
_SEEDS_FORMAT_VERSION = 1


class CrossSigningError(BridgeError):
    """The homeserver refused or failed a cross-signing step; the message holds no secrets."""

    status = 502
    errcode = "CB_CROSS_SIGNING"


# --- encoding helpers -------------------------------------------------------------------


def _b64encode(data: bytes) -> str:
    """Unpadded standard base64, as the Matrix spec uses for keys and signatures."""
    return base64.b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    """Decode unpadded (or padded) standard base64; raises ValueError on bad input."""
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except binascii.Error as exc:
        raise ValueError("invalid base64") from exc


def public_key(seed: bytes) -> bytes:
    """The raw 32-byte Ed25519 public key for a 32-byte private seed."""
    return (
        Ed25519PrivateKey.from_private_bytes(seed)
        .public_key()
        .public_bytes(Encoding.Raw, PublicFormat.Raw)
    )


def key_id(public_raw: bytes) -> str:
    """`ed25519:<unpadded base64 of the public key>`, the id Matrix gives a cross-signing key."""
    return f"ed25519:{_b64encode(public_raw)}"


# --- seeds ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class CrossSigningSeeds:
    """The three Ed25519 private seeds of one user's cross-signing identity.

    Secret material: `repr` hides it; store `to_json()` only encrypted.
    """

    master: bytes = field(repr=False)
    self_signing: bytes = field(repr=False)
    user_signing: bytes = field(repr=False)

    def __post_init__(self) -> None:
        for name in ("master", "self_signing", "user_signing"):
            value = getattr(self, name)
            if not isinstance(value, bytes) or len(value) != SEED_LENGTH:
                raise ValueError(f"{name}: must be {SEED_LENGTH} bytes")

    @classmethod
    def generate(cls) -> CrossSigningSeeds:
        """Three fresh keys (from the OS CSPRNG, via `cryptography`)."""

        def seed() -> bytes:
            return Ed25519PrivateKey.generate().private_bytes_raw()

        return cls(master=seed(), self_signing=seed(), user_signing=seed())

    def to_json(self) -> str:
        """Serialise for storage; the caller encrypts the result at rest."""
        return json.dumps(
            {
                "version": _SEEDS_FORMAT_VERSION,
                "master": _b64encode(self.master),
                "self_signing": _b64encode(self.self_signing),
                "user_signing": _b64encode(self.user_signing),
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, data: str | bytes) -> CrossSigningSeeds:
        """Inverse of `to_json`; raises ValueError (without echoing the input) if malformed."""
        try:
            obj = json.loads(data)
        except ValueError:
            raise ValueError("cross-signing seeds: not JSON") from None
        if not isinstance(obj, dict) or obj.get("version") != _SEEDS_FORMAT_VERSION:
            raise ValueError("cross-signing seeds: unknown format")
        seeds: dict[str, bytes] = {}
        for name in ("master", "self_signing", "user_signing"):
            value = obj.get(name)
            if not isinstance(value, str):
                raise ValueError(f"cross-signing seeds: {name} missing")
            seeds[name] = _b64decode(value)
        return cls(**seeds)

    @property
    def master_public(self) -> bytes:
        return public_key(self.master)

    @property
    def self_signing_public(self) -> bytes:
        return public_key(self.self_signing)

    @property
    def user_signing_public(self) -> bytes:
        return public_key(self.user_signing)


def generate() -> CrossSigningSeeds:
    """Fresh cross-signing seeds for a new identity."""
    return CrossSigningSeeds.generate()


def fingerprint(public_raw: bytes) -> str:
    """A key for humans to compare: unpadded base64 in groups of four, as Element shows keys."""
    text = _b64encode(public_raw)
    return " ".join(text[i : i + 4] for i in range(0, len(text), 4))


# --- signed JSON -----------------------------------------------------------------------------


def _signable(obj: JsonDict) -> bytes:
    return encode_canonical_json(
        {k: v for k, v in obj.items() if k not in ("signatures", "unsigned")}
    )


def sign_json(obj: JsonDict, user_id: str, seed: bytes) -> JsonDict:
    """A copy of `obj` with an Ed25519 signature added under `signatures[user_id][key_id]`.

    Signs the canonical JSON of `obj` without `signatures` and `unsigned` (Matrix
    "Signing JSON"); existing signatures are kept. `obj` is not modified.
    """
    private = Ed25519PrivateKey.from_private_bytes(seed)
    signature = _b64encode(private.sign(_signable(obj)))
    signed = dict(obj)
    signatures = {uid: dict(sigs) for uid, sigs in obj.get("signatures", {}).items()}
    signatures.setdefault(user_id, {})[key_id(public_key(seed))] = signature
    signed["signatures"] = signatures
    return signed


def verify_signed_json(obj: JsonDict, user_id: str, public_key_raw: bytes) -> bool:
    """True if `obj` carries a valid signature by `public_key_raw` under `user_id`."""
    try:
        signature_b64 = obj["signatures"][user_id][key_id(public_key_raw)]
        signature = _b64decode(signature_b64)
        Ed25519PublicKey.from_public_bytes(public_key_raw).verify(signature, _signable(obj))
    except (KeyError, TypeError, ValueError, InvalidSignature):
        return False
    return True


def _cross_signing_key(user_id: str, usage: str, public_raw: bytes) -> JsonDict:
    return {
        "user_id": user_id,
        "usage": [usage],
        "keys": {key_id(public_raw): _b64encode(public_raw)},
    }


def device_signing_upload_body(user_id: str, seeds: CrossSigningSeeds) -> JsonDict:
    """Body of `POST /keys/device_signing/upload`: the three public keys, the self- and
    user-signing keys signed by the master key."""
    return {
        "master_key": _cross_signing_key(user_id, "master", seeds.master_public),
        "self_signing_key": sign_json(
            _cross_signing_key(user_id, "self_signing", seeds.self_signing_public),
            user_id,
            seeds.master,
        ),
        "user_signing_key": sign_json(
            _cross_signing_key(user_id, "user_signing", seeds.user_signing_public),
            user_id,
            seeds.master,
        ),
    }


def sign_device(device_keys: JsonDict, user_id: str, seeds: CrossSigningSeeds) -> JsonDict:
    """The device object, as stored on the server, signed with the self-signing key.

    Pass the object exactly as `/keys/query` returned it: the server rejects a signature
    over anything else ("Key does not match"). `unsigned` is dropped; the device's own
    signature stays.
    """
    if device_keys.get("user_id") != user_id:
        raise ValueError("device keys belong to another user")
    device = {k: v for k, v in device_keys.items() if k != "unsigned"}
    return sign_json(device, user_id, seeds.self_signing)


# --- deciding what to do ------------------------------------------------------------------


@dataclass(frozen=True)
class CrossSigningPlan:
    """What `ensure_cross_signed` has to do, decided from one `/keys/query` answer."""

    upload_keys: bool
    """Publish our three cross-signing keys."""
    replaces_identity: bool
    """The server holds a different master key: uploading ours is an identity reset."""
    signed_device: JsonDict | None = field(default=None, repr=False)
    """The device object to send to `/keys/signatures/upload`, or None if already signed."""

    @property
    def nothing_to_do(self) -> bool:
        return not self.upload_keys and self.signed_device is None


def _published_key(query: JsonDict, section: str, user_id: str) -> JsonDict | None:
    value = query.get(section, {}).get(user_id)
    return value if isinstance(value, dict) else None


def _is_our_key(published: JsonDict | None, public_raw: bytes) -> bool:
    return published is not None and published.get("keys") == {
        key_id(public_raw): _b64encode(public_raw)
    }


def plan(
    query: JsonDict, user_id: str, device_id: str, seeds: CrossSigningSeeds
) -> CrossSigningPlan:
    """Decide from a `/keys/query` answer which cross-signing steps are missing."""
    master = _published_key(query, "master_keys", user_id)
    self_signing = _published_key(query, "self_signing_keys", user_id)
    master_ok = _is_our_key(master, seeds.master_public)
    upload = not master_ok or not _is_our_key(self_signing, seeds.self_signing_public)

    device = query.get("device_keys", {}).get(user_id, {}).get(device_id)
    if not isinstance(device, dict):
        raise CrossSigningError(
            f"device {device_id} of {user_id} has no keys on the server; upload them first"
        )
    signed: JsonDict | None = None
    if upload or not verify_signed_json(device, user_id, seeds.self_signing_public):
        signed = sign_device(device, user_id, seeds)
    return CrossSigningPlan(
        upload_keys=upload,
        replaces_identity=master is not None and not master_ok,
        signed_device=signed,
    )
