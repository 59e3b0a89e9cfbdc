"""Matrix transaction ids of what a WhatsApp message becomes (issue 17): derived from the
wamid so that a retry finds the event the homeserver stored, but keyed, so that the ids
Synapse keeps cannot be reversed by hashing every wamid (a wamid embeds a number)."""

from __future__ import annotations

import hashlib
import re

from bridge.privacy import KeyedIndex
from bridge.whatsapp.mirror import txn_id

KEY_A = bytes(range(32))
KEY_B = bytes(range(100, 132))
WAMID = "wamid.HBgLMzQ2MDAxMTIyMzMVAgASGBQzQUI3QzE5RjA5NjBBQkQ5NkU4RQA="


def test_txn_id_is_not_a_plain_hash_of_the_wamid() -> None:
    index = KeyedIndex(KEY_A)
    plain = hashlib.sha256(WAMID.encode()).hexdigest()
    got = txn_id(index, WAMID)
    assert got != "wa" + plain[:40]
    assert got.removeprefix("wa") not in plain
    for suffix in (":caption", ":notice", ":vcf"):
        assert txn_id(index, WAMID, suffix) != \
            "wa" + hashlib.sha256((WAMID + suffix).encode()).hexdigest()[:40]


def test_txn_id_is_stable_keyed_and_distinct_per_suffix() -> None:
    index = KeyedIndex(KEY_A)
    assert txn_id(index, WAMID) == txn_id(KeyedIndex(KEY_A), WAMID)  # a retry: same id
    assert txn_id(index, WAMID) != txn_id(KeyedIndex(KEY_B), WAMID)
    assert txn_id(index, WAMID) != txn_id(index, WAMID, ":caption")
    assert re.fullmatch(r"wa[0-9a-f]{40}", txn_id(index, WAMID))
    # Not the message map's lookup value either (another key, another use).
    assert txn_id(index, WAMID).removeprefix("wa") not in index.wamid(WAMID)
