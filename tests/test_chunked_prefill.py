"""Chunked prefill (issue 11): a prompt prefilled in chunks between decode steps gives the same
logits and cache as one prefill at every exit, running streams keep getting tokens while a long
prompt arrives, and a request cancelled part-way through its prefill frees its row at once."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from app.engine import (
    Engine,
    EngineConfig,
    FinalEvent,
    GenerationRequest,
    SamplingParams,
    TokenEvent,
)
from app.engine.batch import Batch
from app.engine.chunking import ChunkPacer
from app.engine.kv_cache import KVCache
from app.engine.loader import load_checkpoint
from app.engine.model import Transformer
from tests.test_engine_batch import admit_all, state

ATOL = 1e-5
LONG = 100  # prompt tokens (the tiny vocabulary has ~400 ids)


@pytest.fixture(scope="module")
def model(tiny_checkpoint: Path) -> Transformer:
    ckpt = load_checkpoint(tiny_checkpoint)
    return Transformer.from_checkpoint(ckpt.hf_config, ckpt.tensors, 128, "cpu", torch.float32)


def prompt(n: int, seed: int = 0) -> list[int]:
    return torch.randint(3, 300, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("exit_layer", [1, 2, 3, 4])
@pytest.mark.parametrize("chunk", [1, 7, 32])
def test_chunked_prefill_equals_one_prefill(
    model: Transformer, exit_layer: int, chunk: int
) -> None:
    a = model.args
    ids = torch.tensor(prompt(45))
    caches = [KVCache(a.num_layers, 2, a.num_kv_heads, 128, a.head_dim, "cpu", torch.float32)]
    caches.append(KVCache(a.num_layers, 2, a.num_kv_heads, 128, a.head_dim, "cpu", torch.float32))
    with torch.inference_mode():
        whole = model.prefill(ids, exit_layer, caches[0], 1, all_logits=True)
        parts = [
            model.prefill(ids[s : s + chunk], exit_layer, caches[1], 1, all_logits=True, start=s)
            for s in range(0, len(ids), chunk)
        ]
        assert model.prefill(ids[:chunk], exit_layer, caches[1], 0, head=False).numel() == 0
    torch.testing.assert_close(torch.cat(parts), whole, atol=ATOL, rtol=1e-4)
    for layer in range(exit_layer):  # the cache holds the same keys and values
        torch.testing.assert_close(
            caches[1].kv[layer][1, :, :45], caches[0].kv[layer][1, :, :45], atol=ATOL, rtol=1e-4
        )


STEP_S = 0.002  # each decode step takes at least this long, as a real model's does


def paced(report: object) -> None:
    """A step hook that makes the tiny model's ~0.3 ms steps last ``STEP_S``: the tests count
    tokens as the client receives them, which holds only while the client keeps up with the
    worker (a 2-core machine gives the asyncio side no core of its own)."""
    time.sleep(STEP_S)


def make_engine(folder: Path, chunk: int, slots: int = 3) -> Engine:
    config = EngineConfig(device="cpu", max_slots=slots, max_seq_len=128, prefill_chunk=chunk)
    eng = Engine.from_pretrained(folder, config, step_hook=paced)
    eng.start()
    return eng


@pytest.fixture(scope="module")
def engines(tiny_checkpoint: Path) -> Iterator[dict[int, Engine]]:
    made = {chunk: make_engine(tiny_checkpoint, chunk) for chunk in (0, 4)}
    yield made
    for eng in made.values():
        eng.shutdown(timeout_s=1.0)


Events = list[TokenEvent | FinalEvent]


def req(rid: str, ids: list[int], exit_layer: int, n: int, **kw) -> GenerationRequest:
    return GenerationRequest(rid, ids, exit_layer, SamplingParams(max_new_tokens=n, **kw))


def run_all(engine: Engine, requests: list[GenerationRequest]) -> dict[str, Events]:
    async def collect(r: GenerationRequest) -> Events:
        return [e async for e in engine.generate(r)]

    async def main() -> list[Events]:
        return list(await asyncio.gather(*(collect(r) for r in requests)))

    return {r.request_id: ev for r, ev in zip(requests, asyncio.run(main()), strict=True)}


def test_chunked_serving_gives_the_same_tokens_and_scores(engines: dict[int, Engine]) -> None:
    """Six requests of mixed prompt lengths and exits on three slots: rows join, leave and move
    while long prompts are part-way through their prefill; every token and score matches."""
    mix = [(90, 4, 6), (5, 2, 20), (60, 3, 3), (12, 4, 12), (100, 1, 4), (33, 2, 9)]
    requests = [
        req(f"r{i}", prompt(n, seed=i), k, m, ignore_eos=True, logprobs=2, prompt_logprobs=1)
        for i, (n, k, m) in enumerate(mix)
    ]
    plain, chunked = (run_all(engines[c], requests) for c in (0, 4))
    for rid, events in plain.items():
        want, got = events[-1], chunked[rid][-1]
        assert isinstance(want, FinalEvent) and isinstance(got, FinalEvent)
        assert got.text == want.text and got.completion_tokens == want.completion_tokens
        for a, b in zip(got.logprobs or (), want.logprobs or (), strict=True):
            assert a.token_id == b.token_id and a.logprob == pytest.approx(b.logprob, abs=1e-4)
        assert len(got.prompt_logprobs or ()) == len(want.prompt_logprobs or ()) > 0
        for a, b in zip(got.prompt_logprobs or (), want.prompt_logprobs or (), strict=True):
            assert a.token_id == b.token_id and a.text == b.text
            assert (a.logprob is None) == (b.logprob is None)
            assert a.logprob is None or a.logprob == pytest.approx(b.logprob, abs=1e-4)
    for eng in engines.values():
        assert eng.stats().free_slots == 3 and eng.stats().waiting == 0


def test_running_streams_get_tokens_while_a_long_prompt_prefills(
    engines: dict[int, Engine],
) -> None:
    """A running stream decodes one token per chunk of the newcomer's prompt (chunk 4: about
    LONG / 4 of them before the newcomer's first token); unchunked, none."""
    between = {chunk: asyncio.run(tokens_meanwhile(eng, chunk)) for chunk, eng in engines.items()}
    assert between[4] >= LONG // 4 - 3
    assert between[0] <= 5  # (tokens already made before it arrived)


