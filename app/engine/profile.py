"""Start-up latency profile: prefill cost per prompt token and decode step time per batch size.

Measured on the real decode path (model, sampling, the one host read), with synthetic rows:
attention cost depends on context length, not on what the cache holds. Runs only while no request
is running, because it borrows cache rows ``0..b-1``.

Only a few exits are measured (by default the shallowest, a middle one and the deepest): a step
costs the head plus *k* layers, so the scheduler's profile fits that line through them and fills
in the other exits (:func:`app.scheduler.profile.fill_exits`). Batch sizes are measured 1 first,
then the largest (both always), then the others while ``max_seconds`` lasts: a 30-layer model
with 30 exits is ready in seconds, not minutes.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Sequence

import torch

from app.engine.runner import ModelRunner
from app.engine.types import ModelInfo, ProfilePoint

logger = logging.getLogger(__name__)


def profile_exits(exits: Sequence[int], depths: int) -> list[int]:
    """``depths`` exits spread from the shallowest to the deepest (all of them when ``depths``
    is 0 or at least their number)."""
    exits = sorted(exits)
    if depths <= 0 or depths >= len(exits):
        return exits
    if depths == 1:
        return [exits[-1]]
    picks = {exits[round(i * (len(exits) - 1) / (depths - 1))] for i in range(depths)}
    return sorted(picks)


def batch_order(sizes: Sequence[int]) -> list[int]:
    """1 first (every prediction needs it), then the largest (full load), then the rest."""
    ordered = sorted(set(sizes))
    return ordered[:1] + ordered[-1:] + ordered[1:-1] if len(ordered) > 1 else ordered


def measure_profile(
    runner: ModelRunner,
    info: ModelInfo,
    batch_sizes: Sequence[int],
    prompt_tokens: int = 64,
    decode_steps: int = 8,
    depths: int = 0,
    max_seconds: float = float("inf"),
) -> list[ProfilePoint]:
    """Points for :func:`profile_exits` ``(info.exits, depths)``, with the batch sizes that fit
    in ``max_seconds`` (batch 1 and the largest always, whatever they cost)."""
    decode_steps = max(1, decode_steps)
    prompt_tokens = max(1, min(prompt_tokens, info.max_seq_len - decode_steps - 2))
    sizes = batch_order([b for b in batch_sizes if 1 <= b <= runner.cache.max_slots])
    exits = profile_exits(info.exits, depths)
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(info.vocab_size, (prompt_tokens,), generator=generator).tolist()
    started = time.perf_counter()
    logger.info(
        "measuring the latency profile: exits %s of %s, batch sizes %s (at most %.0f s)",
        exits, list(info.exits), sizes, max_seconds,
    )  # fmt: skip
    prefill = {k: _prefill_ms_per_token(runner, prompt, k) for k in exits}
    decode: dict[int, dict[int, float]] = {k: {} for k in exits}
    must = set(sizes[:2])  # batch 1 and the largest: idle and full-load predictions need them
    largest_s = 0.0  # what the largest measured size took: a smaller one takes no longer
    for b in sizes:
        elapsed = time.perf_counter() - started
        if b not in must and elapsed + largest_s > max_seconds:
            logger.info("profile: batch %d skipped (%.1f s spent)", b, elapsed)
            continue
        t0 = time.perf_counter()
        for k in exits:
            decode[k][b] = _decode_ms(runner, prompt, k, b, decode_steps)
        largest_s = max(largest_s, time.perf_counter() - t0)
        logger.info(
            "profile: batch %d measured, %s ms per step at exits %s (%.1f s)",
            b, [round(decode[k][b], 2) for k in exits], exits, time.perf_counter() - started,
        )  # fmt: skip
    runner.set_layout([], 0, [], [])
    logger.info("latency profile measured in %.1f s", time.perf_counter() - started)
    return [ProfilePoint(k, prefill[k], dict(sorted(decode[k].items()))) for k in exits]


def _prefill_ms_per_token(runner: ModelRunner, prompt: list[int], exit_layer: int) -> float:
    runner.prefill(0, prompt, exit_layer, None)  # warm-up
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        runner.prefill(0, prompt, exit_layer, None)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000 / len(prompt)


def _decode_ms(
    runner: ModelRunner, prompt: list[int], exit_layer: int, batch: int, steps: int
) -> float:
    n = len(prompt)
    runner.set_layout([], 0, [n] * batch, [exit_layer] * batch)
    tokens = prompt[:1] * batch
    runner.decode(tokens, n + 1, [])  # warm-up
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        runner.decode(tokens, n + 2 + i, [])
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000
