"""The depth scheduler: which trained exit a request runs at, so that it finishes within its budget.

Pure Python, no torch, no engine import: the API layer calls :meth:`DepthScheduler.admit` when a
request arrives and :meth:`DepthScheduler.finish` when it ends; the engine thread calls
:meth:`DepthScheduler.on_step` after every decode step (through the engine's ``step_hook``), with a
report shaped like ``app.engine.types.StepReport``.

At arrival the prediction for exit *k* is::

    expected queue wait + prefill(k, prompt_tokens) + decode_steps × step(batch with this row at k)

and the deepest exit whose prediction fits ``budget_ms × headroom`` wins (the shallowest when none
does, flagged as not feasible). After every step a request whose projection (elapsed + remaining
steps × current step time) passes ``budget_ms × recheck`` is lowered to the deepest shallower exit
that fits again. Exits only ever go down. The step time is the profile's prediction times an EWMA
correction learnt from the measured time between consecutive steps (which includes the prefills of
newcomers that run between steps: the per-token latency a running request actually sees).
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from app.scheduler.online import StepLatencyModel, StepReportLike
from app.scheduler.profile import LatencyProfile

logger = logging.getLogger(__name__)


class SchedulingError(ValueError):
    """A request the scheduler cannot place (e.g. an exit that is not trained)."""


@dataclass(frozen=True)
class Decision:
    """The scheduler's answer at arrival."""

    exit_layer: int
    predicted_ms: float  # arrival → last token, at exit_layer
    budget_ms: float | None
    feasible: bool  # the prediction fits the budget (always True without one)
    expected_queue_ms: float
    expected_batch_size: int
    reason: str  # "budget", "no_budget" or "exit_layer"


@dataclass
class _Plan:
    request_id: str
    arrival: float  # perf_counter seconds
    prompt_tokens: int
    max_new_tokens: int
    budget_ms: float | None
    exit_layer: int  # current exit
    lowerable: bool  # only budgeted requests are ever lowered
    started: bool = False  # seen in a step report
    gone: bool = False  # left the batch (finished in the engine; finish() comes soon)
    generated: int = 0


