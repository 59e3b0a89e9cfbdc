"""The one-off keyed pass over wamids stored in clear before revision 0010, on SQLite and
PostgreSQL: what it rewrites, what it leaves, and that it runs once."""

from __future__ import annotations

import os
from datetime import UTC, datetime

from bridge.db import Citizen, Database
from bridge.legacy_wamids import DONE_KEY, key_legacy_wamids
from bridge.privacy import Cipher, KeyedIndex, Privacy, is_keyed_hash
from bridge.rekey import rekey_database
from bridge.types import EventID, Pseudonym, RoomID, WamidHash
from bridge.whatsapp.consent import message_evidence
from bridge.whatsapp.outbox import reply_key
from bridge.whatsapp.webhook_parse import dedupe_key

ROOM = RoomID("!portal:agency.example")
W_IN, W_OUT, W_NOTICE = "wamid.HBgLIN==", "wamid.HBgLOUT==", "wamid.HBgLNOTICE=="


def _privacy() -> Privacy:
    return Privacy(cipher=Cipher(os.urandom(32)), index=KeyedIndex(os.urandom(32)))


async def _citizen(db: Database) -> Citizen:
    return await db.citizens.create(index_hash="a" * 64, identifier_ct="ct", wa_id_ct=None,
                                    pseudonym_code="C001")


async def test_clear_wamids_become_keyed_once(db: Database) -> None:
    p = _privacy()
    citizen = await _citizen(db)
    # What the code before revision 0010 stored (the repositories store what they get).
    await db.messages.link((WamidHash(W_IN), ""), ROOM, EventID("$in"), "in")
    await db.messages.link((WamidHash(W_OUT), ""), ROOM, EventID("$out"), "out")
    out = await db.outbox.add("$out", citizen.id, ROOM, "p")
    assert out is not None
    await db.outbox.mark_sent(out, WamidHash(W_OUT))
    await db.outbox.add(f"optin:{W_IN}", citizen.id, RoomID(""), "p")
    await db.outbox.add("availability:7", citizen.id, RoomID(""), "p")
    notice, _ = await db.notices.add(reference="R1", citizen_id=citizen.id,
                                     pseudonym=Pseudonym("C001"), template_name="t",
                                     template_language="es", template_version="1",
                                     requested_by="api:admin")
    await db.notices.mark_accepted(notice.id, WamidHash(W_NOTICE))
    for key in (f"msg:{W_IN}", f"status:{W_OUT}:read", "msg:sha256:" + "b" * 64):
        await db.inbound.enqueue("whatsapp", key, "payload")
    await db.inbound.enqueue("matrix", "$event:agency.example", "payload")
    for channel, evidence in (("whatsapp", W_IN), ("admin", "erasure"),
                              ("in_person", "REG-2026/E-1")):
        await db.consent.append(citizen_id=citizen.id, pseudonym=Pseudonym("C001"),
                                purpose="notices", state="granted", notice_version="1",
                                notice_hash="c" * 64, channel=channel, evidence=evidence)

    counts = await key_legacy_wamids(db, p, now=lambda: datetime(2026, 12, 2, tzinfo=UTC))
    assert counts == {"message_map": 2, "outbox_wamid": 1, "notices_wamid": 1,
                      "inbound_key": 2, "outbox_key": 1, "consent_evidence": 1}
    index = p.index
    link = await db.messages.by_wamid(index.wamid(W_IN))
    assert link is not None and link.event_id == "$in"
    assert p.open_wamid(link.wamid_hash, link.wamid_ct) == W_IN  # sealed for Graph
    assert (await db.messages.by_event(EventID("$out"))).wamid_hash == index.wamid(W_OUT)  # type: ignore[union-attr]
    assert (await db.outbox.get(out)).wamid_hash == index.wamid(W_OUT)  # type: ignore[union-attr]
    assert await db.outbox.by_key(reply_key("optin", index.wamid(W_IN))) is not None
    assert await db.outbox.by_key("availability:7") is not None
    assert (await db.notices.get(notice.id)).wamid_hash == index.wamid(W_NOTICE)  # type: ignore[union-attr]
    keys = {i.dedupe_key for i in await db.inbound.pending()}
    assert keys == {dedupe_key(index, W_IN), dedupe_key(index, W_OUT, "read"),
                    "msg:sha256:" + "b" * 64, "$event:agency.example"}
    evidence = [r.evidence for r in await db.consent.for_citizen(citizen.id)]
    assert evidence == [message_evidence(index.wamid(W_IN)), "erasure", "REG-2026/E-1"]
    # Done, and recorded so: the next start does not look again, nor rewrites twice.
    assert await db.kv.get(DONE_KEY) == "2026-12-02T00:00:00+00:00"
    assert await key_legacy_wamids(db, p) == {}
    await db.kv.delete(DONE_KEY)
    assert not any((await key_legacy_wamids(db, p)).values())


