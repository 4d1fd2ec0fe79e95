"""An adapter served in an integer format: the base quantized, the LoRA update as a float side path.

The fixture is what the real default is: a base whose linear weights are exactly 4-bit values (as a
GGUF Q4_1 base's are), a PEFT LoRA adapter on all seven projections whose update is well below one
int4 step, and trained norms. Checked at every exit:

- the factors the loader keeps reproduce PEFT's own merge;
- int8/int4 with the side path compute what their stored weights say (quantized base + update);
- int4 with the side path is closer to the float32 merged model than int4 of the merged weights
  (which rounds the update away: the reason the side path exists).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from app.engine import Engine, EngineConfig
from app.engine.linear import WeightOnlyLinear
from app.engine.loader import load_checkpoint
from app.engine.quantize import dequantize_int4, quantize_int4, quantize_int8
from app.engine.side_path import AdapterFactors, SidePath, fused_side_path
from app.engine.weights import HEAD_FORMATS, _rotary_rows, build_model
from tests.tiny_checkpoint import make_tiny_checkpoint

F32 = torch.float32
KERNEL_TOL = 3e-2  # bfloat16 activations in the int kernels
UPDATE_IN_STEPS = 0.2  # the update's size, in int4 steps of the base (the default's: ~0.05)


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


@pytest.fixture(scope="module")
def adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from app.training.lora import wrap_lora

    root = tmp_path_factory.mktemp("side-path")
    base = make_tiny_checkpoint(root / "base", num_layers=4, hidden_size=64, intermediate_size=128)
    # the base's projections and (tied) head become exact 4-bit values, as a GGUF Q4_1 base's are
    path = base / "model.safetensors"
    tensors = load_file(path)
    for name in [n for n in tensors if n.endswith(("_proj.weight", "embed_tokens.weight"))]:
        tensors[name] = dequantize_int4(*quantize_int4(tensors[name])).contiguous()
    save_file(tensors, path, metadata={"format": "pt"})

    model = AutoModelForCausalLM.from_pretrained(base, dtype=F32)
    peft_model = wrap_lora(model, rank=4)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, module in peft_model.named_modules():
            if hasattr(module, "lora_B") and "default" in getattr(module, "lora_B", {}):
                weight = module.base_layer.weight
                step = (weight.amax() - weight.amin()) / 15 / 4  # about a group's int4 step
                b, a = module.lora_B["default"].weight, module.lora_A["default"].weight
                b.copy_(torch.randn(b.shape, generator=gen))
                update = (b @ a) * module.scaling["default"]
                b.mul_(UPDATE_IN_STEPS * step / update.abs().mean())
            elif name.endswith("norm.modules_to_save.default"):
                module.weight.add_(0.2 * torch.randn(module.weight.shape, generator=gen))
    folder = root / "adapter"
    peft_model.save_pretrained(folder)
    for file in base.glob("tokenizer*"):  # an adapter folder carries its tokenizer
        (folder / file.name).write_bytes(file.read_bytes())
    sorted_meta = json.loads((base / "sorted.json").read_text())
    sorted_meta["training"] = {"base": {"path": str(base)}}
    (folder / "sorted.json").write_text(json.dumps(sorted_meta))
    return folder


def _exits(model, ids: torch.Tensor) -> dict[int, torch.Tensor]:
    with torch.inference_mode():
        return {
            k: model.prefill(ids, k, all_logits=True) for k in range(1, model.args.num_layers + 1)
        }


def _build(ckpt, fmt: str, adapter: AdapterFactors | None):
    return build_model(ckpt.hf_config, ckpt.tensors, 64, "cpu", F32, weights=fmt, adapter=adapter)


def _ids(ckpt) -> torch.Tensor:
    return torch.tensor(ckpt.tokenizer("Once upon a time there was a little girl.").input_ids)


def test_kept_factors_reproduce_peft_merge(adapter: Path) -> None:
    ckpt = load_checkpoint(adapter, keep_adapter=True)
    factors = ckpt.adapter
    assert factors is not None and len(factors.a) == 4 * 7  # seven projections per layer
    for name in factors.a:
        merged = ckpt.tensors[name]
        rebuilt = factors.base[name] + factors.b[name] @ factors.a[name]
        assert torch.allclose(rebuilt, merged, atol=1e-6), name
        assert not torch.equal(factors.base[name], merged), f"{name}: the update is missing"
    assert load_checkpoint(adapter).adapter is None  # only kept when asked


def test_fused_side_path_is_block_diagonal_in_the_fused_order() -> None:
    gen = torch.Generator().manual_seed(0)
    f = AdapterFactors()
    for name, out in (("q", 6), ("v", 2)):
        f.a[name] = torch.randn(3, 5, generator=gen)
        f.b[name] = torch.randn(out, 3, generator=gen)
    rows = torch.tensor([1, 0, 2, 3, 4, 5, 6, 7, 8, 9])
    side = fused_side_path(f, ["q", "k", "v"], [6, 2, 2], rows)
    assert side is not None
    want = torch.cat([f.b["q"] @ f.a["q"], torch.zeros(2, 5), f.b["v"] @ f.a["v"]])[rows]
    assert torch.allclose(side.dense(), want, atol=1e-6)
    assert fused_side_path(f, ["k"], [2]) is None


ROUND_TRIP = {
    "int8": lambda w: (lambda q, s: q.float() * s[:, None])(*quantize_int8(w)),
    "int4": lambda w: dequantize_int4(*quantize_int4(w)),
}


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_side_path_computes_the_quantized_base_plus_the_update(adapter: Path, fmt: str) -> None:
    ckpt = load_checkpoint(adapter, keep_adapter=True)
    ids = _ids(ckpt)
    model = _build(ckpt, fmt, ckpt.adapter)
    # the float32 model of what the int model stores: round-tripped base weights plus the update
    dense = build_model(
        ckpt.hf_config, {**ckpt.tensors, **ckpt.adapter.base}, 64, "cpu", F32, weights="float32"
    )
    pairs = [(dense.head, model.head)]  # the head has no update, but is quantized too (int8)
    factors: dict[int, SidePath] = {}
    for i, (layer, stored) in enumerate(zip(dense.layers, model.layers, strict=True)):
        pairs += [(getattr(layer, n), getattr(stored, n)) for n in vars(layer)]
        for n, side in _layer_sides(ckpt.adapter, model.args, i).items():
            factors[id(getattr(stored, n))] = side
    for lin, q in pairs:
        assert isinstance(q, WeightOnlyLinear) and (q.side_b is not None or q is model.head)
        scale = q.in_scale if q.in_scale is not None else 1.0
        head_fmt = HEAD_FORMATS.get(fmt, fmt) if q is model.head else fmt
        base = ROUND_TRIP[head_fmt](lin.weight_t.t() / scale)  # the float32 build folded it in
        if q.side_b is not None:  # A is stored like the base (extra rows), B in float
            a = factors[id(q)].a_t.t()
            base = base + q.side_b.t() @ ROUND_TRIP[fmt](a)
        lin.weight_t = (base * scale).t().contiguous()
    got, want = _exits(model, ids), _exits(dense, ids)
    for k in want:
        assert _rel(got[k], want[k]) < KERNEL_TOL, f"{fmt} exit {k}"


def _layer_sides(adapter: AdapterFactors, args, i: int) -> dict[str, SidePath]:
    """Layer ``i``'s fused side paths, as the engine fuses them (q/k/v rows in rotary order)."""
    q_dim, kv_dim = args.num_heads * args.head_dim, args.num_kv_heads * args.head_dim
    hd, inter = args.hidden_size, args.intermediate_size
    att, mlp = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
    qkv = [att + p + ".weight" for p in ("q_proj", "k_proj", "v_proj")]
    sides = {
        "qkv": fused_side_path(adapter, qkv, [q_dim, kv_dim, kv_dim], _rotary_rows(args)),
        "o": fused_side_path(adapter, [att + "o_proj.weight"], [hd]),
        "gate_up": fused_side_path(
            adapter, [mlp + "gate_proj.weight", mlp + "up_proj.weight"], [inter] * 2
        ),
        "down": fused_side_path(adapter, [mlp + "down_proj.weight"], [hd]),
    }
    assert all(side is not None for side in sides.values())
    return sides  # type: ignore[return-value]


