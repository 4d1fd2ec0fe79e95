"""Unit tests for the engine's pure parts: detokenisation, stop strings, sampling, row layout."""

from __future__ import annotations

import random

import pytest
import torch

from app.engine.detokenizer import IncrementalDecoder, StopMatcher
from app.engine.kv_cache import plan_rows
from app.engine.sampling import RowSampling, sample
from tests.tiny_checkpoint import make_tokenizer

# -- incremental detokenisation -------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def _decode(tokenizer):
    return lambda ids: tokenizer.decode(list(ids), skip_special_tokens=True)


@pytest.mark.parametrize("text", ["Héllo wörld 🙂🚀 日本語のテキスト", "naïve café — 0123"])
def test_incremental_decoder_never_splits_a_character(tokenizer, text: str) -> None:
    prompt = tokenizer("Say hello.").input_ids
    ids = tokenizer(text, add_special_tokens=False).input_ids
    decode = _decode(tokenizer)
    # The test only means something if some prefix of ids ends inside a character.
    assert any(decode(ids[:i]).endswith("\ufffd") for i in range(1, len(ids)))
    decoder = IncrementalDecoder(decode, prompt)
    chunks = [decoder.add(t) for t in ids]
    assert all("\ufffd" not in c for c in chunks)
    assert "" in chunks  # something was held back
    assert "".join(chunks) + decoder.flush() == text


def test_incremental_decoder_flushes_an_invalid_tail(tokenizer) -> None:
    ids = tokenizer("🙂", add_special_tokens=False).input_ids
    partial = next(i for i in range(1, len(ids) + 1) if _decode(tokenizer)(ids[:i]) == "\ufffd")
    decoder = IncrementalDecoder(_decode(tokenizer), [])
    assert "".join(decoder.add(t) for t in ids[:partial]) == ""
    assert decoder.flush() == "\ufffd"


# -- stop strings ----------------------------------------------------------------------------------


def _run(stop: list[str], chunks: list[str]) -> tuple[list[str], StopMatcher]:
    matcher = StopMatcher(stop)
    sent = []
    for chunk in chunks:
        sent.append(matcher.push(chunk))
        if matcher.stopped:
            break
    return sent, matcher


def test_stop_string_across_chunks_is_cut_and_never_leaks() -> None:
    sent, matcher = _run(["END"], ["Hello E", "N", "D and more"])
    assert matcher.stopped
    assert sent == ["Hello ", "", ""]
    assert matcher.text == "Hello "


def test_partial_match_is_released_when_it_does_not_complete() -> None:
    sent, matcher = _run(["END"], ["Hello E", "N", "o"])
    assert not matcher.stopped
    assert sent == ["Hello ", "", "ENo"]


def test_partial_match_is_flushed_at_the_end() -> None:
    sent, matcher = _run(["###"], ["a#", "#"])
    assert sent == ["a", ""]
    assert matcher.flush() == "##"


def test_earliest_of_several_stops_wins() -> None:
    sent, matcher = _run(["xyz", "b"], ["aaxyzb"])
    assert "".join(sent) == "aa"
    assert matcher.stopped and matcher.text == "aa"


def test_stop_at_the_very_start_gives_empty_text() -> None:
    sent, matcher = _run(["\n"], ["\nhello"])
    assert matcher.stopped and sent == [""] and matcher.text == ""


def test_no_stop_strings_pass_text_through() -> None:
    sent, matcher = _run([], ["a", "b"])
    assert sent == ["a", "b"] and not matcher.stopped


# -- sampling --------------------------------------------------------------------------------------


def _logits(rows: int = 3, vocab: int = 50, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_rows_take_the_argmax() -> None:
    logits = _logits()
    assert sample(logits, []).tolist() == logits.argmax(-1).tolist()


def test_top_k_one_and_tiny_top_p_are_greedy() -> None:
    logits = _logits()
    rows = [
        (0, RowSampling(1.0, 1, 1.0, 0.99)),
        (1, RowSampling(2.0, 0, 1e-6, 0.99)),
    ]
    out = sample(logits, rows).tolist()
    assert out[:2] == logits.argmax(-1).tolist()[:2]


def test_inverse_cdf_follows_temperature_softmax() -> None:
    logits = _logits(1)
    probs = torch.softmax(logits[0] / 0.7, -1)
    order = torch.argsort(probs, descending=True)
    cdf = probs[order].cumsum(0)
    for u in (0.0, 0.3, 0.6, 0.95):
        want = order[int(torch.searchsorted(cdf, torch.tensor(u), right=True))].item()
        got = sample(logits, [(0, RowSampling(0.7, 0, 1.0, u))]).item()
        assert got == want


def test_top_k_and_top_p_restrict_the_support() -> None:
    logits = _logits(1, vocab=200)
    top5 = set(torch.topk(logits[0], 5).indices.tolist())
    rng = random.Random(0)
    seen_k = {
        sample(logits, [(0, RowSampling(3.0, 5, 1.0, rng.random()))]).item() for _ in range(200)
    }
    assert seen_k <= top5 and len(seen_k) > 1
    probs = torch.softmax(logits[0], -1)
    sorted_probs, order = torch.sort(probs, descending=True)
    nucleus = int((sorted_probs.cumsum(0) < 0.5).sum()) + 1
    allowed = set(order[:nucleus].tolist())
    seen_p = {
        sample(logits, [(0, RowSampling(1.0, 0, 0.5, rng.random()))]).item() for _ in range(200)
    }
    assert seen_p <= allowed


def test_sampled_and_greedy_rows_mix_in_one_batch() -> None:
    logits = _logits(3)
    alone = sample(logits[1:2], [(0, RowSampling(1.0, 0, 1.0, 0.42))]).item()
    mixed = sample(logits, [(1, RowSampling(1.0, 0, 1.0, 0.42))]).tolist()
    assert mixed[1] == alone
    assert mixed[0] == logits[0].argmax().item() and mixed[2] == logits[2].argmax().item()


# -- row layout ------------------------------------------------------------------------------------


def _check_layout(current: list[int], exits: list[int]) -> list[int]:
    new = plan_rows(current, exits)
    assert sorted(new) == list(range(len(current)))
    by_row = [exits[new.index(r)] for r in range(len(current))]
    assert by_row == sorted(exits, reverse=True)
    return new


def test_layout_groups_rows_by_exit_deepest_first() -> None:
    _check_layout([0, 1, 2, 3, 4], [3, 12, 6, 12, 3])


def test_layout_moves_few_rows_when_one_joins() -> None:
    # Rows 0..3 laid out (12, 9, 6, 3); a new exit-12 request was prefilled into row 4.
    current, exits = [0, 1, 2, 3, 4], [12, 9, 6, 3, 12]
    new = _check_layout(current, exits)
    moved = sum(1 for c, n in zip(current, new, strict=True) if c != n)
    assert moved <= 4  # one per shallower exit group plus the newcomer
    assert new[0] == 0


def test_layout_after_a_leave_and_a_lowered_exit() -> None:
    new = _check_layout([0, 2, 3], [12, 6, 9])  # row 1 left; row 3 is deeper than row 2
    assert new[0] == 0
    assert _check_layout([], []) == []
