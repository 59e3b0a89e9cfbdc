"""Re-seal every stored ciphertext under the current `privacy.data_key` and re-hash the
citizens under the current `privacy.index_key`, so that retired keys can be removed.

After a rotation (the old key moved to `privacy.previous_data_keys` or
`privacy.previous_index_keys`) new writes already use the new key and old rows still
open; `rekey` (run with the bridge stopped) makes the old keys removable.

Each sealed column is declared here with the associated data (AAD) its writer seals it
with: a token only opens with the same AAD. A token that does not open is counted, never
dropped. At the end every text column of every table is swept for tokens still under
another key, whoever wrote them, so a sealed column missing from this list shows up
instead of breaking when the old key is removed. `RekeyReport.complete` says whether it
may be removed.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

from sqlalchemy import RowMapping, Table

from bridge.db import Database
from bridge.db.models import (
    Base,
    CitizenRow,
    GhostRow,
    HeldStaffMessageRow,
    InboundRow,
    KVRow,
    MessageMapRow,
    OutboxRow,
    RoomBacklogRow,
    RoomKeyRow,
    RoomMessageRow,
)
from bridge.db.reports import AAD_REPORT_REASON, ReportRow
from bridge.matrix.keystore import room_key_aad
from bridge.matrix.queued import SOURCE as QUEUED_SOURCE
from bridge.matrix.queued import row_aad
from bridge.matrix.storekey import STORE_KEY
from bridge.matrix.undecryptable import KEY_PREFIX as UNDECRYPTABLE_KEY
from bridge.privacy import (
    AAD_IDENTIFIER,
    AAD_PAYLOAD,
    AAD_STORE_KEY,
    AAD_WA_ID,
    Cipher,
    DecryptError,
    KeyedIndex,
    wamid_aad,
)
from bridge.whatsapp import stored
from bridge.whatsapp.outbound import LEGACY_HELD_KEY, held_aad

# What `civic-bridge rekey` prints, one count per kind.
IDENTIFIERS = "citizen identifiers"
INDEX_HASHES = "citizen index hashes"
LANES = "queue lanes"
INBOUND = "inbound queue"
OUTBOX = "outbox"
DEAD_LETTERS = "dead letters"
HELD = "held staff messages"
PARKED = "parked undecryptable events"
ROOM_KEYS = "room keys"
CROSS_SIGNING = "cross-signing seeds"
REPORTS = "report reasons"
MESSAGE_MAP = "message map wamids"
ROOM_MESSAGE_MAP = "room member wamids"  # bridge.rooms_wa: one wamid per member
ROOM_BACKLOG = "room backlog"  # room messages waiting for a member's window
STORE = "E2EE store key"
OTHER_KV = "other kv values"
KINDS = (IDENTIFIERS, INDEX_HASHES, LANES, INBOUND, OUTBOX, DEAD_LETTERS, HELD, PARKED,
         ROOM_KEYS, CROSS_SIGNING, REPORTS, MESSAGE_MAP, ROOM_MESSAGE_MAP, ROOM_BACKLOG,
         STORE, OTHER_KV)
_FINISHED = ("done", "dropped")  # inbound rows whose lane no longer matters


@dataclass
class RekeyReport:
    """What `rekey_database` did, per kind, and what stands in the way of removing the
    previous keys."""

    resealed: Counter[str] = field(default_factory=Counter)
    rehashed: Counter[str] = field(default_factory=Counter)
    unreadable: Counter[str] = field(default_factory=Counter)  # did not open: kept as is
    conflicts: int = 0  # citizens whose new lookup value another citizen already has
    stale: dict[str, int] = field(default_factory=dict)  # "table.column": tokens left

    @property
    def total(self) -> int:
        return sum(self.resealed.values())

    @property
    def complete(self) -> bool:
        """True when nothing stored needs a previous key any more."""
        return not (self.unreadable or self.conflicts or self.stale)

    def lines(self) -> list[str]:
        out = [f"{kind}: {self.resealed[kind] + self.rehashed[kind]}" for kind in KINDS]
        out += [f"{kind}: {n} did not decrypt (kept)" for kind, n in self.unreadable.items()]
        if self.conflicts:
            out.append(f"{INDEX_HASHES}: {self.conflicts} already taken by another citizen")
        out += [f"{where}: {n} value(s) still under a previous key"
                for where, n in sorted(self.stale.items())]
        return out

    def summary(self) -> str:
        """One line for the audit trail."""
        return (f"resealed {self.total}, rehashed {sum(self.rehashed.values())}, "
                f"unreadable {sum(self.unreadable.values())}, conflicts {self.conflicts}, "
                f"left {sum(self.stale.values())}")


async def rekey_database(db: Database, cipher: Cipher,
                         index: KeyedIndex | None = None) -> RekeyReport:
    """Re-seal everything with `cipher`'s current key; with `index`, also recompute the
    citizens' lookup values and the queue lanes derived from them."""
    run = _Rekey(cipher, index)
    wanted: dict[int, str] = {}
    await db.sealed.rewrite(_table(CitizenRow), lambda row: run.citizen(row, wanted))
    for citizen_id, index_hash in wanted.items():
        if await db.citizens.set_index_hash(citizen_id, index_hash):
            run.report.rehashed[INDEX_HASHES] += 1
        else:
            run.report.conflicts += 1
    await db.sealed.rewrite(_table(GhostRow), run.column(
        "cross_signing_ct", lambda row: CROSS_SIGNING,
        lambda row: str(row["user_id"]).encode()))
    await db.sealed.rewrite(_table(RoomKeyRow), run.column(
        "session_key_ct", lambda row: ROOM_KEYS,
        lambda row: room_key_aad(row["owner"], row["session_id"], row["message_index"])))
    await db.sealed.rewrite(_table(MessageMapRow), run.message_link)
    await db.sealed.rewrite(_table(RoomMessageRow),
                            lambda row: run.message_link(row, ROOM_MESSAGE_MAP))
    await db.sealed.rewrite(_table(RoomBacklogRow), run.column(
        "payload", lambda row: ROOM_BACKLOG, lambda row: AAD_PAYLOAD))
    await db.sealed.rewrite(_table(ReportRow), run.column(
        "reason_ct", lambda row: REPORTS, lambda row: AAD_REPORT_REASON))
    await db.sealed.rewrite(_table(OutboxRow), run.column(
        "payload", lambda row: DEAD_LETTERS if row["status"] == "dead" else OUTBOX,
        lambda row: AAD_PAYLOAD))
    await db.sealed.rewrite(_table(InboundRow), run.inbound)
    await db.sealed.rewrite(_table(HeldStaffMessageRow), run.column(
        "payloads_ct", lambda row: HELD, lambda row: held_aad(str(row["event_id"]))))
    await db.sealed.rewrite(_table(KVRow), run.column("value", _kv_kind, _kv_aad))
    run.report.stale = await db.sealed.count_tokens(
        lambda value: cipher.is_token(value) and cipher.needs_rekey(value))
    return run.report


