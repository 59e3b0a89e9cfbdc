"""Which devices their owner cross-signed, decided from a `/keys/query` answer (offline)."""

from __future__ import annotations

import base64
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bridge.matrix.crosssign import (
    CrossSigningSeeds,
    device_signing_upload_body,
    generate,
    sign_device,
    sign_json,
)
from bridge.matrix.devicetrust import cross_signed

USER = "@staff:localhost"


def _unpadded(data: bytes) -> str:
    return base64.b64encode(data).rstrip(b"=").decode()


def _device(device_id: str) -> dict[str, Any]:
    """A device object as a client uploads it, signed by the device's own key."""
    own = Ed25519PrivateKey.generate()
    ed = _unpadded(own.public_key().public_bytes_raw())
    curve = _unpadded(Ed25519PrivateKey.generate().public_key().public_bytes_raw())
    device = {"user_id": USER, "device_id": device_id,
              "algorithms": ["m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"],
              "keys": {f"curve25519:{device_id}": curve, f"ed25519:{device_id}": ed},
              "unsigned": {"device_display_name": "Element"}}
    return sign_json(device, USER, own.private_bytes_raw())


def _query(seeds: CrossSigningSeeds | None, devices: dict[str, dict[str, Any]]
           ) -> dict[str, Any]:
    query: dict[str, Any] = {"device_keys": {USER: devices}}
    if seeds is not None:
        body = device_signing_upload_body(USER, seeds)
        query["master_keys"] = {USER: body["master_key"]}
        query["self_signing_keys"] = {USER: body["self_signing_key"]}
    return query


def _curve(device: dict[str, Any]) -> str:
    return str(device["keys"][f"curve25519:{device['device_id']}"])


def test_only_devices_signed_by_the_owners_self_signing_key() -> None:
    seeds = generate()
    verified = sign_device(_device("VERIFIED"), USER, seeds)
    phished = _device("PHISHED")
    other = sign_device(_device("OTHERKEY"), USER, generate())  # someone else's identity
    query = _query(seeds, {"VERIFIED": verified, "PHISHED": phished, "OTHERKEY": other})
    assert cross_signed(query, USER) == {"VERIFIED": _curve(verified)}


def test_no_identity_means_no_cross_signed_device() -> None:
    seeds = generate()
    signed = sign_device(_device("SIGNED"), USER, seeds)
    assert cross_signed(_query(None, {"SIGNED": signed}), USER) == {}
    assert cross_signed({}, USER) == {}


def test_a_self_signing_key_not_signed_by_the_master_key_vouches_for_nothing() -> None:
    seeds = generate()
    signed = sign_device(_device("SIGNED"), USER, seeds)
    query = _query(seeds, {"SIGNED": signed})
    query["self_signing_keys"][USER]["signatures"] = {}
    assert cross_signed(query, USER) == {}
    # A master key from another identity does not vouch for it either.
    query = _query(seeds, {"SIGNED": signed})
    query["master_keys"] = _query(generate(), {})["master_keys"]
    assert cross_signed(query, USER) == {}


def test_a_device_object_changed_after_signing_is_refused() -> None:
    seeds = generate()
    signed = sign_device(_device("SIGNED"), USER, seeds)
    swapped = {**signed, "keys": {**signed["keys"],
                                  "curve25519:SIGNED": _curve(_device("OTHER"))}}
    assert cross_signed(_query(seeds, {"SIGNED": swapped}), USER) == {}
    # Filed under another device id than the one it names: refused.
    assert cross_signed(_query(seeds, {"ELSEWHERE": signed}), USER) == {}
    # `unsigned` is not covered by signatures: the server may change it freely.
    renamed = {**signed, "unsigned": {"device_display_name": "Otro"}}
    assert cross_signed(_query(seeds, {"SIGNED": renamed}), USER) == {"SIGNED": _curve(signed)}
