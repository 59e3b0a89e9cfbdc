"""Targets and the printed table of bench/scale.py (not a benchmark itself)."""

from __future__ import annotations

from typing import Any

TARGET_START_S = 3.0  # at the largest N (10,000)
TARGET_IDLE_RSS_MB = 250.0  # at the largest N
TARGET_IDLE_REQ_PER_S = 0.1  # at any N
TARGET_RSS_GROWTH = 0.20  # idle RSS, smallest to largest N
TARGET_CPU_SPREAD = 0.10  # CPU per message, between the two N


def verdicts(figs: list[Any]) -> list[dict[str, Any]]:
    small, large = min(figs, key=lambda f: f.n), max(figs, key=lambda f: f.n)
    out: list[dict[str, Any]] = []

    def add(target: str, value: float, limit: float, ok: bool, at: str) -> None:
        out.append({"target": target, "at": at, "value": round(value, 3), "limit": limit,
                    "verdict": "PASS" if ok else "MISS"})

    add("start_s", large.start_s, TARGET_START_S, large.start_s <= TARGET_START_S,
        f"N={large.n}")
    add("restart_s", large.restart_s, TARGET_START_S, large.restart_s <= TARGET_START_S,
        f"N={large.n}")
    add("crash_restart_s", large.crash_restart_s, TARGET_START_S,
        large.crash_restart_s <= TARGET_START_S, f"N={large.n}")
    add("idle_rss_mb", large.idle_rss_mb, TARGET_IDLE_RSS_MB,
        large.idle_rss_mb <= TARGET_IDLE_RSS_MB, f"N={large.n}")
    worst = max(figs, key=lambda f: f.idle_req_per_s)
    add("idle_req_per_s", worst.idle_req_per_s, TARGET_IDLE_REQ_PER_S,
        worst.idle_req_per_s <= TARGET_IDLE_REQ_PER_S, "any N (worst)")
    if small is not large:
        at = f"N={small.n} -> {large.n}"
        growth = large.idle_rss_mb / small.idle_rss_mb - 1
        add("idle_rss_growth", growth, TARGET_RSS_GROWTH, growth <= TARGET_RSS_GROWTH, at)
        for key in ("cpu_bridge_ms", "cpu_synapse_ms"):
            a, b = getattr(small, key), getattr(large, key)
            spread = abs(b - a) / a
            add(f"{key}_spread", spread, TARGET_CPU_SPREAD, spread <= TARGET_CPU_SPREAD, at)
    return out


def print_table(report: dict[str, Any]) -> None:
    figs = report["figures"]
    if report.get("pad"):
        print(f"\nPADDED: {report['pad']} more citizens (ghost and portal rows) in the "
              f"bridge's database only, none on Synapse")
    print(f"\nscale: bridge = `python -m bridge run` on PostgreSQL, Synapse on PostgreSQL; "
          f"{report['messages']} messages at {report['rate']:g}/s; idle window "
          f"{report['idle']:g} s; the first start after a node failure "
          f"{report.get('failed_ago', 0):g} s before")
    rows = [
        ("first start, after a node failure (s)", "start_s", "{:.2f}"),
        ("  CPU until ready (s)", "start_cpu_s", "{:.2f}"),
        ("restart after a clean stop (s)", "restart_s", "{:.2f}"),
        ("  CPU until ready (s)", "restart_cpu_s", "{:.2f}"),
        ("restart after a SIGKILL (s)", "crash_restart_s", "{:.2f}"),
        ("  CPU until ready (s)", "crash_restart_cpu_s", "{:.2f}"),
        ("idle RSS (MB)", "idle_rss_mb", "{:.1f}"),
        ("idle open fds", "idle_fds", "{:d}"),
        ("idle requests to Synapse", "idle_requests", "{:d}"),
        ("  of which as bridge users", "idle_requests_as_bridge", "{:d}"),
        ("idle requests/s to Synapse", "idle_req_per_s", "{:.3f}"),
        ("idle CPU (ms/s)", "idle_cpu_ms_per_s", "{:.1f}"),
        ("messages to Synapse (s)", "messages_seconds", "{:.1f}"),
        ("RSS after messages (MB)", "after_rss_mb", "{:.1f}"),
        ("open fds after messages", "after_fds", "{:d}"),
        ("CPU/msg bridge (ms)", "cpu_bridge_ms", "{:.1f}"),
        ("CPU/msg Synapse (ms)", "cpu_synapse_ms", "{:.1f}"),
        ("load avg before", "load_before", "{}"),
        ("load avg after", "load_after", "{}"),
    ]
    heads = [f"N={f['n']}" + (f"+{f['pad']}db" if f.get("pad") else "") for f in figs]
    print(f"{'':28}" + "".join(f"{h:>18}" for h in heads))
    for label, key, fmt in rows:
        print(f"{label:28}" + "".join(f"{fmt.format(f[key]):>18}" for f in figs))
    print("\nEXPLAIN (ANALYZE, BUFFERS) of the hot look-ups on PostgreSQL:")
    for f in figs:
        for e in f["explain"]:
            print(f"  N={f['n']:<6} {e['name']:30} {e['rows_in_table']:>6} rows  "
                  f"{'index' if e['index'] else 'NO INDEX':8} {e['node'][:70]:70} "
                  f"{e['ms']:.3f} ms")
            if not e["index"]:
                available = e.get("index_available")
                print(f"  {'':38} {'':10} with seq scans off: "
                      f"{available or 'NO USABLE INDEX'}")
    print("\ntargets:")
    for v in report["verdicts"]:
        print(f"  {v['target']:22} {v['at']:20} {v['value']:>10} (limit {v['limit']}) "
              f"{v['verdict']}")
    for f in figs:
        for sample in f["idle_request_samples"]:
            print(f"  idle request at N={f['n']}: {sample}")
