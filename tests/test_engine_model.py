"""The engine's forward against Hugging Face's reference, at every exit, with and without the cache.

The reference for exit ``k`` is ``lm_head(norm(hidden_states[k]))`` of the HF forward; for the last
layer HF's ``hidden_states[-1]`` already carries the final norm, so the reference is its logits.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from app.engine import linear
from app.engine.kv_cache import KVCache
from app.engine.loader import load_checkpoint
from app.engine.model import Transformer
from tests.tiny_checkpoint import make_tiny_checkpoint

ATOL = 2e-5
RTOL = 1e-4
PROMPT = "Once upon a time there was a little girl. Héllo wörld 🙂"

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}
CASES = {
    "llama": dict(model_type="llama"),
    "mistral": dict(model_type="mistral", num_kv_heads=1),
    "qwen2-untied-bias": dict(model_type="qwen2", tie_word_embeddings=False, num_kv_heads=4),
    "llama3-rope": dict(model_type="llama", rope_parameters=LLAMA3_ROPE),
    "yarn-rope": dict(
        model_type="qwen2",
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ),
    "dynamic-rope": dict(
        model_type="mistral",
        rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
    ),
    "linear-rope": dict(
        model_type="llama",
        rope_parameters={"rope_type": "linear", "rope_theta": 500.0, "factor": 4.0},
    ),
}


def _randomise_biases(folder: Path) -> None:
    """Qwen2 initialises its qkv biases to zero; make them matter."""
    path = folder / "model.safetensors"
    tensors = load_file(path)
    gen = torch.Generator().manual_seed(1)
    names = [n for n in tensors if n.endswith("_proj.bias")]
    assert names, "the qwen2 checkpoint should have qkv biases"
    for name in names:
        tensors[name] = torch.randn(tensors[name].shape, generator=gen)
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.fixture(scope="module", params=list(CASES))
def case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    name = request.param
    folder = make_tiny_checkpoint(tmp_path_factory.mktemp(name) / "ckpt", **CASES[name])
    if name.startswith("qwen2"):
        _randomise_biases(folder)
    ckpt = load_checkpoint(folder)
    ids = torch.tensor(ckpt.tokenizer(PROMPT).input_ids)
    hf = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.inference_mode():
        out = hf(ids[None], output_hidden_states=True)
        num_layers = hf.config.num_hidden_layers
        refs = {
            k: out.logits[0]
            if k == num_layers
            else hf.lm_head(hf.model.norm(out.hidden_states[k]))[0]
            for k in range(1, num_layers + 1)
        }
    model = Transformer.from_checkpoint(ckpt.hf_config, ckpt.tensors, 64, "cpu", torch.float32)
    return model, ids, refs, folder


def _new_cache(model: Transformer, slots: int = 4) -> KVCache:
    a = model.args
    return KVCache(a.num_layers, slots, a.num_kv_heads, 64, a.head_dim, "cpu", torch.float32)


def test_prefill_logits_match_reference_at_every_exit(case) -> None:
    model, ids, refs, _ = case
    assert len(ids) > 20
    with torch.inference_mode():
        for k, ref in refs.items():
            got = model.prefill(ids, k, all_logits=True)
            torch.testing.assert_close(got, ref, atol=ATOL, rtol=RTOL, msg=f"exit {k}")


def test_cached_decode_matches_reference_at_every_exit(case) -> None:
    model, ids, refs, _ = case
    start = 5
    with torch.inference_mode():
        for k, ref in refs.items():
            cache = _new_cache(model)
            model.prefill(ids[:start], k, cache, row=0)
            for pos in range(start, len(ids)):
                got = model.decode(ids[pos : pos + 1], torch.tensor([pos]), [1] * k, cache, pos + 1)
                torch.testing.assert_close(
                    got[0], ref[pos], atol=ATOL, rtol=RTOL, msg=f"exit {k} position {pos}"
                )


def test_one_decode_step_serves_rows_of_different_exits_and_lengths(case) -> None:
    """Rows ordered deepest first; layer l runs over the prefix of rows deeper than l."""
    model, ids, refs, _ = case
    _check_mixed_rows(model, ids, refs)


def test_packed_linears_match_reference(case, monkeypatch: pytest.MonkeyPatch) -> None:
    """The oneDNN packed path (used for large weights and several rows) keeps the maths."""
    _, ids, refs, folder = case
    monkeypatch.setattr(linear, "PACKED_MIN_NUMEL", 0)
    ckpt = load_checkpoint(folder)
    model = Transformer.from_checkpoint(ckpt.hf_config, ckpt.tensors, 64, "cpu", torch.float32)
    if not any(layer.qkv.packed is not None for layer in model.layers):
        pytest.skip("oneDNN packed linears are not available in this torch build")
    _check_mixed_rows(model, ids, refs)
    with torch.inference_mode():
        got = model.prefill(ids, model.args.num_layers, all_logits=True)
    torch.testing.assert_close(got, refs[model.args.num_layers], atol=ATOL, rtol=RTOL)


def _check_mixed_rows(model: Transformer, ids: torch.Tensor, refs: dict) -> None:
    num_layers = model.args.num_layers
    exits = [num_layers, num_layers, 2, 1]  # deepest first, as the engine keeps them
    starts = [7, 12, 4, 9]
    cache = _new_cache(model)
    with torch.inference_mode():
        for row, (k, start) in enumerate(zip(exits, starts, strict=True)):
            model.prefill(ids[:start], k, cache, row=row)
        rows_by_layer = [sum(1 for e in exits if e > layer) for layer in range(num_layers)]
        for step in range(6):
            pos = torch.tensor([s + step for s in starts])
            got = model.decode(ids[pos], pos, rows_by_layer, cache, int(pos.max()) + 1)
            for row, k in enumerate(exits):
                torch.testing.assert_close(
                    got[row], refs[k][pos[row]], atol=ATOL, rtol=RTOL, msg=f"row {row}"
                )


def test_kv_cache_row_moves_preserve_the_rows(case) -> None:
    model, ids, refs, _ = case
    cache = _new_cache(model)
    with torch.inference_mode():
        model.prefill(ids[:6], 2, cache, row=3)
        model.prefill(ids[:8], 1, cache, row=0)
        cache.move_rows([(3, 0, 2), (0, 1, 1)], 8)  # a swap-like permutation
        got = model.decode(ids[[6, 8]], torch.tensor([6, 8]), [2, 1], cache, 9)
    torch.testing.assert_close(got[0], refs[2][6], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(got[1], refs[1][8], atol=ATOL, rtol=RTOL)
