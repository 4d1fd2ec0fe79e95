"""Log-probabilities from the engine against Hugging Face's reference forward, at a shallow exit
and at full depth: the prompt's (echo) and the generated tokens', the raw distribution whatever
the sampling; plus the pure parts (token texts, OpenAI's legacy ``logprobs`` object)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from app.api.routes.openai_shapes import legacy_logprobs
from app.engine import (
    Alternative,
    Engine,
    EngineConfig,
    FinalEvent,
    GenerationRequest,
    SamplingParams,
    TokenEvent,
    TokenLogprob,
)
from app.engine.detokenizer import IncrementalDecoder

PROMPT = "Once upon a time there was a little girl. Héllo wörld 🙂"
TOP = 3
ATOL = 1e-4


@pytest.fixture(scope="module")
def engine(tiny_checkpoint: Path) -> Iterator[Engine]:
    eng = Engine.from_pretrained(
        tiny_checkpoint, EngineConfig(device="cpu", max_slots=4, max_seq_len=128)
    )
    eng.start()
    yield eng
    eng.shutdown(timeout_s=1.0)


@pytest.fixture(scope="module")
def hf(tiny_checkpoint: Path):
    return AutoModelForCausalLM.from_pretrained(tiny_checkpoint).eval()


def reference_logprobs(hf, ids: list[int], exit_layer: int) -> torch.Tensor:
    """``log_softmax(lm_head(norm(h_k)))`` at every position of ``ids`` (HF's logits at full
    depth, where ``hidden_states[-1]`` already carries the final norm)."""
    with torch.inference_mode():
        out = hf(torch.tensor([ids]), output_hidden_states=True)
        if exit_layer == hf.config.num_hidden_layers:
            logits = out.logits[0]
        else:
            logits = hf.lm_head(hf.model.norm(out.hidden_states[exit_layer]))[0]
    return torch.log_softmax(logits.float(), dim=-1)


def run(engine: Engine, *requests: GenerationRequest) -> list[list[TokenEvent | FinalEvent]]:
    async def collect(req: GenerationRequest) -> list[TokenEvent | FinalEvent]:
        return [e async for e in engine.generate(req)]

    async def main() -> list[list[TokenEvent | FinalEvent]]:
        return list(await asyncio.gather(*(collect(r) for r in requests)))

    return asyncio.run(main())


def check_record(record: TokenLogprob, ref: torch.Tensor, token: int) -> None:
    """``record`` of ``token`` against the reference log-probabilities ``ref [vocab]``."""
    assert record.token_id == token
    assert record.logprob == pytest.approx(float(ref[token]), abs=ATOL)
    values, ids = ref.topk(TOP)
    assert [a.logprob for a in record.top] == pytest.approx(values.tolist(), abs=ATOL)
    for alt in record.top:  # (ids may swap only where two values tie)
        assert alt.logprob == pytest.approx(float(ref[alt.token_id]), abs=ATOL)
    assert {a.token_id for a in record.top} <= set(ids.tolist()) | {
        i for i in range(ref.shape[0]) if abs(float(ref[i]) - float(values[-1])) < ATOL
    }


@pytest.mark.parametrize("exit_layer", [1, 4])
def test_prompt_and_generated_logprobs_match_the_reference(
    engine: Engine, hf, exit_layer: int
) -> None:
    ids = engine.encode(PROMPT)
    greedy = GenerationRequest(
        "greedy",
        ids,
        exit_layer,
        SamplingParams(max_new_tokens=6, ignore_eos=True, logprobs=TOP, prompt_logprobs=TOP),
    )
    # sampled at a low temperature, at the same time (one batch): still the raw distribution
    sampled = GenerationRequest(
        "sampled",
        ids,
        exit_layer,
        SamplingParams(max_new_tokens=6, temperature=0.5, seed=3, ignore_eos=True, logprobs=TOP),
    )
    plain = GenerationRequest("plain", ids, 5 - exit_layer, SamplingParams(max_new_tokens=6))
    events, sampled_events, plain_events = run(engine, greedy, sampled, plain)
    fin = events[-1]
    assert isinstance(fin, FinalEvent) and fin.completion_tokens == 6
    generated = [e.token_id for e in events if isinstance(e, TokenEvent)]
    ref = reference_logprobs(hf, ids + generated, exit_layer)

    prompt = fin.prompt_logprobs
    assert prompt is not None and len(prompt) == len(ids)
    assert prompt[0] == TokenLogprob(ids[0], prompt[0].text, None)
    for i in range(1, len(ids)):
        check_record(prompt[i], ref[i - 1], ids[i])
    assert "".join(r.text for r in prompt) == engine.tokenizer.decode(ids, skip_special_tokens=True)

    assert fin.logprobs is not None and len(fin.logprobs) == 6
    for j, (record, token) in enumerate(zip(fin.logprobs, generated, strict=True)):
        check_record(record, ref[len(ids) + j - 1], token)
        assert token == int(ref[len(ids) + j - 1].argmax())  # greedy
    assert "".join(r.text for r in fin.logprobs) == fin.text
    token_events = [e for e in events if isinstance(e, TokenEvent)]
    assert [e.logprobs for e in token_events] == list(fin.logprobs)
    assert token_events[0].prompt_logprobs == prompt
    assert all(e.prompt_logprobs is None for e in token_events[1:])

    sampled_fin = sampled_events[-1]
    assert isinstance(sampled_fin, FinalEvent) and sampled_fin.prompt_logprobs is None
    chosen = [e.token_id for e in sampled_events if isinstance(e, TokenEvent)]
    ref_sampled = reference_logprobs(hf, ids + chosen, exit_layer)
    for j, (record, token) in enumerate(zip(sampled_fin.logprobs or (), chosen, strict=True)):
        check_record(record, ref_sampled[len(ids) + j - 1], token)

    plain_fin = plain_events[-1]
    assert isinstance(plain_fin, FinalEvent)
    assert plain_fin.logprobs is None and plain_fin.prompt_logprobs is None
    assert all(e.logprobs is None for e in plain_events if isinstance(e, TokenEvent))


def test_max_new_tokens_zero_scores_the_prompt_only(engine: Engine, hf) -> None:
    ids = engine.encode(PROMPT)
    req = GenerationRequest("score", ids, 2, SamplingParams(max_new_tokens=0, prompt_logprobs=0))
    (events,) = run(engine, req)
    assert len(events) == 1
    fin = events[0]
    assert isinstance(fin, FinalEvent)
    assert fin.finish_reason == "length" and fin.completion_tokens == 0 and fin.text == ""
    assert fin.prompt_tokens == len(ids) and fin.prompt_logprobs is not None
    ref = reference_logprobs(hf, ids, 2)
    for i, record in enumerate(fin.prompt_logprobs[1:], start=1):
        assert record.top == ()
        assert record.logprob == pytest.approx(float(ref[i - 1, ids[i]]), abs=ATOL)
    assert engine.stats().running == 0 and engine.stats().free_slots == 4


def test_engine_refuses_bad_logprob_requests(engine: Engine) -> None:
    ids = engine.encode("Hi")
    with pytest.raises(ValueError, match="max_new_tokens"):
        run(engine, GenerationRequest("a", ids, 4, SamplingParams(max_new_tokens=0)))
    with pytest.raises(ValueError, match="logprobs"):
        run(engine, GenerationRequest("b", ids, 4, SamplingParams(logprobs=-1)))


# -- pure parts ------------------------------------------------------------------------------------


def test_peek_shows_what_each_candidate_would_add() -> None:
    pieces = {1: "a", 2: "b", 3: "\ufffd"}

    def decode(ids) -> str:
        text = "".join(pieces[i] for i in ids)
        return text.replace("\ufffdb", "é")  # 3 then 2: one character in two tokens

    dec = IncrementalDecoder(decode, [1])
    assert dec.peek([1, 2]) == ["a", "b"] and dec.peek([]) == []
    assert dec.add(3) == ""  # held back: an incomplete character
    assert dec.peek([2, 1]) == ["é", "\ufffda"]
    assert dec.add(2) == "é"


def test_legacy_logprobs_object() -> None:
    prompt = (
        TokenLogprob(5, "", None),
        TokenLogprob(6, "Hi", -1.5, (Alternative(7, "Ho", -0.5), Alternative(8, "Ho", -0.7))),
    )
    made = (TokenLogprob(9, " there", -float("inf"), (Alternative(9, " there", -float("inf")),)),)
    out = legacy_logprobs([(0, prompt), (2, made)])
    assert out == {
        "tokens": ["", "Hi", " there"],
        "token_logprobs": [None, -1.5, -9999.0],
        "top_logprobs": [None, {"Ho": -0.5, "Hi": -1.5}, {" there": -9999.0}],
        "text_offset": [0, 0, 2],
    }
