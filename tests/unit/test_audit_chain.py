"""The audit chain's maths (bridge.auditchain) and its config (`audit.*`), no database."""

from __future__ import annotations

import base64
import os
import secrets
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from bridge.auditchain import (
    GENESIS,
    KEYED,
    LEGACY,
    Anchor,
    AuditKeys,
    ChainCheck,
    ChainRow,
    entry_mac,
    key_id,
    legacy_hash,
    parse_anchors,
)
from bridge.config import ENV_PREFIX, parse_config
from bridge.errors import ConfigError


def _key(size: int = 32) -> str:
    return base64.b64encode(secrets.token_bytes(size)).decode()


@pytest.fixture(autouse=True)
def _no_secret_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)


def _raw(**audit: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "homeserver": {"url": "https://matrix.agency.example", "domain": "agency.example"},
        "appservice": {"as_token": secrets.token_urlsafe(32),
                       "hs_token": secrets.token_urlsafe(32)},
        "privacy": {"data_key": _key(), "index_key": _key()},
        "admin": {"token": secrets.token_urlsafe(32)},
    }
    if audit:
        raw["audit"] = audit
    return raw


def _problems(raw: dict[str, Any], base: Path = Path(".")) -> list[str]:
    with pytest.raises(ConfigError) as err:
        parse_config(raw, base)
    return err.value.problems


# --- config ------------------------------------------------------------------------


def test_a_config_without_audit_key_is_refused_naming_the_fix() -> None:
    lines = _problems(_raw())
    assert len(lines) == 1
    line = lines[0]
    assert line.startswith("audit.key: missing; set it or audit.key_file or "
                           "$CIVIC_BRIDGE_AUDIT_KEY")
    assert "openssl rand -base64 32" in line and "stay verifiable" in line


