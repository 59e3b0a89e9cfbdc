"""`civic-bridge admin audit anchor` and `audit verify --anchor FILE`.

`anchor` prints the chain's head as one JSON line (bridge.auditchain.Anchor) for an
external log; `verify --anchor FILE` checks, besides the chain itself, that every
entry anchored in FILE still has the hash it had when exported: a rewrite at or before
an anchored entry, even by someone holding audit.key, or removed newest entries, show.
Both only read through the admin API (GET /admin/v1/audit, /admin/v1/audit/verify).
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bridge.admin.cli import EXIT_OK, EXIT_TAMPERED, EXIT_USAGE, call
from bridge.auditchain import Anchor, anchor_for, parse_anchors


def read_anchors(path: str) -> list[Anchor] | None:
    """The anchors in `path`, or None after printing why there are none to check."""
    try:
        anchors = parse_anchors(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        print(f"cannot read {path}: {exc.strerror}", file=sys.stderr)
        return None
    except (ValueError, UnicodeDecodeError) as exc:
        print(f"{path}: {exc}", file=sys.stderr)
        return None
    if not anchors:
        print(f"{path}: no audit anchors in it (lines printed by `civic-bridge admin audit "
              "anchor` or sent by audit.anchor_command)", file=sys.stderr)
        return None
    return anchors


async def verify_against(url: str, token: str, anchors: list[Anchor]) -> dict[str, Any]:
    """The chain check, plus the first anchor that no longer matches (if any)."""
    chain = dict(await call(url, token, "GET", "/admin/v1/audit/verify"))
    matched: Anchor | None = None
    for anchor in sorted(anchors, key=lambda a: a.id):
        page = await call(url, token, "GET", f"/admin/v1/audit?limit=1&before={anchor.id + 1}")
        entries = page["entries"]
        found = entries[0] if entries and entries[0]["id"] == anchor.id else None
        if found is None or found["hash"] != anchor.hash:
            chain["anchors"] = {"checked": len(anchors), "match": False,
                                "failed": {"date": anchor.date, "id": anchor.id,
                                           "missing": found is None},
                                "last_matching": None if matched is None else matched.id}
            return chain
        matched = anchor
    assert matched is not None
    chain["anchors"] = {"checked": len(anchors), "match": True, "failed": None,
                        "newest": {"date": matched.date, "id": matched.id}}
    return chain


def exit_code(data: dict[str, Any]) -> int:
    """EXIT_TAMPERED when the chain or an anchor fails."""
    chain = data.get("chain", data)
    intact = chain["intact"] and data.get("anchors", {}).get("match", True)
    return EXIT_OK if intact else EXIT_TAMPERED


def render_verify(data: dict[str, Any]) -> tuple[str, str, int]:
    """stdout, stderr and exit code of `audit verify --anchor`."""
    out, err = [], []
    if data["intact"]:
        out.append("audit chain intact")
    else:
        err.append(f"AUDIT CHAIN BROKEN: entry {data['first_bad_id']} was altered or the "
                   "entry before it removed")
    anchors = data["anchors"]
    if anchors["match"]:
        newest = anchors["newest"]
        out.append(f"{anchors['checked']} anchor(s) match (newest: entry {newest['id']} of "
                   f"{newest['date']})")
    else:
        failed, after = anchors["failed"], anchors["last_matching"]
        what = "is gone" if failed["missing"] else "no longer has its anchored hash"
        since = f"after entry {after}" if after else "from the start"
        err.append(f"AUDIT TRAIL REWRITTEN: entry {failed['id']} anchored on {failed['date']} "
                   f"{what}: entries {since} up to it were rewritten or removed")
    return "\n".join(out), "\n".join(err), exit_code(data)


def render_anchor(data: dict[str, Any]) -> tuple[str, str, int]:
    """stdout, stderr and exit code of `audit anchor` (from GET /admin/v1/audit?limit=1)."""
    chain = data["chain"]
    if not chain["intact"]:
        return "", (f"AUDIT CHAIN BROKEN at entry {chain['first_bad_id']}: not printing an "
                    "anchor for a tampered trail"), EXIT_TAMPERED
    if not data["entries"]:
        return "", "the audit log is empty: nothing to anchor", EXIT_USAGE
    head = data["entries"][0]
    return anchor_for(datetime.now(UTC).date(), head["id"], head["hash"]).line(), "", EXIT_OK