async def test_a_clear_row_whose_keyed_twin_exists_goes(db: Database) -> None:
    """A message stored again since (under its keyed key) makes the clear row a
    duplicate: it is deleted rather than left in clear."""
    p = _privacy()
    await db.inbound.enqueue("whatsapp", f"msg:{W_IN}", "old")
    await db.inbound.enqueue("whatsapp", dedupe_key(p.index, W_IN), "new")
    await db.messages.link((WamidHash(W_IN), ""), ROOM, EventID("$old"), "in")
    await db.messages.link(p.seal_wamid(W_IN), ROOM, EventID("$new"), "in")
    assert await key_legacy_wamids(db, p) == {
        "message_map": 1, "outbox_wamid": 0, "notices_wamid": 0, "inbound_key": 1,
        "outbox_key": 0, "consent_evidence": 0}
    assert [i.payload for i in await db.inbound.pending()] == ["new"]
    assert await db.messages.by_event(EventID("$old")) is None
    link = await db.messages.by_event(EventID("$new"))
    assert link is not None and is_keyed_hash(link.wamid_hash)


async def test_rekey_reseals_the_message_map(db: Database) -> None:
    """`civic-bridge rekey` covers the wamid ciphertexts too, keeping their binding to
    the row's hash (a token moved to another row still fails)."""
    old_key, new_key = os.urandom(32), os.urandom(32)
    index = KeyedIndex(os.urandom(32))
    old = Privacy(cipher=Cipher(old_key), index=index)
    await db.messages.link(old.seal_wamid(W_IN), ROOM, EventID("$in"), "in")
    # A row from before revision 0010 not yet keyed has no ciphertext: left alone.
    await db.messages.link((WamidHash(W_OUT), ""), ROOM, EventID("$legacy"), "in")
    rotated = Privacy(cipher=Cipher(new_key, [old_key]), index=index)
    assert (await rekey_database(db, rotated.cipher)).total == 1
    assert (await rekey_database(db, rotated.cipher)).total == 0
    link = await db.messages.by_wamid(index.wamid(W_IN))
    assert link is not None and not rotated.cipher.needs_rekey(link.wamid_ct)
    assert Privacy(cipher=Cipher(new_key), index=index).open_wamid(
        link.wamid_hash, link.wamid_ct) == W_IN


async def test_rekey_rehashes_the_message_map_under_a_new_index_key(db: Database) -> None:
    """The map holds each wamid sealed, so a rotated `privacy.index_key` re-hashes it:
    replies and reactions to messages from before the rotation still find their event."""
    cipher = Cipher(os.urandom(32))
    old_index, new_index = KeyedIndex(os.urandom(32)), KeyedIndex(os.urandom(32))
    await db.messages.link(Privacy(cipher=cipher, index=old_index).seal_wamid(W_IN), ROOM,
                           EventID("$in"), "in")
    report = await rekey_database(db, cipher, new_index)
    assert report.rehashed["message map wamids"] == 1
    assert await db.messages.by_wamid(old_index.wamid(W_IN)) is None
    link = await db.messages.by_wamid(new_index.wamid(W_IN))
    assert link is not None and link.event_id == "$in"
    assert Privacy(cipher=cipher, index=new_index).open_wamid(
        link.wamid_hash, link.wamid_ct) == W_IN
    assert (await rekey_database(db, cipher, new_index)).rehashed["message map wamids"] == 0
