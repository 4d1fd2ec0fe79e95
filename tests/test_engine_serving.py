"""The engine as the API layer uses it: continuous batching, exits, cancel, seeds, stops, EOS."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from app.engine import (
    Engine,
    EngineClosedError,
    EngineConfig,
    FinalEvent,
    GenerationRequest,
    SamplingParams,
    StepReport,
    TokenEvent,
)
from app.engine.kv_cache import KVCache
from app.engine.loader import load_checkpoint
from app.engine.model import Transformer

PROMPTS = [
    "Once upon a time",
    "The quick brown fox jumps over the lazy dog. Héllo",
    "### Instruction:\nSay hello.\n\n### Response:\n",
    "def add(a, b):",
    "naïve café",
]

Events = list[TokenEvent | FinalEvent]


class HookPlan:
    """A step hook that lowers exits at planned token counts and records every report."""

    def __init__(self) -> None:
        self.plan: dict[str, tuple[int, int]] = {}  # request id -> (at generated, new exit)
        self.after: dict[str, list[tuple[int, object]]] = {}  # id -> [(from generated, exit)]
        self.unknown: dict[str, object] = {}  # sent with every report
        self.reports: list[StepReport] = []

    def __call__(self, report: StepReport) -> dict[str, object]:
        self.reports.append(report)
        out: dict[str, object] = {**self.unknown}
        out |= {
            row.request_id: self.plan[row.request_id][1]
            for row in report.rows
            if row.request_id in self.plan and row.generated == self.plan[row.request_id][0]
        }
        for row in report.rows:
            for at, new_exit in self.after.get(row.request_id, []):
                if row.generated >= at:
                    out[row.request_id] = new_exit
        return out


@pytest.fixture(scope="module")
def hook() -> HookPlan:
    return HookPlan()


@pytest.fixture(scope="module")
def engine(tiny_checkpoint: Path, hook: HookPlan) -> Iterator[Engine]:
    eng = Engine.from_pretrained(
        tiny_checkpoint, EngineConfig(device="cpu", max_slots=8, max_seq_len=128), step_hook=hook
    )
    eng.start()
    yield eng
    eng.shutdown(timeout_s=1.0)


@pytest.fixture(scope="module")
def reference_model(tiny_checkpoint: Path) -> Transformer:
    ckpt = load_checkpoint(tiny_checkpoint)
    return Transformer.from_checkpoint(ckpt.hf_config, ckpt.tensors, 128, "cpu", torch.float32)


_ids = iter(range(10**9))


def request(
    engine: Engine, prompt: str, exit_layer: int, max_new_tokens: int = 12, **sampling
) -> GenerationRequest:
    return GenerationRequest(
        request_id=f"req-{next(_ids)}",
        prompt_ids=engine.encode(prompt),
        exit_layer=exit_layer,
        sampling=SamplingParams(max_new_tokens=max_new_tokens, **sampling),
    )


async def collect(engine: Engine, req: GenerationRequest) -> Events:
    return [ev async for ev in engine.generate(req)]


def run(engine: Engine, *reqs: GenerationRequest) -> list[Events]:
    async def main() -> list[Events]:
        return list(await asyncio.gather(*(collect(engine, r) for r in reqs)))

    return asyncio.run(main())


def tokens(events: Events) -> list[int]:
    return [e.token_id for e in events if isinstance(e, TokenEvent)]


def final(events: Events) -> FinalEvent:
    assert isinstance(events[-1], FinalEvent)
    assert all(isinstance(e, TokenEvent) for e in events[:-1])
    return events[-1]


def reference_tokens(
    model: Transformer, prompt_ids: list[int], exit_per_token: list[int]
) -> list[int]:
    """Greedy tokens by hand: token ``i`` comes from exit ``exit_per_token[i]``."""
    a = model.args
    cache = KVCache(a.num_layers, 1, a.num_kv_heads, 128, a.head_dim, "cpu", torch.float32)
    with torch.inference_mode():
        logits = model.prefill(torch.tensor(prompt_ids), exit_per_token[0], cache, 0)
        out = [int(logits.argmax())]
        for i, k in enumerate(exit_per_token[1:], start=1):
            pos = len(prompt_ids) + i - 1
            logits = model.decode(
                torch.tensor(out[-1:]), torch.tensor([pos]), [1] * k, cache, pos + 1
            )
            out.append(int(logits.argmax()))
    return out


def wait_until(condition, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


# -- correctness of batching -----------------------------------------------------------------------


def test_full_depth_greedy_matches_hf_generate(engine: Engine, tiny_checkpoint: Path) -> None:
    req = request(engine, PROMPTS[0], 4, max_new_tokens=10)
    got = tokens(run(engine, req)[0])
    hf = AutoModelForCausalLM.from_pretrained(tiny_checkpoint).eval()
    with torch.inference_mode():
        out = hf.generate(
            torch.tensor([req.prompt_ids]), max_new_tokens=10, min_new_tokens=10, do_sample=False
        )
    want = out[0, len(req.prompt_ids) :].tolist()
    assert got == want


def test_mixed_exit_batch_equals_each_request_alone(
    engine: Engine, reference_model: Transformer
) -> None:
    specs = [(p, k) for p, k in zip(PROMPTS * 2, [4, 1, 3, 2, 4, 2, 1, 3, 4, 1], strict=True)]
    alone = [tokens(run(engine, request(engine, p, k, 16))[0]) for p, k in specs]
    batched = run(engine, *(request(engine, p, k, 16) for p, k in specs))
    assert [tokens(ev) for ev in batched] == alone
    for (_p, k), ev in zip(specs, batched, strict=True):
        assert all(e.exit_layer == k for e in ev)
        assert final(ev).exit_layer == k
    # and "alone" is right: the hand-made reference at a fixed exit
    for (p, k), toks in list(zip(specs, alone, strict=True))[:4]:
        assert toks == reference_tokens(reference_model, engine.encode(p), [k] * 16)


def test_requests_join_and_leave_a_running_batch(engine: Engine) -> None:
    """Staggered arrivals and different lengths: every request still gets its solo tokens."""
    specs = [(PROMPTS[i % 5], [4, 2, 3, 1][i % 4], 4 + 3 * i) for i in range(6)]
    alone = [tokens(run(engine, request(engine, p, k, n))[0]) for p, k, n in specs]

    async def staggered() -> list[Events]:
        tasks = []
        for p, k, n in specs:
            tasks.append(asyncio.create_task(collect(engine, request(engine, p, k, n))))
            await asyncio.sleep(0.003)
        return list(await asyncio.gather(*tasks))

    assert [tokens(ev) for ev in asyncio.run(staggered())] == alone


# -- lowering exits -------------------------------------------------------------------------------


def test_step_hook_lowers_an_exit_mid_sequence(
    engine: Engine, hook: HookPlan, reference_model: Transformer
) -> None:
    req = request(engine, PROMPTS[2], 4, max_new_tokens=14)
    other = request(engine, PROMPTS[1], 3, max_new_tokens=14)
    hook.plan[req.request_id] = (5, 2)
    hook.reports.clear()
    ev, _ = run(engine, req, other)
    fin = final(ev)
    assert fin.exit_layer == 2 and fin.initial_exit_layer == 4
    assert [(d.at_token, d.from_exit, d.to_exit) for d in fin.downgrades] == [(5, 4, 2)]
    assert [e.exit_layer for e in ev[:-1]] == [4] * 5 + [2] * 9
    assert tokens(ev) == reference_tokens(reference_model, req.prompt_ids, [4] * 5 + [2] * 9)
    assert hook.reports and all(r.batch_size >= len(r.rows) for r in hook.reports)
    assert max(r.deepest_exit for r in hook.reports) == 4


def test_lowered_exits_apply_between_steps_and_bad_ones_are_ignored(
    engine: Engine, hook: HookPlan, reference_model: Transformer
) -> None:
    req = request(engine, PROMPTS[3], 4, max_new_tokens=20)
    # from token 3 on the hook asks for exit 1; from token 6 on also for exit 3 (not lower than
    # 1 any more: ignored), for an exit that is no int, and for a request that does not exist
    hook.after[req.request_id] = [(3, 1), (6, 3), (8, "deep")]
    hook.unknown = {"no-such-request": 1}

    async def main() -> Events:
        return [ev async for ev in engine.generate(req)]

    try:
        ev = asyncio.run(main())
    finally:
        hook.unknown = {}
    fin = final(ev)
    assert fin.exit_layer == 1 and len(fin.downgrades) == 1
    at = fin.downgrades[0].at_token
    assert 3 <= at < 20
    schedule = [4] * at + [1] * (20 - at)
    assert [e.exit_layer for e in ev[:-1]] == schedule
    assert tokens(ev) == reference_tokens(reference_model, req.prompt_ids, schedule)


# -- cancel and slots -----------------------------------------------------------------------------


def test_cancel_frees_the_slot(tiny_checkpoint: Path) -> None:
    steps: list[tuple[float, frozenset[str]]] = []  # (when, who ran) of every decode step

    def hook(report: StepReport) -> None:
        steps.append((report.now, frozenset(r.request_id for r in report.rows)))

    config = EngineConfig(max_slots=1, max_seq_len=128)
    eng = Engine.from_pretrained(tiny_checkpoint, config, step_hook=hook)
    eng.start()
    try:
        long_req = request(eng, PROMPTS[0], 4, max_new_tokens=100)
        queued = request(eng, PROMPTS[1], 2, max_new_tokens=5)
        cancelled_at = 0.0

        async def main() -> tuple[Events, Events]:
            nonlocal cancelled_at
            events: Events = []
            task = asyncio.create_task(collect(eng, queued))
            async for ev in eng.generate(long_req):
                events.append(ev)
                if len(events) == 3:
                    assert eng.stats().free_slots == 0 and eng.stats().waiting == 1
                    cancelled_at = time.perf_counter()
                    eng.cancel(long_req.request_id)
            return events, await task

        cancelled, after = asyncio.run(main())
        fin = final(cancelled)
        assert fin.finish_reason == "cancelled" and fin.completion_tokens < 100
        # it leaves within one step of the cancel, however far the client lagged behind
        rid = long_req.request_id
        assert sum(1 for now, ids in steps if now > cancelled_at and rid in ids) <= 1
        assert final(after).finish_reason == "length"
        assert wait_until(lambda: eng.stats().free_slots == 1)
        assert eng.stats().running == 0 and eng.stats().waiting == 0
    finally:
        eng.shutdown(1.0)


def test_leaving_the_stream_early_cancels_the_request(engine: Engine) -> None:
    req = request(engine, PROMPTS[0], 4, max_new_tokens=100)

    async def consume_some() -> None:
        async with contextlib.aclosing(engine.generate(req)) as stream:
            async for ev in stream:
                if ev.index == 2:
                    break

    asyncio.run(consume_some())
    assert wait_until(lambda: engine.stats().running == 0)

    req2 = request(engine, PROMPTS[0], 4, max_new_tokens=100)

    async def cancel_task() -> None:
        task = asyncio.create_task(collect(engine, req2))
        await asyncio.sleep(0.05)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    asyncio.run(cancel_task())
    assert wait_until(lambda: engine.stats().running == 0)
    assert engine.stats().free_slots == engine.stats().max_slots


# -- sampling -------------------------------------------------------------------------------------


def test_seeded_sampling_is_deterministic_and_batch_independent(engine: Engine) -> None:
    params = dict(temperature=1.0, top_p=0.95, top_k=50)
    alone = tokens(run(engine, request(engine, PROMPTS[0], 3, 24, seed=7, **params))[0])
    again = tokens(run(engine, request(engine, PROMPTS[0], 3, 24, seed=7, **params))[0])
    assert alone == again
    neighbours = [
        request(engine, PROMPTS[i], k, 24, seed=100 + i, **params)
        for i, k in [(1, 4), (2, 1), (3, 3), (4, 2)]
    ]
    target = request(engine, PROMPTS[0], 3, 24, seed=7, **params)
    batched = run(engine, neighbours[0], target, *neighbours[1:])
    assert tokens(batched[1]) == alone
    other_seed = tokens(run(engine, request(engine, PROMPTS[0], 3, 24, seed=8, **params))[0])
    assert other_seed != alone


def test_unseeded_sampling_varies(engine: Engine) -> None:
    runs = {
        tuple(tokens(run(engine, request(engine, PROMPTS[0], 4, 16, temperature=5.0))[0]))
        for _ in range(3)
    }
    assert len(runs) > 1


# -- finishing ------------------------------------------------------------------------------------


def test_max_new_tokens_and_events(engine: Engine) -> None:
    ev = run(engine, request(engine, PROMPTS[0], 4, max_new_tokens=7))[0]
    fin = final(ev)
    assert fin.finish_reason == "length" and fin.completion_tokens == 7
    assert [e.index for e in ev[:-1]] == list(range(7))
    assert "".join(e.text for e in ev[:-1]) == fin.text
    assert fin.prompt_tokens == len(engine.encode(PROMPTS[0]))
    assert 0 <= fin.queue_ms <= fin.ttft_ms <= fin.total_ms and fin.ms_per_token > 0


def test_stop_string_ends_generation_without_leaking(engine: Engine) -> None:
    plain = final(run(engine, request(engine, PROMPTS[2], 4, max_new_tokens=24))[0]).text
    assert len(plain) >= 10
    stop = plain[6:9]
    want = plain[: plain.find(stop)]
    ev = run(engine, request(engine, PROMPTS[2], 4, max_new_tokens=24, stop=(stop, "\x00")))[0]
    fin = final(ev)
    assert fin.finish_reason == "stop"
    assert fin.text == want
    assert "".join(e.text for e in ev[:-1]) == want
    assert all(stop not in e.text for e in ev[:-1])


def test_eos_from_generation_config_stops(tiny_checkpoint: Path, tmp_path: Path) -> None:
    folder = tmp_path / "eos"
    shutil.copytree(tiny_checkpoint, folder)
    probe = Engine.from_pretrained(folder, EngineConfig(max_slots=2, max_seq_len=64))
    probe.start()
    free_run = tokens(run(probe, request(probe, PROMPTS[0], 4, max_new_tokens=8))[0])
    probe.shutdown(1.0)
    eos = free_run[3]
    first = free_run.index(eos)
    gen_path = folder / "generation_config.json"
    gen = json.loads(gen_path.read_text())
    gen["eos_token_id"] = [gen["eos_token_id"], eos]
    gen_path.write_text(json.dumps(gen))
    eng = Engine.from_pretrained(folder, EngineConfig(max_slots=2, max_seq_len=64))
    assert eos in eng.info.eos_token_ids
    eng.start()
    try:
        ev = run(eng, request(eng, PROMPTS[0], 4, max_new_tokens=8))[0]
    finally:
        eng.shutdown(1.0)
    fin = final(ev)
    assert fin.finish_reason == "eos"
    assert tokens(ev) == free_run[: first + 1]
    assert fin.completion_tokens == first + 1


def test_full_context_stops_with_length(tiny_checkpoint: Path) -> None:
    eng = Engine.from_pretrained(tiny_checkpoint, EngineConfig(max_slots=2, max_seq_len=16))
    eng.start()
    try:
        req = request(eng, PROMPTS[0], 4, max_new_tokens=100)
        fin = final(run(eng, req)[0])
        assert fin.finish_reason == "length"
        assert fin.prompt_tokens + fin.completion_tokens == 16
        too_long = request(eng, " ".join(PROMPTS), 4)
        with pytest.raises(ValueError, match="context"):
            run(eng, too_long)
    finally:
        eng.shutdown(1.0)


# -- failures and lifecycle -----------------------------------------------------------------------


def test_a_failing_step_fails_its_requests_and_the_engine_goes_on(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = engine._loop.runner.decode
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("injected failure")
        return real(*args, **kwargs)

    monkeypatch.setattr(engine._loop.runner, "decode", flaky)
    fin = final(run(engine, request(engine, PROMPTS[0], 4, max_new_tokens=6))[0])
    assert fin.finish_reason == "error" and "injected failure" in (fin.error or "")
    fin = final(run(engine, request(engine, PROMPTS[0], 4, max_new_tokens=6))[0])
    assert fin.finish_reason == "length"


def test_failing_prefill_or_loop_fails_only_the_affected_requests(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_prefill(*args, **kwargs):
        raise RuntimeError("prefill broke")

    with monkeypatch.context() as m:
        m.setattr(engine._loop.runner, "prefill", broken_prefill)
        fin = final(run(engine, request(engine, PROMPTS[0], 4, max_new_tokens=4))[0])
    assert fin.finish_reason == "error" and "prefill broke" in (fin.error or "")

    real_admit = engine._loop.admit
    calls = {"n": 0}

    def flaky_admit() -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("loop bug")
        real_admit()

    with monkeypatch.context() as m:
        m.setattr(engine._loop, "admit", flaky_admit)
        fin = final(run(engine, request(engine, PROMPTS[0], 4, max_new_tokens=4))[0])
    assert fin.finish_reason == "error" and "loop bug" in (fin.error or "")
    fin = final(run(engine, request(engine, PROMPTS[0], 4, max_new_tokens=4))[0])
    assert fin.finish_reason == "length"


def test_invalid_requests_are_refused(engine: Engine) -> None:
    with pytest.raises(ValueError, match="exit_layer"):
        run(engine, request(engine, PROMPTS[0], 9))
    with pytest.raises(ValueError, match="empty"):
        run(engine, GenerationRequest("empty", [], 4))


def test_info_stats_profile_and_shutdown(tiny_checkpoint: Path) -> None:
    eng = Engine.from_pretrained(tiny_checkpoint, EngineConfig(max_slots=3, max_seq_len=64))
    info = eng.info
    assert (info.num_layers, info.exits, info.max_seq_len) == (4, (1, 2, 3, 4), 64)
    assert info.device == "cpu" and info.dtype == "float32" and info.model_type == "llama"
    points = eng.measure_profile([1, 2, 8], prompt_tokens=8, decode_steps=2)
    assert [p.exit_layer for p in points] == [1, 2, 3, 4]
    assert all(set(p.decode_ms_by_batch) == {1, 2} for p in points)
    assert all(
        p.prefill_ms_per_token > 0 and min(p.decode_ms_by_batch.values()) > 0 for p in points
    )
    eng.start()
    assert len(eng.measure_profile([1], prompt_tokens=4, decode_steps=1)) == 4  # in the worker
    chat = eng.encode_chat([{"role": "user", "content": "Say hello."}])
    assert chat[0] == eng.tokenizer.bos_token_id and chat.count(eng.tokenizer.bos_token_id) == 1

    async def main() -> Events:
        task = asyncio.create_task(collect(eng, request(eng, PROMPTS[0], 4, max_new_tokens=50)))
        await asyncio.sleep(0.02)
        await asyncio.to_thread(eng.shutdown, 0.0)
        return await task

    fin = final(asyncio.run(main()))
    assert fin.finish_reason in ("cancelled", "length")
    with pytest.raises(EngineClosedError):
        run(eng, request(eng, PROMPTS[0], 4))
    assert eng.stats() == eng.stats().__class__(running=0, waiting=0, free_slots=3, max_slots=3)
