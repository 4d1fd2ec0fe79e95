"""The sides of ``bench decode``: one greedy generation, timed, for each engine compared.

Each side is a callable ``(new_tokens) -> (sample, token_ids)``; a sample holds ``seconds`` (wall,
prefill included), ``cpu_seconds`` (this process, all threads) and ``ms_per_token`` (decode only:
first to last new token over ``new_tokens - 1``).

- :func:`hf_side`: HF ``model.generate`` at full depth, ``min_new_tokens = max_new_tokens``;
- :func:`engine_side`: the engine at one exit through the async interface the server uses (worker
  thread, event queue, detokenisation), ``ignore_eos``;
- llama.cpp lives in :mod:`app.bench.llama_anchor`.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable, Sequence
from typing import Any

from app.bench.common import Timer

Sample = dict[str, float]
Side = Callable[[int], tuple[Sample, list[int]]]


class _Clock:
    """A ``generate`` streamer that only timestamps each new token."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value: Any) -> None:
        if not self._prompt_seen:  # the first call carries the prompt
            self._prompt_seen = True
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def per_token_ms(times: Sequence[float], tokens: int) -> float:
    return (times[-1] - times[0]) / (tokens - 1) * 1000 if tokens > 1 and len(times) > 1 else 0.0


def hf_side(hf: Any, prompt_ids: list[int], pad_token_id: int) -> Side:
    import torch

    from app.engine.openmp import release_thread_pool

    input_ids = torch.tensor([prompt_ids], device=next(hf.parameters()).device)

    def run(tokens: int) -> tuple[Sample, list[int]]:
        clock = _Clock()
        with torch.inference_mode(), Timer() as t:
            out = hf.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=tokens,
                min_new_tokens=tokens,
                do_sample=False,
                streamer=clock,
                pad_token_id=pad_token_id,
            )
        release_thread_pool()  # this thread's OpenMP team would slow the engine's worker
        sample = {
            "seconds": t.seconds,
            "cpu_seconds": t.cpu_seconds,
            "ms_per_token": per_token_ms(clock.times, tokens),
        }
        return sample, out[0, len(prompt_ids) :].tolist()

    return run


_COUNTER = itertools.count()


def engine_side(engine: Any, prompt_ids: list[int], exit_layer: int) -> Side:
    from app.engine import GenerationRequest, SamplingParams

    def run(tokens: int) -> tuple[Sample, list[int]]:
        request = GenerationRequest(
            request_id=f"decode-{next(_COUNTER)}",
            prompt_ids=prompt_ids,
            exit_layer=exit_layer,
            sampling=SamplingParams(max_new_tokens=tokens, ignore_eos=True),
        )

        async def collect() -> list[Any]:
            return [event async for event in engine.generate(request)]

        with Timer() as t:
            events = asyncio.run(collect())
        final = events[-1]
        if final.finish_reason == "error":
            raise RuntimeError(final.error)
        sample = {
            "seconds": t.seconds,
            "cpu_seconds": t.cpu_seconds,
            "ms_per_token": final.ms_per_token,
        }
        return sample, [e.token_id for e in events[:-1]]

    return run
