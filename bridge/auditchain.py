"""The audit chain's maths, pure (no database): entry MACs, the chain check, anchors.

Each entry is chained to the one before it (`prev_hash`) and authenticated:
- `hmac-sha256` (current): HMAC-SHA256 with `audit.key` over the canonical JSON of the
  entry's id, fields, key id and `prev_hash`. Without the key nobody can produce a valid
  entry, so an insider who can write the table cannot rewrite it unnoticed.
- `sha256` (legacy, before `audit.key` existed): plain SHA-256 of the fields and
  `prev_hash`. Anyone can recompute those, so they count only as a prefix that a keyed
  entry seals: the first keyed entry links to the last legacy one, and its MAC covers
  that link. A legacy entry after a keyed one, or a chain that ends unsealed, is bad.

Key rotation: every keyed entry names its key (`key_id`); the previous keys still
verify. A key once rotated out may not come back further down the chain, and the
newest run must use the current key (the bridge appends a keyed entry at start-up,
see `AuditRepo.seal`), so an old or leaked key cannot be used to append.

What a holder of the current key can still do (rewrite everything and re-MAC it) is
caught by anchors: the head (`id`, `hash`) exported once a day to somewhere the
insider cannot write; a rewrite at or before an anchored entry changes its hash.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import date, datetime

from canonicaljson import encode_canonical_json

GENESIS = "0" * 64
LEGACY = "sha256"
KEYED = "hmac-sha256"
ANCHOR_MARK = "civic_bridge_audit_anchor"


def key_id(key: bytes) -> str:
    """The public name of an audit key: the first 8 hex chars of a SHA-256 over it
    (domain-separated, so it never equals the id of the same bytes used as a data key)."""
    return hashlib.sha256(b"civic-bridge audit key\0" + key).hexdigest()[:8]


@dataclass(frozen=True, slots=True)
class AuditKeys:
    """The current audit key and the retired ones, by key id."""

    current_id: str
    keys: dict[str, bytes]

    @classmethod
    def from_base64(cls, current: str, previous: Iterable[str] = ()) -> AuditKeys:
        raw = base64.b64decode(current)
        keys = {key_id(base64.b64decode(k)): base64.b64decode(k) for k in previous}
        keys[key_id(raw)] = raw
        return cls(key_id(raw), keys)

    @property
    def current(self) -> bytes:
        return self.keys[self.current_id]


@dataclass(frozen=True, slots=True)
class ChainRow:
    """What the check reads of one stored entry."""

    id: int
    at: datetime
    actor: str
    action: str
    object: str
    result: str
    reason: str | None
    scheme: str
    key_id: str | None
    prev_hash: str
    hash: str


def legacy_hash(*, at: datetime, actor: str, action: str, object: str, result: str,
                reason: str | None, prev_hash: str) -> str:
    """The unkeyed hash of an entry written before `audit.key` (the id is left out)."""
    doc = {"at": at.isoformat(), "actor": actor, "action": action, "object": object,
           "result": result, "reason": reason, "prev_hash": prev_hash}
    return hashlib.sha256(encode_canonical_json(doc)).hexdigest()


def entry_mac(key: bytes, *, kid: str, id: int, at: datetime, actor: str, action: str,
              object: str, result: str, reason: str | None, prev_hash: str) -> str:
    """The keyed hash of an entry. The id is covered: an entry is bound to its place."""
    doc = {"v": KEYED, "key_id": kid, "id": id, "at": at.isoformat(), "actor": actor,
           "action": action, "object": object, "result": result, "reason": reason,
           "prev_hash": prev_hash}
    return hmac.new(key, encode_canonical_json(doc), hashlib.sha256).hexdigest()


def _legacy_of(row: ChainRow) -> str:
    return legacy_hash(at=row.at, actor=row.actor, action=row.action, object=row.object,
                       result=row.result, reason=row.reason, prev_hash=row.prev_hash)


def _mac_of(key: bytes, kid: str, row: ChainRow) -> str:
    return entry_mac(key, kid=kid, id=row.id, at=row.at, actor=row.actor,
                     action=row.action, object=row.object, result=row.result,
                     reason=row.reason, prev_hash=row.prev_hash)


@dataclass
class ChainCheck:
    """Feed the entries in id order; `first_bad` is the id of the first bad one."""

    keys: AuditKeys
    first_bad: int | None = None
    _prev: str = GENESIS
    _keyed_seen: bool = False
    _run_key: str | None = None  # key id of the newest run of entries (None: legacy)
    _run_start: int | None = None  # id of that run's first entry
    _retired: set[str] = field(default_factory=set)

    def feed(self, row: ChainRow) -> bool:
        """Check one entry; False (and `first_bad` set) at the first bad one."""
        if self.first_bad is None and not self._valid(row):
            self.first_bad = row.id
        return self.first_bad is None

    def _valid(self, row: ChainRow) -> bool:
        if row.prev_hash != self._prev:
            return False
        if row.scheme == LEGACY:
            # Only before the first keyed entry: later, it would be a downgrade.
            if self._keyed_seen or row.hash != _legacy_of(row):
                return False
        elif row.scheme == KEYED and row.key_id is not None:
            key = self.keys.keys.get(row.key_id)
            if key is None or row.key_id in self._retired:
                return False
            if not hmac.compare_digest(row.hash, _mac_of(key, row.key_id, row)):
                return False
            self._keyed_seen = True
        else:
            return False
        kid = row.key_id if row.scheme == KEYED else None
        if self._run_start is None or kid != self._run_key:
            if self._run_key is not None:
                self._retired.add(self._run_key)
            self._run_key, self._run_start = kid, row.id
        self._prev = row.hash
        return True

    def finish(self) -> tuple[bool, int | None]:
        """(intact, id of the first bad entry). The newest run must use the current
        key: else anyone (legacy) or a retired key's holder could have written it."""
        if self.first_bad is None and self._run_start is not None \
                and self._run_key != self.keys.current_id:
            self.first_bad = self._run_start
        return self.first_bad is None, self.first_bad


@dataclass(frozen=True, slots=True)
class Anchor:
    """An exported head: on `date`, entry `id` had `hash`."""

    date: str
    id: int
    hash: str

    def line(self) -> str:
        """One JSON line, to append to an external log."""
        return json.dumps({ANCHOR_MARK: 1, "date": self.date, "id": self.id,
                           "hash": self.hash}, sort_keys=True, separators=(",", ":"))


def anchor_for(day: date, entry_id: int, entry_hash: str) -> Anchor:
    return Anchor(day.isoformat(), entry_id, entry_hash)


def parse_anchors(text: str) -> list[Anchor]:
    """The anchors in a file of exported lines. A line may carry a prefix (a syslog
    header): the JSON object from its first `{` on is read. Other lines are skipped;
    a line that is marked as an anchor but malformed raises ValueError."""
    anchors = []
    for number, line in enumerate(text.splitlines(), 1):
        start = line.find("{")
        if start < 0 or ANCHOR_MARK not in line:
            continue
        try:
            doc = json.loads(line[start:])
            anchor = Anchor(str(doc["date"]), int(doc["id"]), str(doc["hash"]))
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"line {number}: not a valid anchor") from None
        if len(anchor.hash) != 64 or anchor.id < 1:
            raise ValueError(f"line {number}: not a valid anchor")
        anchors.append(anchor)
    return anchors