def test_int4_side_path_keeps_the_update_that_merged_int4_loses(adapter: Path) -> None:
    ckpt = load_checkpoint(adapter, keep_adapter=True)
    ids = _ids(ckpt)
    reference = _exits(_build(ckpt, "float32", None), ids)
    side = _exits(_build(ckpt, "int4", ckpt.adapter), ids)
    merged = _exits(_build(ckpt, "int4", None), ids)
    for k in reference:
        kept, lost = _rel(side[k], reference[k]), _rel(merged[k], reference[k])
        assert kept < KERNEL_TOL and kept < 0.5 * lost, f"exit {k}: side {kept:.4f}, {lost:.4f}"


def test_engine_serves_an_adapter_in_int4_with_the_side_path(adapter: Path) -> None:
    engine = Engine.from_pretrained(
        adapter, EngineConfig(max_slots=1, max_seq_len=64, weights="int4")
    )
    assert engine.info.weights == "int4"
    layer = engine._loop.runner.model.layers[0]
    assert all(getattr(layer, n).side_b is not None for n in vars(layer))
    plain = Engine.from_pretrained(adapter, EngineConfig(max_slots=1, max_seq_len=64))
    layer = plain._loop.runner.model.layers[0]
    assert plain.info.weights == "float32" and not hasattr(layer.qkv, "side_b")


def test_bench_quality_scores_the_side_path_and_names_both_kernels(
    adapter: Path, tmp_path: Path
) -> None:
    from app.bench.quality_formats import score_formats

    data = tmp_path / "heldout.json"
    story = {"input": "", "output": "Once upon a time there was a little girl."}
    rows = [{"instruction": f"Tell story number {i}.", **story} for i in range(3)]
    data.write_text(json.dumps(rows))
    result = score_formats(adapter, data, ["int4"], None, 250)
    assert result["kernels"]["int4"].startswith("_weight_int4pack_mm_for_cpu")
    assert result["head_kernels"]["int4"].startswith("_weight_int8pack_mm")  # HEAD_FORMATS
    assert result["kernels"]["float32"] == result["head_kernels"]["float32"] == "mm/float32"
    losses = result["by_format"]
    assert set(losses) == {"float32", "int4"} and losses["int4"].keys() == losses["float32"].keys()
    # the side path keeps int4 close to float32 at every exit (the targets' 3 % with room)
    assert all(r["met"] for r in result["rows"] if r["weights"] == "int4")