def _table(model: type[Base]) -> Table:
    return cast(Table, model.__table__)


def _kv_kind(row: RowMapping) -> str:
    key = str(row["key"])
    if key == STORE_KEY:
        return STORE
    if key.startswith(LEGACY_HELD_KEY):
        return HELD  # bridge.whatsapp.outbound
    if key.startswith(UNDECRYPTABLE_KEY):
        return PARKED  # bridge.matrix.undecryptable
    return OTHER_KV


def _kv_aad(row: RowMapping) -> bytes:
    return AAD_STORE_KEY if row["key"] == STORE_KEY else AAD_PAYLOAD


def _inbound_aad(row: RowMapping) -> bytes:
    """WhatsApp rows are sealed by bridge.whatsapp.webhook.prepare_delivery with
    AAD_PAYLOAD; Matrix events are bound to their row (bridge.matrix.queued)."""
    if row["source"] == QUEUED_SOURCE:
        return row_aad(str(row["dedupe_key"]))
    return AAD_PAYLOAD


class _Rekey:
    def __init__(self, cipher: Cipher, index: KeyedIndex | None) -> None:
        self.cipher = cipher
        self.index = index
        self.report = RekeyReport()

    def open(self, kind: str, token: str, aad: bytes) -> bytes | None:
        try:
            return self.cipher.decrypt(token, aad=aad)
        except DecryptError:
            self.report.unreadable[kind] += 1
            return None

    def reseal(self, kind: str, token: Any, aad: bytes) -> str | None:
        """The token under the current key, if it is a token under another one."""
        if not self.cipher.is_token(token) or not self.cipher.needs_rekey(token):
            return None
        plain = self.open(kind, token, aad)
        if plain is None:
            return None
        self.report.resealed[kind] += 1
        return self.cipher.encrypt(plain, aad=aad)

    def column(self, name: str, kind_of: Callable[[RowMapping], str],
               aad_of: Callable[[RowMapping], bytes]
               ) -> Callable[[RowMapping], Mapping[str, Any] | None]:
        def change(row: RowMapping) -> Mapping[str, Any] | None:
            new = self.reseal(kind_of(row), row[name], aad_of(row))
            return None if new is None else {name: new}
        return change

    def citizen(self, row: RowMapping, wanted: dict[int, str]) -> Mapping[str, Any] | None:
        values: dict[str, Any] = {}
        token = row["identifier_ct"]
        if not self.cipher.is_token(token):
            self.report.unreadable[IDENTIFIERS] += 1
            return None
        stale = self.cipher.needs_rekey(token)
        if stale or self.index is not None:
            plain = self.open(IDENTIFIERS, token, AAD_IDENTIFIER)
            if plain is not None and stale:
                values["identifier_ct"] = self.cipher.encrypt(plain, aad=AAD_IDENTIFIER)
                self.report.resealed[IDENTIFIERS] += 1
            if plain is not None and self.index is not None:
                index_hash = self.index.digest(plain.decode("utf-8"))
                if index_hash != row["index_hash"]:
                    wanted[int(row["id"])] = index_hash
        if (wa_id := self.reseal(IDENTIFIERS, row["wa_id_ct"], AAD_WA_ID)):
            values["wa_id_ct"] = wa_id
        return values or None

    def message_link(self, row: RowMapping, kind: str = MESSAGE_MAP
                     ) -> Mapping[str, Any] | None:
        """The map keeps each wamid sealed (bound to its own hash) beside the hash, so
        both follow a rotation: re-sealed under a new data key, re-hashed (and re-sealed
        to the new hash) under a new index key."""
        token, old_hash = row["wamid_ct"], str(row["wamid_hash"])
        if not self.cipher.is_token(token):
            return None
        if self.index is None and not self.cipher.needs_rekey(token):
            return None
        plain = self.open(kind, token, wamid_aad(old_hash))
        if plain is None:
            return None
        new_hash = self.index.wamid(plain.decode("utf-8")) if self.index else old_hash
        if new_hash == old_hash and not self.cipher.needs_rekey(token):
            return None
        if new_hash != old_hash:
            self.report.rehashed[kind] += 1
        else:
            self.report.resealed[kind] += 1
        return {"wamid_hash": new_hash,
                "wamid_ct": self.cipher.encrypt(plain, aad=wamid_aad(new_hash))}

    def inbound(self, row: RowMapping) -> Mapping[str, Any] | None:
        payload = row["payload"]
        if not self.cipher.is_token(payload):
            return None  # stored in clear (Matrix events by older versions)
        kind = DEAD_LETTERS if row["status"] == "dead" else INBOUND
        relane = (self.index is not None and row["source"] == "whatsapp"
                  and row["status"] not in _FINISHED and bool(row["lane"]))
        if not relane and not self.cipher.needs_rekey(payload):
            return None
        aad = _inbound_aad(row)
        plain = self.open(kind, payload, aad)
        if plain is None:
            return None
        values: dict[str, Any] = {}
        if self.cipher.needs_rekey(payload):
            values["payload"] = self.cipher.encrypt(plain, aad=aad)
            self.report.resealed[kind] += 1
        if relane and self.index is not None:
            lane = stored.lane_of_value(json.loads(plain), self.index)
            if lane != row["lane"]:
                values["lane"] = lane
                self.report.rehashed[LANES] += 1
        return values or None
