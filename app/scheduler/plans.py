"""The scheduler's plain data: its settings, its answer at arrival, and what it tracks per request.

Pure Python, no torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


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
    interleave_ms: float = 0.0  # decode steps of others between its prefill chunks (in predicted)


@dataclass
class Plan:
    """What the scheduler knows of one admitted request."""

    request_id: str
    arrival: float  # perf_counter seconds
    prompt_tokens: int
    max_new_tokens: int
    budget_ms: float | None
    exit_layer: int  # current exit
    lowerable: bool  # only budgeted requests are ever lowered
    abandoned: bool = False  # judged unable to meet its budget: no longer holds others back
    feasible: bool = True  # the prediction at arrival fitted the budget
    raw_predicted_ms: float = 0.0  # the model's prediction at arrival, before calibration
    interleave_ms: float = 0.0  # of that, others' decode steps between its prefill chunks

    def allowed_pace(
        self, now: float, generated: int, fraction: float, stall_ms: float = 0.0
    ) -> float:
        """Largest ms per token that still lands within ``budget × fraction`` (inf: no budget)
        with ``generated`` tokens made, after a ``stall_ms`` pause of the batch (prefills of
        newcomers run between steps)."""
        remaining = self.max_new_tokens - generated
        if self.budget_ms is None or remaining <= 0:
            return math.inf
        return (self.budget_ms * fraction - (now - self.arrival) * 1000 - stall_ms) / remaining


def interleave_ms(
    config: SchedulerConfig, prompt_tokens: int, prefill_ms: float, others_pace_ms: float
) -> float:
    """The decode steps of running requests between a newcomer's prefill chunks: chunks of at
    most ``prefill_chunk`` tokens, each taking at most ``prefill_stall`` steps (so at least
    ``prefill / (stall × pace)`` chunks), never under ``min_chunk`` tokens; one step after each
    chunk but the last. Nothing when chunking is off or nobody else runs."""
    if not config.prefill_chunk or others_pace_ms <= 0 or prompt_tokens <= 0:
        return 0.0
    by_size = math.ceil(prompt_tokens / config.prefill_chunk)
    by_time = math.ceil(prefill_ms / (config.prefill_stall * others_pace_ms))
    most = math.ceil(prompt_tokens / min(config.min_chunk, config.prefill_chunk))
    return (min(max(by_size, by_time), most) - 1) * others_pace_ms


@dataclass(frozen=True)
class SchedulerConfig:
    max_slots: int = 16  # rows the engine decodes at once
    headroom: float = 0.9  # aim for budget × headroom
    recheck: float = 1.0  # act once a running request is projected past budget × recheck
    alpha: float = 0.1  # EWMA weight of each new measurement
    prefill_emits_token: bool = True  # the prefill forward yields the first new token
    cell_samples: int = 8  # steps seen in a (deepest exit, batch size) cell before it counts
    stall_alpha: float = 0.01  # EWMA weight of each step in the average prefill stall
    miss_target: float = 0.03  # share of feasible requests the safety margin lets miss
    margin_step: float = 0.05  # how much one miss shrinks the margin (relative)
    margin_min: float = 0.5
    bias_alpha: float = 0.05  # EWMA weight of each finished request in the prediction calibration
    prefill_chunk: int = 0  # the engine's chunked prefill: most tokens per chunk (0: off)
    prefill_stall: float = 1.5  # and a chunk's time in decode steps (app/engine/chunking.py)
    min_chunk: int = 16
