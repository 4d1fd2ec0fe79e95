"""The budget benchmark's numbers: one summary per (rate, arm) run, the verdict, the table.

Kept apart from the runner so that the arithmetic (what counts as met, missed or invalid, and the
prediction error) reads on its own and needs no server.
"""

from __future__ import annotations

import statistics
from collections import Counter
from typing import Any

from app.bench.budget_load import Outcome


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(int(q * len(ordered)), len(ordered) - 1)], 2)


def summarize(outcomes: list[Outcome], budget_ms: float, exits: list[int]) -> dict[str, Any]:
    """One run's figures: met share, exit mix, latency percentiles and prediction error."""
    # a request the server refused as invalid (e.g. a prompt past the context) is not a budget
    # miss of either arm: it is reported and left out; 429s and failures count as misses
    invalid = [o for o in outcomes if 400 <= o.status < 500 and o.status != 429]
    outcomes = [o for o in outcomes if o not in invalid]
    done = [o for o in outcomes if o.status == 200]
    elapsed = [o.body["budget"]["elapsed_ms"] for o in done]
    met = sum(1 for e in elapsed if e <= budget_ms)
    ratios = [o.body["budget"]["elapsed_ms"] / o.body["budget"]["predicted_ms"] for o in done]
    full_length = [
        o.body["budget"]["elapsed_ms"] / o.body["budget"]["predicted_ms"]
        for o in done
        if o.body["finish_reason"] == "length"
    ]
    final = Counter(o.body["exit_layer"] for o in done)
    initial = Counter(o.body["budget"]["initial_exit_layer"] for o in done)
    n = len(outcomes)
    return {
        "requests": n,
        "completed": len(done),
        "refused_429": sum(1 for o in outcomes if o.status == 429),
        "invalid_4xx": len(invalid),
        "failed": sum(1 for o in outcomes if o.status not in (200, 429)),
        "met_share": round(met / n, 4) if n else None,
        "exit_mix": {str(k): round(final[k] / len(done), 3) for k in exits} if done else {},
        "initial_exit_mix": {str(k): round(initial[k] / len(done), 3) for k in exits}
        if done
        else {},
        "mean_exit": round(statistics.fmean(o.body["exit_layer"] for o in done), 2)
        if done
        else None,
        "downgraded_share": round(
            sum(1 for o in done if o.body["budget"]["downgrades"]) / len(done), 3
        )
        if done
        else None,
        "latency_ms": {"p50": _pct(elapsed, 0.5), "p99": _pct(elapsed, 0.99)},
        "client_latency_ms": {
            "p50": _pct([o.client_ms for o in done], 0.5),
            "p99": _pct([o.client_ms for o in done], 0.99),
        },
        "prediction_error": {
            "median_abs_all": round(statistics.median(abs(r - 1) for r in ratios), 4)
            if ratios
            else None,
            "median_abs_length": round(statistics.median(abs(r - 1) for r in full_length), 4)
            if full_length
            else None,
            "length_finished": len(full_length),
            "median_ratio": round(statistics.median(ratios), 4) if ratios else None,
        },
        "completion_tokens": sum(o.body["usage"]["completion_tokens"] for o in done),
    }


def verdict(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Is there a rate where full depth meets < 50% of budgets and SortedServe ≥ 95%?"""
    by_rate: dict[float, dict[str, dict[str, Any]]] = {}
    for run in runs:
        by_rate.setdefault(run["rate"], {})[run["arm"]] = run
    hard = [
        {
            "rate": rate,
            "full_depth_met": arms["full-depth"]["met_share"],
            "sortedserve_met": arms["sortedserve"]["met_share"],
        }
        for rate, arms in sorted(by_rate.items())
        if (arms["full-depth"]["met_share"] or 0) < 0.5
    ]
    errors = [
        r["prediction_error"]["median_abs_length"]
        for r in runs
        if r["arm"] == "sortedserve" and r["prediction_error"]["median_abs_length"] is not None
    ]
    wins = [h["rate"] for h in hard if (h["sortedserve_met"] or 0) >= 0.95]
    return {
        "rates_where_full_depth_meets_under_half": hard,
        "rates_where_sortedserve_meets_95_there": wins,
        "target_met": bool(wins),
        "median_prediction_error_sortedserve": round(statistics.median(errors), 4)
        if errors
        else None,
    }


def report(result: dict[str, Any]) -> str:
    """The printed table: one line per (rate, arm), then the verdict in a sentence."""
    from app.bench.common import table

    exits = result["exits"]
    headers = ["rate/s", "arm", "met %", "p50 ms", "p99 ms"]
    headers += [f"exit {k} %" for k in exits] + ["pred err", "429"]
    rows = []
    for r in result["runs"]:
        err = r["prediction_error"]["median_abs_length"]
        rows.append(
            [r["rate"], r["arm"], 100 * (r["met_share"] or 0), r["latency_ms"]["p50"] or 0.0,
             r["latency_ms"]["p99"] or 0.0]
            + [100 * r["exit_mix"].get(str(k), 0) for k in exits]
            + [float("nan") if err is None else err, r["refused_429"]]
        )  # fmt: skip
    v = result["verdict"]
    hard = [h["rate"] for h in v["rates_where_full_depth_meets_under_half"]]
    summary = (
        f"budget {result['budget_ms']} ms, {result['max_new_tokens']} new tokens; "
        f"full depth meets < 50% at rates {hard}; SortedServe meets ≥ 95% at "
        f"{v['rates_where_sortedserve_meets_95_there']}; median |actual/predicted − 1| "
        f"{v['median_prediction_error_sortedserve']}"
    )
    return table(headers, rows) + "\n" + summary
