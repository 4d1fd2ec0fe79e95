"""Ray Serve autoscaling on SortedServe's own signals (pure Python; Ray calls it in its controller).

Each engine replica reports, through ``record_autoscaling_stats``, its waiting requests, its
running rows and batch slots, and its running totals of budgets met and missed. Every control
period :class:`SortedServePolicy` decides the replica count:

- **up** by ``ceil(waiting / slots)`` (at least one) when requests wait for a batch slot across
  the deployment (the batch is full: more replicas, not a deeper queue);
- **up** by one when the share of budgets met since the last decision falls below
  ``met_target`` over at least ``min_budgeted`` budgeted requests (the router cannot find a replica
  where budgets fit any more);
- **down** by one when nothing waits, the budget share is healthy (or there were no budgeted
  requests) and the running rows would fit in one replica fewer at ``low_watermark`` of its slots;
- otherwise unchanged. Always within ``capacity_adjusted_min_replicas..max_replicas``.

Ray applies its own ``upscale_delay_s`` / ``downscale_delay_s`` on top.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

WAITING = "sortedserve_waiting"
RUNNING = "sortedserve_running"
SLOTS = "sortedserve_slots"
MET = "sortedserve_budget_met_total"
MISSED = "sortedserve_budget_missed_total"


@dataclass(frozen=True)
class Signals:
    """The deployment's picture for one decision."""

    replicas: int
    waiting: float
    running: float
    slots_per_replica: float
    met: float  # budgets met since the last decision
    missed: float


def signals(ctx: Any) -> Signals:
    """Sum the per-replica metrics of an ``AutoscalingContext``."""
    metrics: Mapping[str, Mapping[Any, float]] = ctx.aggregated_metrics or {}

    def total(name: str) -> float:
        return float(sum(metrics.get(name, {}).values()))

    slots = metrics.get(SLOTS, {})
    per_replica = max(slots.values()) if slots else 0.0
    state = ctx.policy_state or {}
    met, missed = total(MET), total(MISSED)
    return Signals(
        replicas=int(ctx.current_num_replicas),
        waiting=total(WAITING),
        running=total(RUNNING),
        slots_per_replica=float(per_replica),
        met=max(met - float(state.get("met", 0.0)), 0.0),
        missed=max(missed - float(state.get("missed", 0.0)), 0.0),
    )


def decide(
    s: Signals,
    lowest: int,
    highest: int,
    met_target: float = 0.9,
    min_budgeted: int = 10,
    low_watermark: float = 0.5,
) -> tuple[int, str]:
    """The replica count for ``s`` and why."""
    n = max(s.replicas, 1)
    budgeted = s.met + s.missed
    share = s.met / budgeted if budgeted else None
    if s.waiting >= 1:
        slots = s.slots_per_replica or 1.0
        want, why = n + max(1, math.ceil(s.waiting / slots)), "requests waiting for a slot"
    elif share is not None and budgeted >= min_budgeted and share < met_target:
        want, why = n + 1, f"budgets met {share:.0%} < {met_target:.0%}"
    elif (
        n > 1
        and (share is None or share >= met_target)
        and s.running <= (n - 1) * s.slots_per_replica * low_watermark
    ):
        want, why = n - 1, "room to spare"
    else:
        want, why = n, "steady"
    return min(max(want, lowest), highest), why


class SortedServePolicy:
    """Ray Serve's ``AutoscalingPolicy.policy_function`` (kwargs: ``policy_kwargs``)."""

    def __init__(
        self, met_target: float = 0.9, min_budgeted: int = 10, low_watermark: float = 0.5
    ) -> None:
        self.met_target = met_target
        self.min_budgeted = min_budgeted
        self.low_watermark = low_watermark

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        s = signals(ctx)
        want, why = decide(
            s,
            int(ctx.capacity_adjusted_min_replicas),
            int(ctx.capacity_adjusted_max_replicas),
            self.met_target,
            self.min_budgeted,
            self.low_watermark,
        )
        metrics = ctx.aggregated_metrics or {}
        state = {
            "met": float(sum(metrics.get(MET, {}).values())),
            "missed": float(sum(metrics.get(MISSED, {}).values())),
            "last_reason": why,
        }
        return want, state


def replica_stats(state: Any) -> dict[str, float]:
    """What one replica reports (``record_autoscaling_stats``) from its ``AppState``."""
    if state.engine is None:
        return {}
    stats = state.engine.stats()
    met = missed = 0.0
    for metric in state.metrics.budget_requests.collect():
        for sample in metric.samples:
            if sample.name.endswith("_total"):
                if sample.labels.get("outcome") == "met":
                    met += sample.value
                elif sample.labels.get("outcome") == "missed":
                    missed += sample.value
    return {
        WAITING: float(stats.waiting),
        RUNNING: float(stats.running),
        SLOTS: float(stats.max_slots),
        MET: met,
        MISSED: missed,
    }
