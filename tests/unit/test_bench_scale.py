"""bench/scale.py's judgements: what it counts as a request from the bridge, what it calls
index use, and how figures become PASS/MISS. The bench itself is run by hand (bench/README.md);
these are the parts that decide what it prints."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture(scope="module")
def scale():  # type: ignore[no-untyped-def]
    sys.path.insert(0, str(BENCH))
    try:
        import _scale_explain
        import scale as module
        yield module, _scale_explain
    finally:
        sys.path.remove(str(BENCH))


def access_line(requester: str, path: str) -> str:
    return (f"2026-12-02 08:00:00,000 synapse.access.http.8008 INFO - 127.0.0.1 - 8008 - "
            f"{{{requester}}} Processed request: 0.002sec/0.000sec ru=(0.001sec, 0.000sec) "
            f"db=(0.000sec/0.001sec/2) 2B 200 \"GET {path} HTTP/1.1\" \"python/aiohttp\" "
            f"[0 dbevts]\n")


def test_only_requests_authenticated_as_a_bridge_user_count(scale, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    module, _ = scale
    log = tmp_path / "access.log"
    before = access_line("@cb_bot:localhost", "/_matrix/client/v3/sync")
    log.write_text(before + access_line("None", "/_matrix/client/versions")
                   + access_line("@staff:localhost", "/_matrix/client/v3/sync")
                   + access_line("@cb_abcdefgh:localhost", "/_matrix/client/v3/keys/query")
                   + access_line("@civicbridge:localhost", "/_matrix/client/v3/account/whoami")
                   + access_line("@civicbridgex:localhost", "/_matrix/client/v3/sync"))
    ours, total, samples = module.bridge_requests(log, len(before.encode()),
                                                  ("@civicbridge:", "@cb_"))
    assert (ours, total) == (2, 5)  # the line before the mark is not counted
    assert [s.split('"')[1] for s in samples] == [
        "GET /_matrix/client/versions HTTP/1.1", "GET /_matrix/client/v3/sync HTTP/1.1",
        "GET /_matrix/client/v3/keys/query HTTP/1.1",
        "GET /_matrix/client/v3/account/whoami HTTP/1.1",
        "GET /_matrix/client/v3/sync HTTP/1.1"]
    assert samples[0].startswith("{None}")


def test_a_plan_uses_an_index_only_if_a_scan_node_is_an_index_scan(scale) -> None:  # type: ignore[no-untyped-def]
    _, explain = scale
    seq = ["Seq Scan on outbox  (cost=0.00..1.01 rows=1 width=8) (actual time=0.01..0.01)",
           "  Filter: ((status)::text = 'pending'::text)", "Planning Time: 0.1 ms",
           "Execution Time: 0.031 ms"]
    idx = ["Limit  (cost=0.29..8.30 rows=1 width=8)",
           "  ->  Index Scan using uq_citizens_index_hash on citizens  (cost=0.29..8.30 rows=1)",
           "        Index Cond: (index_hash = $1)", "Execution Time: 0.052 ms"]
    assert explain._summary(seq) == {"index": False, "node": "Seq Scan on outbox", "ms": 0.031}
    assert explain._summary(idx) == {
        "index": True, "node": "Index Scan using uq_citizens_index_hash on citizens",
        "ms": 0.052}


def test_targets_compare_the_largest_n_and_the_growth_between_the_two(scale) -> None:  # type: ignore[no-untyped-def]
    module, _ = scale
    small = module.Figures(1000, start_s=2.0, restart_s=3.4, crash_restart_s=3.3,
                           idle_rss_mb=150.0,
                           idle_req_per_s=0.0, cpu_bridge_ms=40.0, cpu_synapse_ms=60.0)
    large = module.Figures(10000, start_s=3.5, restart_s=1.5, crash_restart_s=3.1,
                           idle_rss_mb=185.0,
                           idle_req_per_s=0.2, cpu_bridge_ms=43.0, cpu_synapse_ms=70.0)
    got = {v["target"]: v["verdict"] for v in module.verdicts([small, large])}
    assert got == {"start_s": "MISS",  # 3.5 s > 3 s at N = 10,000
                   "restart_s": "PASS",  # after a clean stop: 1.5 s at N = 10,000
                   "crash_restart_s": "MISS",  # after a SIGKILL: 3.1 s at N = 10,000
                   "idle_rss_mb": "PASS",  # 185 <= 250 MB
                   "idle_req_per_s": "MISS",  # the worst N counts: 0.2/s > 0.1/s
                   "idle_rss_growth": "MISS",  # 185 / 150 = +23% > 20%
                   "cpu_bridge_ms_spread": "PASS",  # +7.5%
                   "cpu_synapse_ms_spread": "MISS"}  # +16.7%
