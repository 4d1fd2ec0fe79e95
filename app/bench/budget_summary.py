"""The budget benchmark's numbers: one summary per (repeat, rate, arm) run.

Kept apart from the runner so that the arithmetic (what counts as met, missed or invalid, and the
prediction error) reads on its own and needs no server. The figures over repeats, the verdict
and the printed tables are in :mod:`app.bench.budget_repeats`.
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Sequence
from typing import Any

from app.bench.budget_load import Outcome


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(int(q * len(ordered)), len(ordered) - 1)], 2)


def _group(items: list[tuple[Outcome, float]]) -> dict[str, Any]:
    """Met shares of a group of (outcome, budget): on the client's clock and on the server's."""
    n = len(items)
    met = sum(1 for o, b in items if o.status == 200 and o.client_ms <= b)
    server = sum(1 for o, b in items if o.status == 200 and o.body["budget"]["elapsed_ms"] <= b)
    return {
        "requests": n,
        "met_share": round(met / n, 4) if n else None,
        "server_met_share": round(server / n, 4) if n else None,
        "median_budget_ms": round(statistics.median(b for _, b in items), 1) if n else None,
    }


def summarize(
    outcomes: list[Outcome],
    budget_ms: float | Sequence[float],
    exits: list[int],
    budget_classes: Sequence[str] | None = None,
    prompt_classes: Sequence[str] | None = None,
) -> dict[str, Any]:
    """One run's figures: met share, exit mix, latency percentiles and prediction error.

    ``budget_ms`` is one budget for all or one per request. A request meets its budget when the
    **client** got the whole answer within it (``met_share``); ``server_met_share`` judges the
    same by the server's own ``elapsed_ms``. With ``budget_classes`` / ``prompt_classes`` (one
    label per request) the met shares are given per class too.
    """
    budgets = (
        [float(budget_ms)] * len(outcomes)
        if isinstance(budget_ms, int | float)
        else list(budget_ms)
    )
    labels_b = list(budget_classes or ["all"] * len(outcomes))
    labels_p = list(prompt_classes or ["all"] * len(outcomes))
    # a request the server refused as invalid (e.g. a prompt past the context) is not a budget
    # miss of either arm: it is reported and left out; 429s and failures count as misses
    keep = [i for i, o in enumerate(outcomes) if not (400 <= o.status < 500 and o.status != 429)]
    invalid = len(outcomes) - len(keep)
    outcomes_all = outcomes
    items = [(outcomes[i], budgets[i]) for i in keep]
    outcomes = [outcomes[i] for i in keep]
    done = [o for o in outcomes if o.status == 200]
    elapsed = [o.body["budget"]["elapsed_ms"] for o in done]
    ratios = [o.body["budget"]["elapsed_ms"] / o.body["budget"]["predicted_ms"] for o in done]
    full_length = [
        o.body["budget"]["elapsed_ms"] / o.body["budget"]["predicted_ms"]
        for o in done
        if o.body["finish_reason"] == "length"
    ]
    final = Counter(o.body["exit_layer"] for o in done)
    initial = Counter(o.body["budget"]["initial_exit_layer"] for o in done)
    n = len(outcomes)
    overall = _group(items)

    def by(labels: list[str]) -> dict[str, Any]:
        groups: dict[str, list[tuple[Outcome, float]]] = {}
        for i, item in zip(keep, items, strict=True):
            groups.setdefault(labels[i], []).append(item)
        return {k: _group(v) for k, v in sorted(groups.items())}

    tokens: dict[str, list[int]] = {}
    for i in keep:
        if outcomes_all[i].status == 200:
            tokens.setdefault(labels_p[i], []).append(
                outcomes_all[i].body["usage"]["prompt_tokens"]
            )
    prompt_tokens = {k: round(statistics.fmean(v), 1) for k, v in sorted(tokens.items())}
    return {
        "requests": n,
        "completed": len(done),
        "refused_429": sum(1 for o in outcomes if o.status == 429),
        "invalid_4xx": invalid,
        "failed": sum(1 for o in outcomes if o.status not in (200, 429)),
        "met_share": overall["met_share"],
        "server_met_share": overall["server_met_share"],
        "by_budget_class": by(labels_b),
        "by_prompt_class": by(labels_p),
        "mean_prompt_tokens": prompt_tokens,
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
