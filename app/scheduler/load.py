"""The load picture: how long a newcomer would wait, and whom it would share a batch with.

Slots are simulated from what the scheduler tracks: running requests free theirs after their
remaining steps, waiting requests take free slots in arrival order (their prefills run before the
newcomer's). Both the arrival decision and ``Retry-After`` read it, and the per-step re-check
counts the prefills due before the next step as a stall of the batch.

Pure Python; not thread-safe on its own (the depth scheduler holds the lock).
"""

from __future__ import annotations

import heapq

from app.scheduler.online import StepLatencyModel
from app.scheduler.plans import Plan, SchedulerConfig
from app.scheduler.tracked import Tracked


def decode_steps(config: SchedulerConfig, max_new_tokens: int) -> int:
    """Decode steps a request needs (the prefill forward may already yield the first token)."""
    return max(max_new_tokens - (1 if config.prefill_emits_token else 0), 0)


def pending_prefill_ms(tracked: Tracked, latency: StepLatencyModel, max_slots: int) -> float:
    """Prefills due before the next step: waiting requests that will get a free slot."""
    free = max(max_slots - tracked.running_count, 0)
    waiting = tracked.waiting()[:free]
    return sum(latency.prefill_ms(p.exit_layer, p.prompt_tokens) for p in waiting)


def load_picture(
    tracked: Tracked, latency: StepLatencyModel, config: SchedulerConfig
) -> tuple[float, list[Plan]]:
    """Expected wait (ms) before a newcomer's prefill, and the requests it will share a batch
    with."""
    running, waiting = tracked.running(), tracked.waiting()
    slots = config.max_slots
    co_plans = (running + waiting)[: max(slots - 1, 0)]
    pace = latency.token_ms([p.exit_layer for p in co_plans])
    free_at = [(p.max_new_tokens - tracked.generated(p)) * pace for p in running][:slots]
    free_at += [0.0] * (slots - len(free_at))
    heapq.heapify(free_at)
    prefills = 0.0
    for p in waiting:
        start = heapq.heappop(free_at)
        prefill = latency.prefill_ms(p.exit_layer, p.prompt_tokens)
        prefills += prefill
        heapq.heappush(free_at, start + prefill + decode_steps(config, p.max_new_tokens) * pace)
    # a newcomer also waits for the step in progress to end (half of one, on average)
    in_progress = pace / 2 if running else 0.0
    return free_at[0] + prefills + in_progress, co_plans
