"""Online correction of the latency profile from the engine's measured decode steps.

The per-token latency a running request sees is one decode step, the engine's bookkeeping before
the next one, and, now and then, the prefill of a newcomer that joins the batch between steps::

    token_ms(batch) = profile.step_ms(batch) × scale(deepest exit, batch size) + gap_ms + stall_ms

``scale`` is an EWMA of measured/predicted step time, kept per (deepest exit, batch size) cell
once that cell has been seen often enough, else one global EWMA. Between two consecutive steps
that share a row, the time outside the steps is ``gap_ms`` (an EWMA over steps where nobody
joined) or, when a newcomer joined, its prefill stall; ``stall_ms`` is the stall per step averaged
over a longer window (zeros included), i.e. the expected cost of future arrivals. Pure Python; not
thread-safe on its own (the depth scheduler holds the lock).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from app.scheduler.profile import LatencyProfile


class RowLike(Protocol):
    request_id: str
    exit_layer: int
    generated: int


class StepReportLike(Protocol):
    """What the engine's ``StepReport`` looks like (see app/engine/types.py): the exits of every
    row in the step, the rows still running after it and those that left since the last one."""

    now: float
    step_seconds: float
    exits: Sequence[int]
    rows: Sequence[RowLike]
    finished: Sequence[RowLike]


@dataclass
class _Ewma:
    value: float
    samples: int = 0

    def add(self, sample: float, alpha: float) -> None:
        # the first samples weigh more, so that a cell converges quickly from its prior
        weight = max(alpha, 1.0 / (self.samples + 2))
        self.value += weight * (sample - self.value)
        self.samples += 1


class StepLatencyModel:
    def __init__(
        self,
        profile: LatencyProfile,
        alpha: float = 0.1,
        min_scale: float = 0.2,
        max_scale: float = 5.0,
        cell_samples: int = 8,
        stall_alpha: float = 0.01,
    ) -> None:
        self.profile = profile
        self.alpha = alpha
        self.min_scale = min_scale
        self.max_scale = max_scale
        self.cell_samples = cell_samples
        self.stall_alpha = stall_alpha
        self._scale = _Ewma(1.0)
        self._cells: dict[tuple[int, int], _Ewma] = {}
        self._gap = _Ewma(0.0)
        self._stall = _Ewma(0.0)
        self._prefill = _Ewma(1.0)
        self._last: tuple[float, frozenset[str]] | None = None

    # -- predictions ---------------------------------------------------------------------------
    def scale(self, row_exits: Sequence[int]) -> float:
        cell = self._cells.get((max(row_exits), len(row_exits))) if row_exits else None
        if cell is not None and cell.samples >= self.cell_samples:
            return cell.value
        return self._scale.value

    def step_ms(self, row_exits: Sequence[int]) -> float:
        return self.profile.step_ms(row_exits) * self.scale(row_exits) if row_exits else 0.0

    def token_ms(self, row_exits: Sequence[int], stalls: bool = True) -> float:
        """Time between two tokens of a request running in this batch; ``stalls=False`` leaves
        out the expected prefills of future arrivals (the best case)."""
        if not row_exits:
            return 0.0
        stall = self._stall.value if stalls else 0.0
        return self.step_ms(row_exits) + self._gap.value + stall

    def prefill_ms(self, exit_layer: int, prompt_tokens: int) -> float:
        return self.profile.prefill_ms(exit_layer, prompt_tokens) * self._prefill.value

    # -- learning --------------------------------------------------------------------------------
    def _clamp(self, ratio: float) -> float:
        return min(max(ratio, self.min_scale), self.max_scale)

    def learn_step(self, report: StepReportLike) -> None:
        exits = list(report.exits)
        predicted = self.profile.step_ms(exits)
        if predicted > 0 and report.step_seconds > 0:
            ratio = self._clamp(report.step_seconds * 1000 / predicted)
            self._scale.add(ratio, self.alpha)
            key = (max(exits), len(exits))
            self._cells.setdefault(key, _Ewma(self._scale.value)).add(ratio, self.alpha)
        # rows in this step, or prefilled since the last one (those that finished at once too)
        ids = frozenset(r.request_id for r in (*report.rows, *report.finished))
        if self._last is not None and ids & self._last[1]:
            outside_ms = max((report.now - self._last[0] - report.step_seconds) * 1000, 0.0)
            if ids - self._last[1]:  # someone joined: a prefill ran between the steps
                self._stall.add(max(outside_ms - self._gap.value, 0.0), self.stall_alpha)
            else:
                self._gap.add(outside_ms, self.alpha)
                self._stall.add(0.0, self.stall_alpha)
        self._last = (report.now, frozenset(r.request_id for r in report.rows))

    def learn_prefill(self, exit_layer: int, prompt_tokens: int, measured_ms: float) -> None:
        predicted = self.profile.prefill_ms(exit_layer, prompt_tokens)
        if predicted > 0.05 and measured_ms >= 0:
            self._prefill.add(self._clamp(measured_ms / predicted), self.alpha)

    def snapshot(self) -> dict[str, Any]:
        return {
            "step_correction": round(self._scale.value, 4),
            "step_correction_cells": {
                f"{k}x{b}": round(c.value, 3)
                for (k, b), c in sorted(self._cells.items())
                if c.samples >= self.cell_samples
            },
            "gap_ms": round(self._gap.value, 4),
            "stall_ms": round(self._stall.value, 4),
            "prefill_correction": round(self._prefill.value, 4),
        }