@dataclass(frozen=True)
class SchedulerConfig:
    max_slots: int = 16  # rows the engine decodes at once
    headroom: float = 0.9  # choose exits whose prediction fits budget × headroom
    recheck: float = 1.0  # lower a running request once its projection passes budget × recheck
    alpha: float = 0.1  # EWMA weight of each new measurement
    prefill_emits_token: bool = True  # the prefill forward yields the first new token
    cell_samples: int = 8  # steps seen in a (deepest exit, batch size) cell before it counts


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
        self._plans: dict[str, _Plan] = {}  # insertion order = arrival order
        self.latency = StepLatencyModel(
            profile, alpha=self.config.alpha, cell_samples=self.config.cell_samples
        )
        self.steps_seen = 0

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
            if request_id in self._plans:
                raise SchedulingError(f"request {request_id!r} is already scheduled")
            decision = self._decide(prompt_tokens, max_new_tokens, budget_ms, exit_layer)
            self._plans[request_id] = _Plan(
                request_id=request_id,
                arrival=self._clock() if arrival is None else arrival,
                prompt_tokens=prompt_tokens,
                max_new_tokens=max_new_tokens,
                budget_ms=budget_ms,
                exit_layer=decision.exit_layer,
                lowerable=budget_ms is not None,
            )
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
        wait_ms, co_exits = self._load_picture()
        batch = len(co_exits) + 1

        def predict(k: int) -> float:
            return self._predict(k, prompt_tokens, max_new_tokens, wait_ms, co_exits)

        if exit_layer is not None or budget_ms is None:
            k = exit_layer if exit_layer is not None else self.exits[-1]
            reason = "exit_layer" if exit_layer is not None else "no_budget"
            return Decision(k, predict(k), budget_ms, True, wait_ms, batch, reason)
        target = budget_ms * self.config.headroom
        chosen, predicted = self.exits[0], predict(self.exits[0])
        for k in reversed(self.exits):
            p = predict(k)
            if p <= target:
                chosen, predicted = k, p
                break
        feasible = predicted <= budget_ms
        return Decision(chosen, predicted, budget_ms, feasible, wait_ms, batch, "budget")

    def _decode_steps(self, max_new_tokens: int) -> int:
        return max(max_new_tokens - (1 if self.config.prefill_emits_token else 0), 0)

    def _predict(
        self, k: int, prompt_tokens: int, max_new_tokens: int, wait_ms: float, co_exits: list[int]
    ) -> float:
        decode = self._decode_steps(max_new_tokens) * self.latency.token_ms([*co_exits, k])
        return wait_ms + self.latency.prefill_ms(k, prompt_tokens) + decode

    def _load_picture(self) -> tuple[float, list[int]]:
        """Expected wait before a new request's prefill, and the exits it will share a batch with.

        Slots are simulated: running requests free theirs after their remaining steps, waiting
        requests take free slots in arrival order (their prefills run before ours).
        """
        running = [p for p in self._plans.values() if p.started and not p.gone]
        waiting = [p for p in self._plans.values() if not p.started]
        slots = self.config.max_slots
        batch_exits = [p.exit_layer for p in running + waiting][: max(slots - 1, 0)]
        step = self.latency.token_ms([p.exit_layer for p in running] or batch_exits)
        free_at = [(p.max_new_tokens - p.generated) * step for p in running][:slots]
        free_at += [0.0] * (slots - len(free_at))
        heapq.heapify(free_at)
        prefills = 0.0
        for p in waiting:
            start = heapq.heappop(free_at)
            prefill = self.latency.prefill_ms(p.exit_layer, p.prompt_tokens)
            prefills += prefill
            heapq.heappush(free_at, start + prefill + self._decode_steps(p.max_new_tokens) * step)
        # a newcomer also waits for the step in progress to end (half of one, on average)
        in_progress = step / 2 if running else 0.0
        return free_at[0] + prefills + in_progress, batch_exits

    def expected_wait_ms(self) -> float:
        """How long a request arriving now would wait for a slot (used for ``Retry-After``)."""
        with self._lock:
            return self._load_picture()[0]

    # -- departure ---------------------------------------------------------------------------
    def finish(
        self, request_id: str, queue_ms: float | None = None, ttft_ms: float | None = None
    ) -> None:
        """Forget a request; its measured prefill (ttft − queue) corrects the prefill estimate."""
        with self._lock:
            plan = self._plans.pop(request_id, None)
            if plan is not None and queue_ms is not None and ttft_ms is not None:
                self.latency.learn_prefill(plan.exit_layer, plan.prompt_tokens, ttft_ms - queue_ms)

    # -- every decode step (engine thread) ---------------------------------------------------
    def on_step(self, report: StepReportLike) -> dict[str, int]:
        """Learn from the step, then lower the exits of requests that fall behind their budget."""
        with self._lock:
            self.steps_seen += 1
            rows = {row.request_id: row for row in report.rows}
            for plan in self._plans.values():
                row = rows.get(plan.request_id)
                if row is not None:
                    plan.started = True
                    plan.generated = row.generated
                    plan.exit_layer = min(plan.exit_layer, row.exit_layer)
                elif plan.started:
                    plan.gone = True
            self.latency.learn_step(report)
            return self._recheck(report.now)

    def _recheck(self, now: float) -> dict[str, int]:
        shallowest = self.exits[0]
        budgeted = [
            p
            for p in self._plans.values()
            if p.started
            and not p.gone
            and p.lowerable
            and p.budget_ms is not None
            and p.exit_layer > shallowest
        ]
        if not budgeted:
            return {}
        exits = {
            p.request_id: p.exit_layer for p in self._plans.values() if p.started and not p.gone
        }

        def projected(plan: _Plan, budget_ms: float, step_ms: float) -> float:
            remaining = max(plan.max_new_tokens - plan.generated, 0)
            return (now - plan.arrival) * 1000 + remaining * step_ms - budget_ms

        step_now = self.latency.token_ms(list(exits.values()))
        late = []
        for plan in budgeted:
            budget = plan.budget_ms * self.config.recheck  # type: ignore[operator]
            overrun = projected(plan, budget, step_now)
            if overrun > 0:
                late.append((overrun, plan))
        changes: dict[str, int] = {}
        for _, plan in sorted(late, key=lambda item: -item[0]):
            target = plan.budget_ms * self.config.headroom  # type: ignore[operator]
            others = [e for rid, e in exits.items() if rid != plan.request_id]
            shallower = [k for k in self.exits if k < plan.exit_layer]
            new = next(
                (
                    k
                    for k in reversed(shallower)
                    if projected(plan, target, self.latency.token_ms([*others, k])) <= 0
                ),
                shallower[0],
            )
            exits[plan.request_id] = plan.exit_layer = new
            changes[plan.request_id] = new
        if changes:
            logger.debug("lowered exits: %s", changes)
        return changes

    # -- introspection -----------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                **self.latency.snapshot(),
                "tracked_requests": len(self._plans),
                "steps_seen": self.steps_seen,
                "headroom": self.config.headroom,
            }

    def exits_of(self, request_ids: Sequence[str]) -> Mapping[str, int]:
        with self._lock:
            return {rid: self._plans[rid].exit_layer for rid in request_ids if rid in self._plans}