async def tokens_meanwhile(eng: Engine, chunk: int) -> int:
    """Tokens a running stream gets between a long prompt's arrival and its first token."""
    gen = eng.generate(req(f"run-{chunk}", prompt(4), 4, 80, ignore_eos=True))
    for _ in range(3):
        await anext(gen)
    stream = eng.generate(req(f"long-{chunk}", prompt(LONG, 9), 4, 1))
    first = asyncio.ensure_future(anext(stream))
    got = 0
    while not first.done():
        await anext(gen)
        got += 1
    await gen.aclose()
    async for _ in stream:
        pass
    return got


def test_cancel_during_a_chunked_prefill_frees_the_row(engines: dict[int, Engine]) -> None:
    eng = engines[4]

    async def main() -> tuple[Events, Events]:
        gen = eng.generate(req("busy", prompt(4), 4, 60, ignore_eos=True))
        for _ in range(2):
            await anext(gen)
        doomed = asyncio.ensure_future(collect_events(eng, req("doomed", prompt(LONG, 3), 4, 5)))
        for _ in range(4):  # a few chunks in: the request is part-way through its prompt
            await anext(gen)
        assert eng.stats().free_slots == 1 and eng.stats().running == 1
        eng.cancel("doomed")
        events = await doomed
        for _ in range(2):  # within a step or two its row is free again
            await anext(gen)
        assert eng.stats().free_slots == 2
        after = await collect_events(eng, req("after", prompt(8), 2, 3))
        await gen.aclose()
        return events, after

    events, after = asyncio.run(main())
    assert len(events) == 1 and isinstance(events[0], FinalEvent)
    assert events[0].finish_reason == "cancelled" and events[0].completion_tokens == 0
    assert isinstance(after[-1], FinalEvent) and after[-1].completion_tokens == 3


async def collect_events(engine: Engine, r: GenerationRequest) -> Events:
    return [e async for e in engine.generate(r)]


def test_batch_moves_a_prefilling_row_out_of_the_way() -> None:
    """Running rows gather in 0..n-1: a prefilling request that took a hole there moves up."""
    batch = Batch(4, 256, frozenset({0}))
    for i, k in enumerate((4, 3, 2)):
        batch.add(state(f"r{i}", k))
    admit_all(batch)
    batch.layout()
    assert [(s.request_id, s.row) for s in batch.running] == [("r0", 0), ("r1", 1), ("r2", 2)]
    batch.finish(batch.requests["r1"], "cancelled")
    batch.add(state("long", 4, prompt=50))
    p = batch.next_admission()
    assert p is not None and p.row == 1 and batch.next_admission() is p  # the hole
    batch.chunk_done(p, 16, None)
    layout = batch.layout()
    assert layout is not None and sorted(layout.moves) == [(1, 2, 4), (2, 1, 2)]  # a swap
    assert layout.copy_len == 16 and p.row == 2 and layout.positions == [3, 3]
    assert batch.busy and batch.requests["long"] is p
    batch.finish(p, "cancelled")  # cancelled part-way: the row is free again
    assert batch.prefilling is None and p.row == -1
    batch.add(state("next", 2))
    assert (n := batch.next_admission()) is not None and n.row == 2


def test_pacer_steers_chunks_to_the_decode_step() -> None:
    pacer = ChunkPacer(256, stall=1.5)
    assert pacer.allowance(0, others_running=True) == 32  # before any measurement
    assert pacer.allowance(0, others_running=False) == 256  # nobody to stall: full chunks
    pacer.prefilled(32, 0.010)  # no decode step seen yet: nothing to aim at
    assert pacer.allowance(0, others_running=True) == 32
    pacer.stepped(0.060)  # target: 90 ms a chunk
    pacer.prefilled(32, 0.030)  # 3x too fast: at most doubles
    assert pacer.allowance(0, others_running=True) == 64
    assert pacer.allowance(40, others_running=True) == 24
    pacer.prefilled(64, 0.180)  # 2x too slow (a long context): halves
    assert pacer.allowance(0, others_running=True) == 32
    pacer.prefilled(10, 0.500)  # a prompt's short tail: says nothing
    assert pacer.allowance(0, others_running=True) == 32
    pacer.prefilled(32, 5.0)  # far too slow: never under 16
    assert pacer.allowance(0, others_running=True) == 16
    pacer.stepped(0.010)
    assert pacer.step_s == pytest.approx(0.7 * 0.060 + 0.3 * 0.010)
    assert ChunkPacer(0, 1.5).allowance(0, others_running=True) is None  # off
    small = ChunkPacer(4, 1.5)
    small.stepped(1.0)
    small.prefilled(4, 1e-6)
    assert small.allowance(0, others_running=True) == 4  # never past max_tokens