def test_audit_key_from_file_or_environment(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    key = _key()
    (tmp_path / "audit.key").write_text(key + "\n", encoding="utf-8")
    config = parse_config(_raw(key_file="audit.key"), tmp_path)
    assert config.audit.key == key
    other = _key()
    monkeypatch.setenv("CIVIC_BRIDGE_AUDIT_KEY", other)
    assert parse_config(_raw(key_file="audit.key"), tmp_path).audit.key == other


@pytest.mark.parametrize(("audit", "expected"), [
    ({"key": _key(16)}, "audit.key: must decode to 32 bytes, got 16"),
    ({"key": "CHANGE_ME_base64_32_bytes_audit"}, "audit.key: still the placeholder"),
    ({"key": _key(), "previous_keys": ["bm90IGEga2V5"]},
     "audit.previous_keys: must decode to 32 bytes"),
    ({"key": _key(), "anchor_command": "logger -t x"}, "audit.anchor_command: "),
])
def test_bad_audit_values_name_the_key(audit: dict[str, Any], expected: str) -> None:
    assert any(line.startswith(expected) for line in _problems(_raw(**audit))), expected


def test_audit_key_must_differ_from_the_privacy_keys_and_from_retired_ones() -> None:
    raw = _raw(key=_key())
    raw["audit"]["key"] = raw["privacy"]["index_key"]
    assert any(line.startswith("audit.key: must be a different key")
               for line in _problems(raw))
    key = _key()
    assert _problems(_raw(key=key, previous_keys=[key])) == [
        "audit.previous_keys: contains audit.key itself; list only retired keys"]


def test_init_writes_a_fresh_audit_key() -> None:
    from bridge.cli import init_config

    first, second = init_config("a.example", "http://hs"), init_config("a.example", "http://hs")
    config = parse_config(first)
    assert len(base64.b64decode(config.audit.key)) == 32
    assert first["audit"] != second["audit"]  # type: ignore[index]


# --- the chain ---------------------------------------------------------------------

T0 = datetime(2026, 12, 1, 10, 0, tzinfo=UTC)


def _keys(*previous: bytes, current: bytes | None = None) -> AuditKeys:
    cur = current or secrets.token_bytes(32)
    return AuditKeys.from_base64(base64.b64encode(cur).decode(),
                                 [base64.b64encode(k).decode() for k in previous])


class Builder:
    """Writes a chain the way `AuditRepo.append` does (or as a legacy bridge did)."""

    def __init__(self) -> None:
        self.rows: list[ChainRow] = []

    def add(self, key: bytes | None, **change: Any) -> ChainRow:
        n = len(self.rows) + 1
        prev = self.rows[-1].hash if self.rows else GENESIS
        fields: dict[str, Any] = {"at": T0 + timedelta(seconds=n), "actor": "admin",
                                  "action": "room.kick", "object": f"!r @u{n}",
                                  "result": "ok", "reason": "spam", "prev_hash": prev}
        fields.update(change)
        if key is None:
            row = ChainRow(id=n, scheme=LEGACY, key_id=None,
                           hash=legacy_hash(**fields), **fields)
        else:
            kid = key_id(key)
            row = ChainRow(id=n, scheme=KEYED, key_id=kid,
                           hash=entry_mac(key, kid=kid, id=n, **fields), **fields)
        self.rows.append(row)
        return row


def check(keys: AuditKeys, rows: list[ChainRow]) -> tuple[bool, int | None]:
    c = ChainCheck(keys)
    for row in rows:
        if not c.feed(row):
            break
    return c.finish()


def test_legacy_prefix_sealed_by_a_keyed_entry_verifies() -> None:
    keys = _keys()
    b = Builder()
    for _ in range(3):
        b.add(None)
    assert check(keys, b.rows) == (False, 1)  # unsealed: anyone could have written it
    b.add(keys.current)
    b.add(keys.current)
    assert check(keys, b.rows) == (True, None)
    assert check(keys, []) == (True, None)


def test_a_legacy_entry_after_a_keyed_one_is_a_downgrade() -> None:
    keys = _keys()
    b = Builder()
    b.add(keys.current)
    b.add(None)
    b.add(keys.current)
    assert check(keys, b.rows) == (False, 2)


def test_an_attacker_without_the_key_cannot_recompute_the_chain() -> None:
    keys = _keys()
    b = Builder()
    for _ in range(4):
        b.add(keys.current)
    # Rewrite entry 2 and re-chain everything after it, with a key of their own…
    forged = Builder()
    forged.rows = b.rows[:1]
    mine = secrets.token_bytes(32)
    forged.add(mine, reason="nada que ver")
    forged.add(mine)
    forged.add(mine)
    assert check(keys, forged.rows) == (False, 2)
    # …claiming the real key id…
    claimed = [ChainRow(**{**_as_dict(r), "key_id": keys.current_id}) for r in forged.rows]
    assert check(keys, claimed) == (False, 2)
    # …or as plain SHA-256 throughout (a full downgrade: nothing is keyed any more).
    plain = Builder()
    for _ in range(4):
        plain.add(None)
    assert check(keys, plain.rows) == (False, 1)


def _as_dict(row: ChainRow) -> dict[str, Any]:
    return {f: getattr(row, f) for f in ChainRow.__slots__}


def test_rotation_previous_keys_verify_a_retired_key_cannot_come_back() -> None:
    old, new = secrets.token_bytes(32), secrets.token_bytes(32)
    b = Builder()
    b.add(old)
    b.add(old)
    b.add(new)
    assert check(_keys(old, current=new), b.rows) == (True, None)
    assert check(_keys(current=new), b.rows) == (False, 1)  # the old key was dropped
    # Whoever kept the old key appends with it after the rotation.
    b.add(old)
    assert check(_keys(old, current=new), b.rows) == (False, 4)
    # The newest run must use the current key: a rotation not yet sealed is flagged.
    c = Builder()
    c.add(old)
    c.add(old)
    assert check(_keys(old, current=new), c.rows) == (False, 1)


def test_anchor_lines_round_trip_with_a_syslog_prefix() -> None:
    anchor = Anchor("2026-12-01", 42, "ab" * 32)
    text = (f"Dec  1 23:59:01 host civic-bridge-audit: {anchor.line()}\n"
            "unrelated line\n" + Anchor(date(2026, 12, 2).isoformat(), 50, "cd" * 32).line())
    assert parse_anchors(text) == [anchor, Anchor("2026-12-02", 50, "cd" * 32)]
    with pytest.raises(ValueError, match="line 1"):
        parse_anchors('{"civic_bridge_audit_anchor": 1, "id": "x"}')


def test_the_chain_maths_import_no_database_or_network_code() -> None:
    import subprocess
    import sys

    code = ("import sys, bridge.auditchain; "
            "print(sorted(m for m in ('sqlalchemy', 'aiohttp', 'nio') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60)
    assert out.stdout.strip() == "[]"
