"""The latency profile: what one prefill token and one decode step cost at each trained exit.

Pure Python, no torch: the numbers come from the engine's ``measure_profile`` (or a JSON cache of
it) and this module turns them into predictions. A decode step runs layer *l* over the rows whose
exit is ≥ *l*, so a batch that mixes exits is modelled per layer::

    step_ms(rows) = overhead_ms(len(rows)) + Σ_{l=1..deepest} layer_ms(rows still running at l)

``overhead_ms(b)`` and ``layer_ms(b)`` come from a robust line (repeated median) through the
measured homogeneous steps ``decode_ms(exit, b) ≈ overhead_ms(b) + exit × layer_ms(b)`` at each
measured batch size, interpolated linearly between batch sizes (extended along the last segment).
The engine measures only a few exits at start-up; :func:`fill_exits` puts the other exits on the
same lines (prefill per token too), so that a 30-exit model profiles as fast as a 3-exit one.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol


class ProfilePointLike(Protocol):
    """What the engine's ``ProfilePoint`` looks like (no import: keeps this module engine-free)."""

    exit_layer: int
    prefill_ms_per_token: float
    decode_ms_by_batch: Mapping[int, float]


class ProfileError(ValueError):
    """A latency profile that cannot be used; the message says why."""


@dataclass(frozen=True)
class ExitCost:
    exit_layer: int
    prefill_ms_per_token: float
    decode_ms_by_batch: dict[int, float] = field(default_factory=dict)
    fitted: bool = False  # predicted from the measured exits, not measured itself


def fill_exits(
    points: Iterable[ProfilePointLike | ExitCost], exits: Sequence[int]
) -> list[ExitCost]:
    """Costs for every exit of ``exits`` from points measured at some of them.

    Per batch size, ``decode_ms(k) = overhead + k × layer`` through the measured exits, and
    ``prefill_ms_per_token(k)`` likewise (robust lines, :func:`_fit_line`); a measured exit
    keeps its own numbers. Only batch sizes measured at every point are used.
    """
    measured = {int(p.exit_layer): p for p in points}
    if not measured:
        raise ProfileError("the latency profile has no measured exits")
    sizes = set.intersection(*(set(map(int, p.decode_ms_by_batch)) for p in measured.values()))
    if not sizes:
        raise ProfileError("the measured exits share no decode batch size")
    lines = {
        b: _fit_line([(k, float(p.decode_ms_by_batch[b])) for k, p in measured.items()])
        for b in sorted(sizes)
    }
    prefill = _fit_line([(k, float(p.prefill_ms_per_token)) for k, p in measured.items()])
    costs = []
    for k in sorted(set(exits)):
        p = measured.get(k)
        if p is not None:
            decode = {b: float(p.decode_ms_by_batch[b]) for b in sorted(sizes)}
            costs.append(ExitCost(k, float(p.prefill_ms_per_token), decode))
        else:
            decode = {b: a + k * s for b, (a, s) in lines.items()}
            costs.append(ExitCost(k, prefill[0] + k * prefill[1], decode, fitted=True))
    return costs


def _interpolate(xs: Sequence[int], ys: Sequence[float], x: float) -> float:
    """Piecewise-linear through (xs, ys), extended along the first/last segment, never < 0."""
    if len(xs) == 1:  # one measured batch size: no slope to extend, so assume a flat cost
        return max(ys[0], 0.0)
    i = bisect.bisect_left(xs, x)
    i = min(max(i, 1), len(xs) - 1)
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return max(y0 + (y1 - y0) * (x - x0) / (x1 - x0), 0.0)


def _median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def _fit_line(points: Sequence[tuple[int, float]]) -> tuple[float, float]:
    """A robust ``y = a + b·x`` with a, b ≥ 0: Siegel's repeated median.

    Start-up measurements on a busy machine have outliers (one step caught behind another
    process); a repeated median ignores up to half of the points being wrong, least squares not.
    """
    if len(points) == 1:
        x, y = points[0]
        return 0.0, max(y / x, 0.0)
    slopes = [
        _median([(yj - yi) / (xj - xi) for xj, yj in points if xj != xi]) for xi, yi in points
    ]
    slope = max(_median(slopes), 0.0)
    intercept = _median([y - slope * x for x, y in points])
    if intercept < 0:  # a line through the origin instead
        return 0.0, max(_median([y / x for x, y in points]), 0.0)
    return intercept, slope


