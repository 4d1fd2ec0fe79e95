"""The budget benchmark over repeats: per rate and arm, the met share of every repeat and their
spread, the pooled exit mix and the held-out quality it implies; issue 11's verdict; the tables.

Pure arithmetic on the per-run summaries of :func:`app.bench.budget_summary.summarize` (each
with ``repeat``, ``rate_label``, ``rate`` and ``arm`` added), so it is tested without a server.
"""

from __future__ import annotations

import statistics
from typing import Any

from app.bench.budget_workload import implied_quality

ARMS = ("sortedserve", "full-depth")
TARGET_RATE = "2x"  # issue 11: at 2x the full-depth capacity ...
TARGET_MET = 0.99  # ... SortedServe meets at least 99% of budgets in every repeat
FULL_DEPTH_BELOW = 0.5  # ... and full depth fewer than 50%


def _pooled_mix(runs: list[dict[str, Any]]) -> dict[str, float]:
    """Exit mix over all completed requests of ``runs`` (each run weighted by its completions)."""
    total = sum(r["completed"] for r in runs)
    if not total:
        return {}
    keys = sorted({k for r in runs for k in r["exit_mix"]}, key=int)
    return {
        k: round(sum(r["exit_mix"].get(k, 0) * r["completed"] for r in runs) / total, 3)
        for k in keys
    }


def _spread(values: list[float | None]) -> dict[str, float | None]:
    known = [v for v in values if v is not None]
    return {
        "min": min(known) if known else None,
        "max": max(known) if known else None,
        "mean": round(statistics.fmean(known), 4) if known else None,
    }


def aggregate(runs: list[dict[str, Any]], by_exit: dict[str, float]) -> list[dict[str, Any]]:
    """One row per (rate, arm), rates in the order first run, repeats in order."""
    order: list[str] = []
    for r in runs:
        if r["rate_label"] not in order:
            order.append(r["rate_label"])
    rows = []
    for label in order:
        for arm in ARMS:
            mine = sorted(
                (r for r in runs if r["rate_label"] == label and r["arm"] == arm),
                key=lambda r: r["repeat"],
            )
            if not mine:
                continue
            classes = sorted({c for r in mine for c in r.get("by_budget_class", {})})
            mix = _pooled_mix(mine)
            rows.append(
                {
                    "rate_label": label,
                    "rates": [r["rate"] for r in mine],
                    "arm": arm,
                    "repeats": len(mine),
                    "requests": [r["requests"] for r in mine],
                    "met_shares": [r["met_share"] for r in mine],
                    "met_spread": _spread([r["met_share"] for r in mine]),
                    "server_met_shares": [r.get("server_met_share") for r in mine],
                    "by_budget_class": {
                        c: [r["by_budget_class"].get(c, {}).get("met_share") for r in mine]
                        for c in classes
                    },
                    "client_p99_ms": [r["client_latency_ms"]["p99"] for r in mine],
                    "refused_429": sum(r["refused_429"] for r in mine),
                    "failed": sum(r["failed"] for r in mine),
                    "exit_mix": mix,
                    "implied_quality": implied_quality(mix, by_exit),
                }
            )
    return rows


def verdict(rows: list[dict[str, Any]], by_exit: dict[str, float]) -> dict[str, Any]:
    """Issue 11's target at ``TARGET_RATE``: SortedServe ≥ 99% in every repeat, full depth < 50%
    (in every repeat); and the older per-rate criterion (full depth < 50%, SortedServe ≥ 95%)."""
    at = {r["arm"]: r for r in rows if r["rate_label"] == TARGET_RATE}
    ss, fd = at.get("sortedserve"), at.get("full-depth")
    ss_ok = fd_ok = None
    if ss and fd:
        ss_ok = all(m is not None and m >= TARGET_MET for m in ss["met_shares"])
        fd_ok = all(m is not None and m < FULL_DEPTH_BELOW for m in fd["met_shares"])
    per_rate = []
    for label in dict.fromkeys(r["rate_label"] for r in rows):
        arms = {r["arm"]: r for r in rows if r["rate_label"] == label}
        if set(arms) != set(ARMS):
            continue
        per_rate.append(
            {
                "rate": label,
                "sortedserve_min": arms["sortedserve"]["met_spread"]["min"],
                "full_depth_max": arms["full-depth"]["met_spread"]["max"],
                "sortedserve_99_every_repeat": (arms["sortedserve"]["met_spread"]["min"] or 0)
                >= TARGET_MET,
                "full_depth_under_half_every_repeat": (arms["full-depth"]["met_spread"]["max"] or 1)
                < FULL_DEPTH_BELOW,
            }
        )
    deepest = max(by_exit, key=int) if by_exit else None
    return {
        "target_rate": TARGET_RATE,
        "sortedserve_met_99_every_repeat": ss_ok,
        "full_depth_under_half_every_repeat": fd_ok,
        "target_met": bool(ss_ok and fd_ok) if ss_ok is not None else None,
        "per_rate": per_rate,
        "full_depth_quality": by_exit.get(deepest) if deepest else None,
    }


def _pcts(values: list[float | None]) -> str:
    return " / ".join("-" if v is None else f"{100 * v:.1f}" for v in values)


def report(result: dict[str, Any]) -> str:
    """The printed tables: per (rate, arm) over repeats, then per run, then the verdict."""
    from app.bench.common import table

    rows = []
    for r in result["by_rate"]:
        s = r["met_spread"]
        spread = "-" if s["min"] is None else f"{100 * s['min']:.1f}-{100 * s['max']:.1f}"
        mix = " ".join(f"{k}:{round(100 * v)}" for k, v in r["exit_mix"].items() if v)
        classes = "; ".join(f"{c} {_pcts(v)}" for c, v in r["by_budget_class"].items())
        q = r["implied_quality"]
        rows.append(
            [r["rate_label"], f"{statistics.fmean(r['rates']):.2f}", r["arm"],
             _pcts(r["met_shares"]), spread, _pcts(r["server_met_shares"]), classes, mix,
             "-" if q is None else f"{q:.3f}"]
        )  # fmt: skip
    headers = ["rate", "req/s", "arm", "met % (client) per repeat", "spread", "server met %"]
    headers += ["met % per budget class", "exit mix %", "implied loss"]
    v = result["verdict"]
    cap = result["capacity"]
    lines = [
        table(headers, rows),
        "",
        f"x = full-depth capacity {cap['requests_per_s']:.2f} req/s (closed loop of "
        f"{cap['clients']} clients, {cap['seconds']} s); 1000/idle full-depth latency would be "
        f"{result['idle_rate_per_s']:.2f}/s; {result['max_new_tokens']} new tokens; budgets "
        f"{result['budget_factors']} x idle full-depth latency {result['idle_latency_ms']}",
        f"at {v['target_rate']}: SortedServe >= 99% in every repeat: "
        f"{v['sortedserve_met_99_every_repeat']}; full depth < 50% in every repeat: "
        f"{v['full_depth_under_half_every_repeat']} -> target "
        f"{'met' if v['target_met'] else 'NOT met'}; full-depth quality {v['full_depth_quality']}",
    ]
    return "\n".join(lines)
