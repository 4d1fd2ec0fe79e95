"""Weight formats (``--weights``): every kernel against its own dequantized weight, every format's
per-exit logits against the float32 reference, the start-up choice, its cache and its errors.

Tolerances (relative: ``|got - want| / |want|`` over an exit's logits, L2 norms):

- a kernel against ``x @ dequantized(W).T``, and a quantized model against the float32 model of its
  dequantized weights: 3e-2 (the int8/int4 kernels take bfloat16 activations: ~0.4 % a rounding);
- a format against the float32 reference on these tiny random models: bfloat16 3e-2, int8 8e-2,
  int4 0.6. Random weights are the worst case for 4 bits (no outliers to share a scale with, every
  error compounds); the real model's cost per exit is measured by ``bench quality``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from app.engine import (
    Engine,
    EngineConfig,
    GenerationRequest,
    SamplingParams,
    kernel_cache,
    kernels,
)
from app.engine.kernels import WeightFormatError, candidates, choose_kernel, usable_formats
from app.engine.kv_cache import KVCache
from app.engine.linear import Linear
from app.engine.loader import load_checkpoint
from app.engine.quantize import dequantize_int4, quantize_int4, quantize_int8
from app.engine.weights import HEAD_FORMATS, build_model
from tests.tiny_checkpoint import make_tiny_checkpoint

CPU = torch.device("cpu")
F32 = torch.float32
PROMPT = "Once upon a time there was a little girl. Héllo wörld 🙂"
KERNEL_TOL = 3e-2
VS_FLOAT32 = {"float32": 1e-6, "bfloat16": 3e-2, "int8": 8e-2, "int4": 0.6}
FORMATS = usable_formats(CPU, F32)
KERNEL_NAME = {"float32": "float32", "bfloat16": "bfloat16", "int8": "int8pack", "int4": "int4pack"}


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def test_the_cpu_formats_all_have_a_kernel() -> None:
    # torch's CPU build has packed int8 and int4 weight-only ops; if one goes missing, say so
    assert FORMATS == ["float32", "bfloat16", "int8", "int4"]


@pytest.mark.parametrize("fmt", ["float32", "bfloat16", "int8", "int4"])
@pytest.mark.parametrize("shape", [(96, 64), (40, 96), (50, 32)])  # 40, 50: int4 pads the rows
@pytest.mark.parametrize("scaled", [False, True])
def test_every_candidate_kernel_matches_its_dequantized_weight(fmt, shape, scaled) -> None:
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(*shape, generator=gen)
    bias = torch.randn(shape[0], generator=gen)
    # a norm weight with an outlier channel, as real checkpoints have
    in_scale = torch.rand(shape[1], generator=gen) + 0.5 if scaled else None
    if in_scale is not None:
        in_scale[3] = 20.0
    for candidate in candidates(fmt, CPU, F32, pack=True):
        linear = candidate.make(weight, bias, True, in_scale)
        dense = linear.dequantized()  # what the layer multiplies x by, the input scale included
        assert dense.shape == shape and linear.out_features == shape[0]
        folded = weight * in_scale if in_scale is not None else weight
        assert _rel(dense, folded) < {"float32": 1e-6, "bfloat16": 1e-2}.get(fmt, 0.2)
        for rows in (1, 5):
            x = torch.randn(rows, shape[1], generator=gen)
            residual = torch.randn(rows, shape[0], generator=gen)
            want = x @ dense.t() + bias
            got = linear(x)
            assert got.dtype == F32 and got.shape == want.shape
            assert _rel(got, want) < KERNEL_TOL, candidate.name
            assert _rel(linear.add(x, residual), want + residual) < KERNEL_TOL, candidate.name


def test_quantizers_round_trip_within_their_step() -> None:
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    q8, s8 = quantize_int8(w)
    assert q8.dtype == torch.int8 and int(q8.abs().max()) <= 127
    assert ((q8.float() * s8[:, None] - w).abs() <= s8[:, None] / 2 + 1e-6).all()
    q4, s4, low = quantize_int4(w)
    assert int(q4.min()) >= 0 and int(q4.max()) <= 15 and s4.shape == (32, 2)
    step = s4.repeat_interleave(32, dim=1)
    assert ((dequantize_int4(q4, s4, low) - w).abs() <= step / 2 + 1e-5).all()
    with pytest.raises(ValueError, match="divisible by 32"):
        quantize_int4(torch.randn(8, 48))


def _randomise_biases(folder: Path) -> None:
    path = folder / "model.safetensors"
    tensors = load_file(path)
    gen = torch.Generator().manual_seed(1)
    for name in [n for n in tensors if n.endswith("_proj.bias")]:
        tensors[name] = torch.randn(tensors[name].shape, generator=gen)
    save_file(tensors, path, metadata={"format": "pt"})


CASES = {
    "llama": dict(model_type="llama"),
    "qwen2-untied-bias": dict(model_type="qwen2", tie_word_embeddings=False, num_kv_heads=4),
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    folder = make_tiny_checkpoint(
        tmp_path_factory.mktemp(request.param) / "ckpt", **CASES[request.param]
    )
    if request.param.startswith("qwen2"):
        _randomise_biases(folder)
    ids = torch.tensor(load_checkpoint(folder).tokenizer(PROMPT).input_ids)
    return folder, ids, _model(folder, "float32")


def _model(folder: Path, fmt: str):
    ckpt = load_checkpoint(folder)
    return build_model(ckpt.hf_config, ckpt.tensors, 64, "cpu", F32, weights=fmt)


def _exits(model, ids: torch.Tensor) -> dict[int, torch.Tensor]:
    with torch.inference_mode():
        return {
            k: model.prefill(ids, k, all_logits=True) for k in range(1, model.args.num_layers + 1)
        }


def _linears(model) -> list:
    return [model.head, *(getattr(layer, n) for layer in model.layers for n in vars(layer))]


def _fake_quantized(model, quantized, fmt: str):
    """The float32 ``model`` whose (dense, norm-folded) weights are replaced by what ``fmt``
    stores: int formats quantize the weight without the norm weight (``in_scale``)."""
    round_trips = {
        "bfloat16": lambda w: w.bfloat16().float(),
        "int8": lambda w: (lambda q, s: q.float() * s[:, None])(*quantize_int8(w)),
        "int4": lambda w: dequantize_int4(*quantize_int4(w)),
    }
    for linear, stored in zip(_linears(model), _linears(quantized), strict=True):
        assert isinstance(linear, Linear) and linear.packed is None
        is_head = linear is model.head  # int4 keeps its head in int8 (weights.HEAD_FORMATS)
        round_trip = round_trips[HEAD_FORMATS.get(fmt, fmt) if is_head else fmt]
        scale = getattr(stored, "in_scale", None)
        w = linear.weight_t.t()
        w = round_trip(w / scale) * scale if scale is not None else round_trip(w)
        linear.weight_t = w.t().contiguous()
    return model


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_matches_the_float32_reference_at_every_exit(case, fmt) -> None:
    folder, ids, reference = case
    model = _model(folder, fmt)
    assert KERNEL_NAME[fmt] in model.layers[0].qkv.kernel
    assert KERNEL_NAME[HEAD_FORMATS.get(fmt, fmt)] in model.head.kernel  # int4: an int8 head
    got, want = _exits(model, ids), _exits(reference, ids)
    for k in want:
        assert _rel(got[k], want[k]) < VS_FLOAT32[fmt], f"{fmt} exit {k}"
    if fmt != "float32":  # tighter: the kernels compute what the stored weights say
        fake = _exits(_fake_quantized(_model(folder, "float32"), model, fmt), ids)
        for k in want:
            assert _rel(got[k], fake[k]) < KERNEL_TOL, f"{fmt} exit {k} vs its dequantized model"


@pytest.mark.parametrize("fmt", [f for f in FORMATS if f != "float32"])
def test_cached_decode_in_every_format_matches_its_prefill(case, fmt) -> None:
    folder, ids, _ = case
    model = _model(folder, fmt)
    a = model.args
    full = _exits(model, ids)
    start = 5
    with torch.inference_mode():
        for k in full:
            cache = KVCache(a.num_layers, 2, a.num_kv_heads, 64, a.head_dim, "cpu", F32)
            model.prefill(ids[:start], k, cache, row=0)
            for pos in range(start, len(ids)):
                got = model.decode(ids[pos : pos + 1], torch.tensor([pos]), [1] * k, cache, pos + 1)
                assert _rel(got[0], full[k][pos]) < KERNEL_TOL, f"{fmt} exit {k} position {pos}"


def test_a_format_without_a_kernel_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(*args, **kwargs):
        raise RuntimeError("Could not run 'aten::_weight_int4pack_mm_for_cpu' with arguments")

    monkeypatch.setattr(kernels, "int4_linear", missing)
    with pytest.raises(WeightFormatError) as info:
        choose_kernel("int4", CPU, F32, [(64, 64)], 2, pack=False)
    message = str(info.value)
    assert "\n" not in message and message.startswith("--weights int4 cannot run on cpu")
    assert "_weight_int4pack_mm_for_cpu" in message
    assert message.endswith("Formats that work here: float32, bfloat16, int8")


def test_a_device_without_candidates_names_the_formats_that_work(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = kernels.candidates
    monkeypatch.setattr(
        kernels, "candidates", lambda fmt, *a: [] if fmt in ("int8", "int4") else real(fmt, *a)
    )
    with pytest.raises(WeightFormatError) as info:
        choose_kernel("int8", CPU, F32, [(64, 64)], 2, pack=False)
    assert str(info.value) == (
        "--weights int8 cannot run on cpu: no int8 kernel is offered for cpu (the packed "
        "int8/int4 ops used are torch's CPU ones). Formats that work here: float32, bfloat16"
    )


def test_the_choice_is_timed_once_then_cached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kernel_cache, "_MEMORY", {})
    monkeypatch.setattr(kernels, "TIME_BUDGET_S", 0.01)
    shapes = [(96, 64), (64, 64)]
    first, kernel = choose_kernel("int8", CPU, F32, shapes, 2, pack=False, cache_dir=tmp_path)
    assert first.source == "measured" and kernel.name == first.kernel
    assert set(first.ms_per_layer) == {c.name for c in candidates("int8", CPU, F32, False)} | {
        "mm/float32"
    }
    assert len(list(tmp_path.glob("kernels-*.json"))) == 1
    monkeypatch.setattr(kernel_cache, "_MEMORY", {})  # a new process: read from disk
    again, _ = choose_kernel("int8", CPU, F32, shapes, 2, pack=False, cache_dir=tmp_path)
    assert again.source == "cache" and again.kernel == first.kernel
    assert choose_kernel("float32", CPU, F32, shapes, 2, pack=False)[0].source == "only"


def test_engine_serves_int4_and_reports_it(case) -> None:
    folder, _, _ = case
    config = EngineConfig(max_slots=1, max_seq_len=64, weights="int4")
    engine = Engine.from_pretrained(folder, config)
    assert engine.info.weights == "int4"
    assert engine.info.weight_kernel.startswith("_weight_int4pack_mm_for_cpu")
    engine.start()
    try:
        request = GenerationRequest(
            request_id="q",
            prompt_ids=engine.encode(PROMPT),
            exit_layer=engine.info.num_layers,
            sampling=SamplingParams(max_new_tokens=4, ignore_eos=True),
        )
        import asyncio

        async def collect() -> list:
            return [event async for event in engine.generate(request)]

        events = asyncio.run(collect())
        assert events[-1].finish_reason == "length" and len(events) == 5
    finally:
        engine.shutdown(1.0)
    default = Engine.from_pretrained(folder, EngineConfig(max_slots=1, max_seq_len=64))
    assert default.info.weights == "float32"


def test_engine_config_rejects_an_unknown_format() -> None:
    with pytest.raises(ValueError, match="weights must be one of"):
        EngineConfig(weights="int3")


def test_serve_flag_reaches_the_engine_and_the_metrics(case, tmp_path: Path) -> None:
    import argparse

    from app.api.lifespan import load_engine
    from app.api.metrics import Metrics
    from app.api.serve_cli import add_arguments, settings_from_args

    folder, _, _ = case
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--model", str(folder), "--weights", "int8", "--max-batch-size", "1"])
    settings = settings_from_args(args).model_copy(update={"profile_cache_dir": tmp_path})
    assert settings.weights == "int8"
    engine = load_engine(settings, lambda report: None)
    assert engine.info.weights == "int8" and "int8pack" in engine.info.weight_kernel
    metrics = Metrics()
    metrics.declare_weights(engine.info.weights, engine.info.weight_kernel)
    text = metrics.render().decode()
    assert (
        f'sortedserve_weights_info{{kernel="{engine.info.weight_kernel}",weights="int8"}} 1.0'
        in text
    )
