"""The per-step re-check: lower the exits of a batch that is too slow for someone's budget.

The batch sets the pace. Every row of a decode step waits for the step's deepest layer, so all
running requests get their tokens at one rate, ``pace = token_ms(exits in the batch)`` (see
online.py). A budgeted request with ``remaining`` tokens still to make needs
``pace ≤ (budget_ms − elapsed) / remaining``.

When the pace is too slow for some running request, the deepest budgeted rows are lowered one exit
at a time until the pace fits every request that can still be saved (with headroom); a request
that cannot make it even with the whole batch at the shallowest exit goes there and no longer holds
the others back. Exits only ever go down; requests without a budget (or with ``exit_layer``) are
never moved. Lowering one exit at a time, deepest first, keeps as much depth (quality) as the
budgets allow.

Pure Python; not thread-safe on its own (the depth scheduler holds the lock).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from app.scheduler.online import StepLatencyModel
from app.scheduler.plans import Plan
from app.scheduler.tracked import Tracked


def lower_exits(
    tracked: Tracked,
    latency: StepLatencyModel,
    exits: Sequence[int],
    now: float,
    stall_ms: float,
    headroom: float,
    recheck: float,
) -> tuple[dict[str, int], int]:
    """``({request_id: lower exit}, requests newly abandoned)`` for the batch as the last step
    report showed it; ``stall_ms`` is the prefill time due before the next step. The lowered exits
    and the abandoned flags are written to the plans too (they are the scheduler's records)."""
    running = tracked.running()
    generated = {p.request_id: tracked.generated(p) for p in running}
    budgeted = [p for p in running if p.lowerable and p.max_new_tokens > generated[p.request_id]]
    if not budgeted:
        return {}, 0
    row_exits = {p.request_id: p.exit_layer for p in running}
    shallowest = exits[0]
    pace = latency.token_ms(list(row_exits.values()))

    def allowed(p: Plan, fraction: float, stall: float = 0.0) -> float:
        return p.allowed_pace(now, generated[p.request_id], fraction, stall)

    if pace <= min(allowed(p, recheck, stall_ms) for p in budgeted):
        return {}, 0  # everyone is on track
    # The fastest this batch can go, in the best case: every budgeted row at the shallowest
    # exit, and no newcomer's prefill in the way. Slower than that is late whatever happens.
    floor = latency.token_ms(
        [shallowest if p.lowerable else p.exit_layer for p in running], stalls=False
    )
    savable = [p for p in budgeted if allowed(p, 1.0) >= floor]
    abandoned = 0
    for p in budgeted:
        if p not in savable:  # as fast as possible, and out of the others' way
            row_exits[p.request_id] = shallowest
            if not p.abandoned:
                p.abandoned = True
                abandoned += 1
    target = min((allowed(p, headroom, stall_ms) for p in savable), default=math.inf)
    lowerable = [p for p in budgeted if p in savable]
    while lowerable and latency.token_ms(list(row_exits.values())) > target:
        top = max(row_exits[p.request_id] for p in lowerable)
        if top == shallowest:
            break
        below = max(k for k in exits if k < top)
        for p in lowerable:
            if row_exits[p.request_id] == top:
                row_exits[p.request_id] = below
    changes = {}
    for p in budgeted:
        if row_exits[p.request_id] < p.exit_layer:
            changes[p.request_id] = p.exit_layer = row_exits[p.request_id]
    return changes, abandoned
