"""In-place attachment encryption is what Matrix clients (here nio) decrypt."""

from __future__ import annotations

import os

import pytest
from nio.crypto.attachments import decrypt_attachment

from bridge.matrix.attachments import CHUNK, encrypt_in_place


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, 3 * CHUNK + 17])
def test_in_place_encryption_decrypts_with_nio(size: int) -> None:
    plain = os.urandom(size)
    buffer = bytearray(plain)
    info = encrypt_in_place(buffer)
    # A 1-byte ciphertext equals its plaintext once in 256 runs: compare from 16 bytes.
    assert len(buffer) == size and (size < 16 or bytes(buffer) != plain)
    assert decrypt_attachment(bytes(buffer), info["key"]["k"], info["hashes"]["sha256"],
                              info["iv"]) == plain
    assert info["v"] == "v2" and info["key"]["alg"] == "A256CTR"


def test_each_file_gets_its_own_key() -> None:
    a, b = bytearray(b"same"), bytearray(b"same")
    assert encrypt_in_place(a)["key"]["k"] != encrypt_in_place(b)["key"]["k"] and a != b
