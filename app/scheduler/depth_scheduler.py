"""The depth scheduler: which trained exit a request runs at, so that it finishes within its budget.

Pure Python, no torch, no engine import: the API layer calls :meth:`DepthScheduler.admit` when a
request arrives and :meth:`DepthScheduler.finish` when it ends; the engine thread calls
:meth:`DepthScheduler.on_step` after every decode step (through the engine's ``step_hook``), with a
report shaped like ``app.engine.types.StepReport``.

How it decides, and where each part lives:

- **At arrival** (here), the prediction for exit *k* is ``expected queue wait + prefill(k) + decode
  steps × pace(batch with the newcomer at k)``, where the pace is the time between two tokens of the
  batch (online.py) and the wait and the batch come from the load picture (load.py). The deepest
  *k* wins whose prediction fits ``budget_ms × headroom`` and whose pace does not make a running
  budgeted request late. If none fits as the batch is, the same search runs again assuming the
  budgeted rows deeper than *k* are lowered to *k* (the next step's re-check does that). If still
  none fits: the shallowest exit, flagged ``feasible=False``.
- **After every step**, the step model learns from the report (online.py) and the re-check lowers
  the exits of a batch too slow for someone's budget (recheck.py).
- **After every request**, the prediction bias and the safety margin learn from its outcome
  (calibration.py).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from app.scheduler.calibration import Calibration
from app.scheduler.load import decode_steps, load_picture, pending_prefill_ms
from app.scheduler.online import StepLatencyModel, StepReportLike
from app.scheduler.plans import (
    Decision,
    Plan,
    SchedulerConfig,
    SchedulingError,
    interleave_ms,
)
from app.scheduler.profile import LatencyProfile
from app.scheduler.recheck import lower_exits
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
        self.calibration = Calibration(self.config)

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
                interleave_ms=decision.interleave_ms,
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
        wait_ms, co_plans = load_picture(self._tracked, self.latency, self.config)
        batch = len(co_plans) + 1
        steps = decode_steps(self.config, max_new_tokens)

        def predict(k: int, capped: bool) -> tuple[float, float, float]:
            """(prediction, pace with the newcomer, others' steps between its chunks)"""
            exits = [
                min(p.exit_layer, k) if capped and p.lowerable else p.exit_layer for p in co_plans
            ]
            pace = self.latency.token_ms([*exits, k])
            prefill = self.latency.prefill_ms(k, prompt_tokens)
            others = self.latency.token_ms(exits) if exits else 0.0
            between = interleave_ms(self.config, prompt_tokens, prefill, others)
            raw = wait_ms + prefill + between + steps * pace
            return raw * self.bias, pace, between

        def decision(k: int, predicted: float, between: float, ok: bool, reason: str) -> Decision:
            return Decision(k, predicted, budget_ms, ok, wait_ms, batch, reason, between)

        if exit_layer is not None or budget_ms is None:
            k = exit_layer if exit_layer is not None else self.exits[-1]
            reason = "exit_layer" if exit_layer is not None else "no_budget"
            predicted, _, between = predict(k, False)
            return decision(k, predicted, between, True, reason)
        target = budget_ms * self.calibration.headroom
        for capped in (False, True):
            for k in reversed(self.exits):
                predicted, pace, between = predict(k, capped)
                stall = self.latency.prefill_ms(k, prompt_tokens)
                if predicted <= target and pace <= self._others_limit(co_plans, stall):
                    return decision(k, predicted, between, True, "budget")
        predicted, _, between = predict(self.exits[0], True)
        return decision(self.exits[0], predicted, between, predicted <= budget_ms, "budget")

    def _others_limit(self, co_plans: list[Plan], stall_ms: float) -> float:
        """The slowest pace that keeps every running, still savable budgeted request on time
        when a newcomer's prefill first stalls the batch for ``stall_ms``."""
        now = self._clock()
        shallowest = self.exits[0]
        floor = self.latency.token_ms(
            [shallowest if p.lowerable else p.exit_layer for p in co_plans] + [shallowest]
        )
        pending = pending_prefill_ms(self._tracked, self.latency, self.config.max_slots)
        paces = [
            p.allowed_pace(
                now, self._tracked.generated(p), self.calibration.headroom, pending + stall_ms
            )
            for p in co_plans
            if self._tracked.is_running(p)
        ]
        return min((pace for pace in paces if pace >= floor), default=math.inf)

    def expected_wait_ms(self) -> float:
        """How long a request arriving now would wait for a slot (used for ``Retry-After``)."""
        with self._lock:
            return load_picture(self._tracked, self.latency, self.config)[0]

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
                # (what the prefill itself took: the others' steps between its chunks aside)
                prefill_ms = ttft_ms - queue_ms - plan.interleave_ms
                self.latency.learn_prefill(plan.exit_layer, plan.prompt_tokens, prefill_ms)
            if total_ms is not None:
                self.calibration.learn(plan, total_ms, completion_tokens)

    @property
    def bias(self) -> float:
        """The learnt calibration of whole-request predictions (actual / model)."""
        return self.calibration.bias

    @property
    def margin(self) -> float:
        """The learnt safety margin on headroom and recheck (≤ 1)."""
        return self.calibration.margin

    # -- every decode step (engine thread) ---------------------------------------------------
    def on_step(self, report: StepReportLike) -> dict[str, int]:
        """Learn from the step, then lower exits if the batch is too slow for someone's budget."""
        with self._lock:
            self.steps_seen += 1
            self._tracked.observe(report)
            self.latency.learn_step(report)
            changes, abandoned = lower_exits(
                self._tracked,
                self.latency,
                self.exits,
                report.now,
                stall_ms=pending_prefill_ms(self._tracked, self.latency, self.config.max_slots),
                headroom=self.calibration.headroom,
                recheck=self.calibration.recheck,
            )
            self.abandoned += abandoned
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
                "headroom": round(self.calibration.headroom, 4),
                "safety_margin": round(self.margin, 4),
                "prediction_bias": round(self.bias, 4),
            }

    def exits_of(self, request_ids: Sequence[str]) -> Mapping[str, int]:
        with self._lock:
            plans = self._tracked.plans
            return {rid: plans[rid].exit_layer for rid in request_ids if rid in plans}
