"""Start-up latency profile: prefill cost per prompt token and decode step time per batch size.

Measured per trained exit on the real decode path (model, sampling, the one host read), with
synthetic rows: attention cost depends on context length, not on what the cache holds. Runs only
while no request is running, because it borrows cache rows ``0..b-1``.
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


def measure_profile(
    runner: ModelRunner,
    info: ModelInfo,
    batch_sizes: Sequence[int],
    prompt_tokens: int = 64,
    decode_steps: int = 8,
) -> list[ProfilePoint]:
    decode_steps = max(1, decode_steps)
    prompt_tokens = max(1, min(prompt_tokens, info.max_seq_len - decode_steps - 2))
    sizes = sorted({b for b in batch_sizes if 1 <= b <= runner.cache.max_slots})
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(info.vocab_size, (prompt_tokens,), generator=generator).tolist()
    points = []
    started = time.perf_counter()
    for exit_layer in info.exits:
        runner.prefill(0, prompt, exit_layer, None)  # warm-up
        prefill_s = []
        for _ in range(3):
            t0 = time.perf_counter()
            runner.prefill(0, prompt, exit_layer, None)
            prefill_s.append(time.perf_counter() - t0)
        decode_ms: dict[int, float] = {}
        for b in sizes:
            runner.set_layout([], 0, [prompt_tokens] * b, [exit_layer] * b)
            tokens = prompt[:1] * b
            runner.decode(tokens, prompt_tokens + 1, [])  # warm-up
            step_s = []
            for i in range(decode_steps):
                t0 = time.perf_counter()
                runner.decode(tokens, prompt_tokens + 2 + i, [])
                step_s.append(time.perf_counter() - t0)
            decode_ms[b] = statistics.median(step_s) * 1000
        points.append(
            ProfilePoint(
                exit_layer=exit_layer,
                prefill_ms_per_token=statistics.median(prefill_s) * 1000 / prompt_tokens,
                decode_ms_by_batch=decode_ms,
            )
        )
    runner.set_layout([], 0, [], [])
    logger.info("latency profile measured in %.1f s", time.perf_counter() - started)
    return points
