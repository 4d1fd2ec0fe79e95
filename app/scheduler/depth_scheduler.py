"""The depth scheduler: which trained exit a request runs at, so that it finishes within its budget.

Pure Python, no torch, no engine import: the API layer calls :meth:`DepthScheduler.admit` when a
request arrives and :meth:`DepthScheduler.finish` when it ends; the engine thread calls
:meth:`DepthScheduler.on_step` after every decode step (through the engine's ``step_hook``), with a
report shaped like ``app.engine.types.StepReport``.

The batch sets the pace. Every row of a decode step waits for the step's deepest layer, so all
running requests get their tokens at one rate, ``pace = token_ms(exits in the batch)`` (see
online.py). A budgeted request with ``remaining`` tokens still to make needs
``pace ≤ (budget_ms − elapsed) / remaining``.

- **At arrival**, the prediction for exit *k* is ``expected queue wait + prefill(k) + decode steps
  × pace(batch with the newcomer at k)``. The deepest *k* wins whose prediction fits
  ``budget_ms × headroom`` and whose pace does not make a running budgeted request late. If none
  fits as the batch is, the same search runs again assuming the budgeted rows deeper than *k* are
  lowered to *k* (the next step's re-check does that). If still none fits: the shallowest exit,
  flagged ``feasible=False``.
- **After every step**, when the pace is too slow for some running request, the deepest budgeted
  rows are lowered one exit at a time until the pace fits every request that can still be saved
  (with headroom); a request that cannot make it even with the whole batch at the shallowest exit
  goes there and no longer holds the others back. Exits only ever go down; requests without a
  budget (or with ``exit_layer``) are never moved.
- **After every request**, the safety margin learns from the outcome: a feasible request that
  missed its budget shrinks the margin applied to ``headroom`` and ``recheck`` (the machine is
  noisier than the model knows); every met one grows it back a little, so that in steady state
  about ``miss_target`` of feasible requests miss.
"""

from __future__ import annotations

import heapq
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from app.scheduler.online import StepLatencyModel, StepReportLike
from app.scheduler.plans import Decision, Plan, SchedulerConfig, SchedulingError
from app.scheduler.profile import LatencyProfile
from app.scheduler.tracked import Tracked

logger = logging.getLogger(__name__)


