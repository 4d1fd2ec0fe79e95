"""What whole requests teach the scheduler: the prediction bias and the safety margin.

The step model (online.py) learns from every decode step, but a whole request also pays for things
no single step shows (queueing jitter, the event loop, SSE). Two corrections close that gap:

- **bias**: an EWMA of ``log(actual / predicted)`` over requests that made all their tokens, so that
  predictions at arrival are calibrated against what requests really took;
- **margin**: a feasible request that missed its budget shrinks the margin applied to ``headroom``
  and ``recheck`` (the machine is noisier than the model knows); every met one grows it back a
  little, so that in steady state about ``miss_target`` of feasible requests miss.

Pure Python; not thread-safe on its own (the depth scheduler holds the lock).
"""

from __future__ import annotations

import math

from app.scheduler.plans import Plan, SchedulerConfig


class Calibration:
    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.margin = 1.0  # learnt safety margin on headroom and recheck (≤ 1)
        self._log_bias = 0.0  # EWMA of log(actual / model prediction) of whole requests

    @property
    def bias(self) -> float:
        """The learnt calibration of whole-request predictions (actual / model)."""
        return math.exp(self._log_bias)

    @property
    def headroom(self) -> float:
        """The share of a budget that admission aims for."""
        return self.config.headroom * self.margin

    @property
    def recheck(self) -> float:
        """The share of a budget past which the per-step re-check acts."""
        return self.config.recheck * self.margin

    def learn(self, plan: Plan, total_ms: float, completion_tokens: int | None) -> None:
        """Learn from one finished request: its time against the raw prediction (only when it
        made all its tokens, else the prediction was for other work) and its budget outcome."""
        if completion_tokens == plan.max_new_tokens and plan.raw_predicted_ms > 0:
            ratio = min(max(total_ms / plan.raw_predicted_ms, 0.25), 4.0)
            self._log_bias += self.config.bias_alpha * (math.log(ratio) - self._log_bias)
        if plan.budget_ms is not None and plan.feasible:
            self._learn_margin(missed=total_ms > plan.budget_ms)

    def _learn_margin(self, missed: bool) -> None:
        cfg = self.config
        down = 1 - cfg.margin_step
        # equilibrium: miss_target·log(down) + (1 − miss_target)·log(up) = 0
        up = math.exp(-cfg.miss_target * math.log(down) / (1 - cfg.miss_target))
        self.margin = min(max(self.margin * (down if missed else up), cfg.margin_min), 1.0)