class LatencyProfile:
    """Predicted prefill and decode-step times per exit, from measured points."""

    def __init__(self, points: Iterable[ProfilePointLike | ExitCost]) -> None:
        costs = [
            ExitCost(
                exit_layer=int(p.exit_layer),
                prefill_ms_per_token=float(p.prefill_ms_per_token),
                decode_ms_by_batch={int(b): float(ms) for b, ms in p.decode_ms_by_batch.items()},
                fitted=bool(getattr(p, "fitted", False)),
            )
            for p in points
        ]
        if not costs:
            raise ProfileError("the latency profile has no exits")
        self._costs = {c.exit_layer: c for c in sorted(costs, key=lambda c: c.exit_layer)}
        self.exits: tuple[int, ...] = tuple(self._costs)
        if self.exits[0] < 1:
            raise ProfileError(f"exit {self.exits[0]} is not a layer count ≥ 1")
        batch_sizes = sorted({b for c in costs for b in c.decode_ms_by_batch})
        if not batch_sizes or batch_sizes[0] < 1:
            raise ProfileError("the latency profile has no decode batch sizes ≥ 1")
        for c in costs:
            if set(c.decode_ms_by_batch) != set(batch_sizes):
                raise ProfileError(f"exit {c.exit_layer} lacks some of batch sizes {batch_sizes}")
            values = [c.prefill_ms_per_token, *c.decode_ms_by_batch.values()]
            if any(not v >= 0 for v in values):  # also refuses NaN
                raise ProfileError(f"exit {c.exit_layer} has a negative or NaN time")
        self.batch_sizes: tuple[int, ...] = tuple(batch_sizes)
        fits = [
            _fit_line([(k, c.decode_ms_by_batch[b]) for k, c in self._costs.items()])
            for b in batch_sizes
        ]
        self._overhead = [a for a, _ in fits]
        self._per_layer = [s for _, s in fits]

    # -- single-exit predictions -------------------------------------------------------------
    def prefill_ms(self, exit_layer: int, prompt_tokens: int) -> float:
        return self._cost(exit_layer).prefill_ms_per_token * max(prompt_tokens, 0)

    def decode_ms(self, exit_layer: int, batch_size: int) -> float:
        """Measured step time of a batch where every row runs to ``exit_layer``."""
        cost = self._cost(exit_layer)
        ys = [cost.decode_ms_by_batch[b] for b in self.batch_sizes]
        return _interpolate(self.batch_sizes, ys, max(batch_size, 1))

    # -- mixed batches -----------------------------------------------------------------------
    def overhead_ms(self, batch_size: int) -> float:
        return _interpolate(self.batch_sizes, self._overhead, max(batch_size, 1))

    def layer_ms(self, rows: int) -> float:
        return _interpolate(self.batch_sizes, self._per_layer, rows) if rows > 0 else 0.0

    def step_ms(self, row_exits: Sequence[int]) -> float:
        """One decode step of a batch whose rows stop at ``row_exits`` (any order)."""
        if not row_exits:
            return 0.0
        exits = sorted(row_exits)
        total = self.overhead_ms(len(exits))
        done = 0  # layers accounted for so far
        for i, exit_layer in enumerate(exits):
            if exit_layer > done:
                # layers done+1..exit_layer run over the rows from i on (their exits are ≥ these)
                total += (exit_layer - done) * self.layer_ms(len(exits) - i)
                done = exit_layer
        return total

    # -- helpers -----------------------------------------------------------------------------
    def _cost(self, exit_layer: int) -> ExitCost:
        try:
            return self._costs[exit_layer]
        except KeyError:
            raise ProfileError(f"{exit_layer} is not a profiled exit {list(self.exits)}") from None

    def to_json(self) -> list[dict[str, Any]]:
        return [
            {
                "exit_layer": c.exit_layer,
                "prefill_ms_per_token": round(c.prefill_ms_per_token, 4),
                "decode_ms_by_batch": {
                    str(b): round(ms, 4) for b, ms in c.decode_ms_by_batch.items()
                },
                **({"fitted": True} if c.fitted else {}),
            }
            for c in self._costs.values()
        ]

    @classmethod
    def from_json(cls, data: Any) -> LatencyProfile:
        if not isinstance(data, list):
            raise ProfileError("a latency profile is a JSON list of exits")
        try:
            return cls(
                ExitCost(
                    exit_layer=int(item["exit_layer"]),
                    prefill_ms_per_token=float(item["prefill_ms_per_token"]),
                    decode_ms_by_batch={
                        int(b): float(ms) for b, ms in item["decode_ms_by_batch"].items()
                    },
                    fitted=bool(item.get("fitted", False)),
                )
                for item in data
            )
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            if isinstance(exc, ProfileError):
                raise
            raise ProfileError(f"malformed latency profile: {exc}") from exc