class DepthScheduler:
    """Chooses and lowers exits; thread-safe (event loop and engine thread both call it)."""

    def __init__(
        self,
        profile: LatencyProfile,
        config: SchedulerConfig | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.profile = profile
        self.config = config or SchedulerConfig()
        self.exits = profile.exits
        self._clock = clock
        self._lock = threading.Lock()
        self._tracked = Tracked()
        self.latency = StepLatencyModel(
            profile,
            alpha=self.config.alpha,
            cell_samples=self.config.cell_samples,
            stall_alpha=self.config.stall_alpha,
        )
        self.steps_seen = 0
        self.lowered = 0  # exits lowered by the per-step re-check
        self.abandoned = 0  # requests judged unable to meet their budget while running
        self.margin = 1.0  # learnt safety margin on headroom and recheck (≤ 1)
        self._log_bias = 0.0  # EWMA of log(actual / model prediction) of whole requests

    # -- arrival -----------------------------------------------------------------------------
    def decide(
        self,
        prompt_tokens: int,
        max_new_tokens: int,
        budget_ms: float | None = None,
        exit_layer: int | None = None,
    ) -> Decision:
        """The decision for a request arriving now, without registering it."""
        with self._lock:
            return self._decide(prompt_tokens, max_new_tokens, budget_ms, exit_layer)

    def admit(
        self,
        request_id: str,
        prompt_tokens: int,
        max_new_tokens: int,
        budget_ms: float | None = None,
        exit_layer: int | None = None,
        arrival: float | None = None,
    ) -> Decision:
        """Decide and remember the request until :meth:`finish`."""
        with self._lock:
            if request_id in self._tracked:
                raise SchedulingError(f"request {request_id!r} is already scheduled")
            decision = self._decide(prompt_tokens, max_new_tokens, budget_ms, exit_layer)
            plan = Plan(
                request_id=request_id,
                arrival=self._clock() if arrival is None else arrival,
                prompt_tokens=prompt_tokens,
                max_new_tokens=max_new_tokens,
                budget_ms=budget_ms,
                exit_layer=decision.exit_layer,
                lowerable=budget_ms is not None,
                feasible=decision.feasible,
                raw_predicted_ms=decision.predicted_ms / self.bias,
            )
            self._tracked.add(plan)
            return decision

    def _decide(
        self,
        prompt_tokens: int,
        max_new_tokens: int,
        budget_ms: float | None,
        exit_layer: int | None,
    ) -> Decision:
        if exit_layer is not None and exit_layer not in self.exits:
            trained = list(self.exits)
            raise SchedulingError(f"exit_layer {exit_layer} is not a trained exit {trained}")
        if budget_ms is not None and not budget_ms > 0:
            raise SchedulingError("budget_ms must be > 0")
        wait_ms, co_plans = self._load_picture()
        batch = len(co_plans) + 1
        steps = self._decode_steps(max_new_tokens)

        def predict(k: int, capped: bool) -> tuple[float, float]:
            exits = [
                min(p.exit_layer, k) if capped and p.lowerable else p.exit_layer for p in co_plans
            ]
            pace = self.latency.token_ms([*exits, k])
            raw = wait_ms + self.latency.prefill_ms(k, prompt_tokens) + steps * pace
            return raw * self.bias, pace

        if exit_layer is not None or budget_ms is None:
            k = exit_layer if exit_layer is not None else self.exits[-1]
            reason = "exit_layer" if exit_layer is not None else "no_budget"
            return Decision(k, predict(k, False)[0], budget_ms, True, wait_ms, batch, reason)
        target = budget_ms * self._headroom
        for capped in (False, True):
            for k in reversed(self.exits):
                predicted, pace = predict(k, capped)
                stall = self.latency.prefill_ms(k, prompt_tokens)
                if predicted <= target and pace <= self._others_limit(co_plans, stall):
                    return Decision(k, predicted, budget_ms, True, wait_ms, batch, "budget")
        predicted = predict(self.exits[0], True)[0]
        feasible = predicted <= budget_ms
        return Decision(self.exits[0], predicted, budget_ms, feasible, wait_ms, batch, "budget")

    def _others_limit(self, co_plans: list[Plan], stall_ms: float) -> float:
        """The slowest pace that keeps every running, still savable budgeted request on time
        when a newcomer's prefill first stalls the batch for ``stall_ms``."""
        now = self._clock()
        shallowest = self.exits[0]
        floor = self.latency.token_ms(
            [shallowest if p.lowerable else p.exit_layer for p in co_plans] + [shallowest]
        )
        pending = self._pending_prefill_ms()
        paces = [
            p.allowed_pace(now, self._tracked.generated(p), self._headroom, pending + stall_ms)
            for p in co_plans
            if self._tracked.is_running(p)
        ]
        return min((pace for pace in paces if pace >= floor), default=math.inf)

    def _pending_prefill_ms(self) -> float:
        """Prefills due before the next step: waiting requests that will get a free slot."""
        free = max(self.config.max_slots - self._tracked.running_count, 0)
        waiting = self._tracked.waiting()[:free]
        return sum(self.latency.prefill_ms(p.exit_layer, p.prompt_tokens) for p in waiting)

    def _decode_steps(self, max_new_tokens: int) -> int:
        return max(max_new_tokens - (1 if self.config.prefill_emits_token else 0), 0)

    def _load_picture(self) -> tuple[float, list[Plan]]:
        """Expected wait before a newcomer's prefill, and the requests it will share a batch with.

        Slots are simulated: running requests free theirs after their remaining steps, waiting
        requests take free slots in arrival order (their prefills run before the newcomer's).
        """
        running, waiting = self._tracked.running(), self._tracked.waiting()
        slots = self.config.max_slots
        co_plans = (running + waiting)[: max(slots - 1, 0)]
        pace = self.latency.token_ms([p.exit_layer for p in co_plans])
        free_at = [(p.max_new_tokens - self._tracked.generated(p)) * pace for p in running][:slots]
        free_at += [0.0] * (slots - len(free_at))
        heapq.heapify(free_at)
        prefills = 0.0
        for p in waiting:
            start = heapq.heappop(free_at)
            prefill = self.latency.prefill_ms(p.exit_layer, p.prompt_tokens)
            prefills += prefill
            heapq.heappush(free_at, start + prefill + self._decode_steps(p.max_new_tokens) * pace)
        # a newcomer also waits for the step in progress to end (half of one, on average)
        in_progress = pace / 2 if running else 0.0
        return free_at[0] + prefills + in_progress, co_plans

    def expected_wait_ms(self) -> float:
        """How long a request arriving now would wait for a slot (used for ``Retry-After``)."""
        with self._lock:
            return self._load_picture()[0]

    # -- departure ---------------------------------------------------------------------------
    def finish(
        self,
        request_id: str,
        queue_ms: float | None = None,
        ttft_ms: float | None = None,
        total_ms: float | None = None,
        completion_tokens: int | None = None,
    ) -> None:
        """Forget a request; learn from its prefill (ttft − queue), from how long it took against
        the prediction (when it made all its tokens) and from its budget outcome."""
        with self._lock:
            plan = self._tracked.pop(request_id)
            if plan is None:
                return
            if queue_ms is not None and ttft_ms is not None:
                self.latency.learn_prefill(plan.exit_layer, plan.prompt_tokens, ttft_ms - queue_ms)
            if total_ms is None:
                return
            if completion_tokens == plan.max_new_tokens and plan.raw_predicted_ms > 0:
                ratio = min(max(total_ms / plan.raw_predicted_ms, 0.25), 4.0)
                self._log_bias += self.config.bias_alpha * (math.log(ratio) - self._log_bias)
            if plan.budget_ms is not None and plan.feasible:
                self._learn_margin(missed=total_ms > plan.budget_ms)

    @property
    def bias(self) -> float:
        """The learnt calibration of whole-request predictions (actual / model)."""
        return math.exp(self._log_bias)

    def _learn_margin(self, missed: bool) -> None:
        cfg = self.config
        down = 1 - cfg.margin_step
        # equilibrium: miss_target·log(down) + (1 − miss_target)·log(up) = 0
        up = math.exp(-cfg.miss_target * math.log(down) / (1 - cfg.miss_target))
        self.margin = min(max(self.margin * (down if missed else up), cfg.margin_min), 1.0)

    @property
    def _headroom(self) -> float:
        return self.config.headroom * self.margin

    @property
    def _recheck_fraction(self) -> float:
        return self.config.recheck * self.margin

    # -- every decode step (engine thread) ---------------------------------------------------
    def on_step(self, report: StepReportLike) -> dict[str, int]:
        """Learn from the step, then lower exits if the batch is too slow for someone's budget."""
        with self._lock:
            self.steps_seen += 1
            self._tracked.observe(report)
            self.latency.learn_step(report)
            return self._recheck(report.now)

    def _recheck(self, now: float) -> dict[str, int]:
        running = self._tracked.running()
        generated = {p.request_id: self._tracked.generated(p) for p in running}
        budgeted = [
            p for p in running if p.lowerable and p.max_new_tokens > generated[p.request_id]
        ]
        if not budgeted:
            return {}
        exits = {p.request_id: p.exit_layer for p in running}
        shallowest = self.exits[0]
        stall = self._pending_prefill_ms()
        pace = self.latency.token_ms(list(exits.values()))
        headroom, recheck = self._headroom, self._recheck_fraction

        def allowed(p: Plan, fraction: float, stall_ms: float = 0.0) -> float:
            return p.allowed_pace(now, generated[p.request_id], fraction, stall_ms)

        if pace <= min(allowed(p, recheck, stall) for p in budgeted):
            return {}  # everyone is on track
        # The fastest this batch can go, in the best case: every budgeted row at the shallowest
        # exit, and no newcomer's prefill in the way. Slower than that is late whatever happens.
        floor = self.latency.token_ms(
            [shallowest if p.lowerable else p.exit_layer for p in running], stalls=False
        )
        savable = [p for p in budgeted if allowed(p, 1.0) >= floor]
        for p in budgeted:
            if p not in savable:  # as fast as possible, and out of the others' way
                exits[p.request_id] = shallowest
                if not p.abandoned:
                    p.abandoned = True
                    self.abandoned += 1
        target = min((allowed(p, headroom, stall) for p in savable), default=math.inf)
        lowerable = [p for p in budgeted if p in savable]
        while lowerable and self.latency.token_ms(list(exits.values())) > target:
            top = max(exits[p.request_id] for p in lowerable)
            if top == shallowest:
                break
            below = max(k for k in self.exits if k < top)
            for p in lowerable:
                if exits[p.request_id] == top:
                    exits[p.request_id] = below
        changes = {}
        for p in budgeted:
            if exits[p.request_id] < p.exit_layer:
                changes[p.request_id] = p.exit_layer = exits[p.request_id]
        self.lowered += len(changes)
        if changes:
            logger.debug("lowered exits: %s", changes)
        return changes

    # -- introspection -----------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                **self.latency.snapshot(),
                "tracked_requests": len(self._tracked),
                "steps_seen": self.steps_seen,
                "lowered_exits": self.lowered,
                "abandoned_requests": self.abandoned,
                "headroom": round(self._headroom, 4),
                "safety_margin": round(self.margin, 4),
                "prediction_bias": round(self.bias, 4),
            }

    def exits_of(self, request_ids: Sequence[str]) -> Mapping[str, int]:
        with self._lock:
            plans = self._tracked.plans
            return {rid: plans[rid].exit_layer for rid in request_ids if rid in plans}
