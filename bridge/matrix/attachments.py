"""Matrix encrypted attachments (client-server spec, "Sending encrypted attachments"),
encrypted in place so a downloaded file exists once in memory, never twice.

AES-256-CTR with a random key and a 16-byte IV whose low 64 bits (the counter) start
at zero, as the spec and matrix-nio do; `hashes.sha256` is over the ciphertext.
"""

from __future__ import annotations

import base64
import hashlib
import os
from typing import Any, Final

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

CHUNK: Final = 64 * 1024


def _b64(data: bytes, *, urlsafe: bool = False) -> str:
    encoded = base64.urlsafe_b64encode(data) if urlsafe else base64.b64encode(data)
    return encoded.decode().rstrip("=")


def encrypt_in_place(buffer: bytearray) -> dict[str, Any]:
    """Encrypt `buffer` in place; returns the `file` info (without `url`) for the event.

    Works chunk by chunk, so besides the buffer only one chunk is ever copied.
    """
    key, iv = os.urandom(32), os.urandom(8) + b"\x00" * 8
    encryptor = Cipher(algorithms.AES(key), modes.CTR(iv)).encryptor()
    digest = hashlib.sha256()
    view = memoryview(buffer)
    for start in range(0, len(buffer), CHUNK):
        block = encryptor.update(view[start:start + CHUNK])
        view[start:start + len(block)] = block
        digest.update(block)
    view.release()
    encryptor.finalize()
    return {
        "v": "v2",
        "key": {"kty": "oct", "alg": "A256CTR", "ext": True, "k": _b64(key, urlsafe=True),
                "key_ops": ["encrypt", "decrypt"]},
        "iv": _b64(iv),
        "hashes": {"sha256": _b64(digest.digest())},
    }
