"""Weight preparation: a checkpoint's Hugging Face tensors → the engine's fused, folded layers.

Load-time rewrites that keep the maths of the reference: q/k/v are fused into one projection and
gate/up into another; each RMSNorm's weight (times ``sqrt(hidden)``, see ``Transformer._norm``) is
folded into the columns of the projection that reads it, the final norm into the head; q and k
rows are permuted per head so that rotary embedding is one complex multiply (see
:mod:`app.engine.rope`). The input contract is ``app.engine.loader.Checkpoint``'s ``hf_config``
and ``tensors``.

The linear layers are then stored in the weight format asked for (``weights``: float32, bfloat16,
int8, int4; ``auto`` keeps the activation dtype), read by the kernel :mod:`app.engine.kernels`
found fastest here; the model remembers that choice (``Transformer.kernel_choice``). An adapter
checkpoint served in an integer format quantizes its base's weights and keeps the adapter's update
as a float side path (:mod:`app.engine.side_path`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from app.engine.kernels import choose_kernel, resolve_format
from app.engine.linear import Linear, WeightOnlyLinear, packed_linear_available
from app.engine.model import Layer, ModelArgs, Transformer
from app.engine.rope import interleave_permutation, rope_table
from app.engine.side_path import AdapterFactors, SidePath, fused_side_path
from app.model_store import ModelStoreError

MAX_PACKED_BYTES = 2**30  # keep oneDNN-packed weight copies up to this model size

SIDE_PATH_FORMATS = ("int8", "int4")  # an adapter's update runs beside the quantized base
# The LM head is stored in int8 when the layers are int4: the head decides every token, a GGUF's
# 4-bit files keep their (tied) embedding in 8 bits (SmolLM2's Q4_1: token_embd Q8_0), and int4 of
# it cost Sorted SmolLM2 its answers (greedy "The capital of France is the capital of the country
# of France" instead of "... is Paris", as float32 and int8 answer; docs/performance.md).
HEAD_FORMATS = {"int4": "int8"}

# (weight, bias=None, in_scale=None, side=None) -> Linear
MakeLinear = Callable[..., Linear]


class _Tensors:
    """Checkpoint tensors by name, shape-checked, in float32 for the load-time rewrites."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def get(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        tensor = self.tensors.get(name)
        if tensor is None:
            raise ModelStoreError(f"the checkpoint has no tensor {name!r}")
        if tuple(tensor.shape) != shape:
            raise ModelStoreError(
                f"tensor {name!r} has shape {tuple(tensor.shape)}, the config implies {shape}"
            )
        return tensor.float()

    def optional(self, name: str, shape: tuple[int, ...]) -> torch.Tensor | None:
        return self.get(name, shape) if name in self.tensors else None

    def fused(
        self, names: Sequence[str], shapes: Sequence[tuple[int, ...]]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``name.weight`` tensors stacked by rows, and their biases (zeros where one is absent;
        None when all are)."""
        weight = torch.cat([self.get(n + ".weight", s) for n, s in zip(names, shapes, strict=True)])
        biases = [self.optional(n + ".bias", s[:1]) for n, s in zip(names, shapes, strict=True)]
        if all(b is None for b in biases):
            return weight, None
        parts = [
            b if b is not None else torch.zeros(s[0]) for b, s in zip(biases, shapes, strict=True)
        ]
        return weight, torch.cat(parts)


def build_model(
    hf_config: Any,
    tensors: dict[str, torch.Tensor],
    max_seq_len: int,
    device: str,
    dtype: torch.dtype,
    packed_linear: bool = True,
    weights: str = "auto",
    kernel_cache: Path | None = None,
    adapter: AdapterFactors | None = None,
) -> Transformer:
    """The engine's model of a checkpoint's tensors, its linear layers in ``weights`` (timed
    kernel choices cached under ``kernel_cache``). With ``adapter`` (the factors of the adapter
    merged into ``tensors``) an integer format quantizes the base weights and adds the update as
    a float side path; other formats ignore it and serve the merged weights."""
    fmt = resolve_format(weights, dtype)
    if fmt not in SIDE_PATH_FORMATS:
        adapter = None
    a = ModelArgs.from_hf(hf_config)
    t = _Tensors({**tensors, **adapter.base} if adapter is not None else tensors)
    weight_bytes = sum(v.numel() for v in tensors.values()) * torch.finfo(dtype).bits // 8
    # Packed copies double the weights' memory: worth it for the small models served on CPU.
    pack = (
        packed_linear
        and weight_bytes <= MAX_PACKED_BYTES
        and packed_linear_available(torch.device(device), dtype)
    )

    hd, inter = a.hidden_size, a.intermediate_size
    q_dim, kv_dim = a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim
    shapes = [(q_dim + 2 * kv_dim, hd), (hd, q_dim), (2 * inter, hd), (hd, inter)]

    def kernel_for(fmt: str, shapes: list[tuple[int, int]], layers: int) -> tuple[Any, Any]:
        return choose_kernel(fmt, torch.device(device), dtype, shapes, layers, pack, kernel_cache)

    choice, kernel = kernel_for(fmt, shapes, a.num_layers)

    def linear(
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        in_scale: torch.Tensor | None = None,
        side: SidePath | None = None,
    ) -> Linear:
        """``(x * in_scale) @ (weight + side).T + bias``: a float format folds the norm weight
        ``in_scale`` into the weight, an int format quantizes the weight without it."""
        cast = bias.to(device, dtype) if bias is not None else None
        scale = in_scale.to(device) if in_scale is not None else None
        if side is None:
            return kernel.make(weight.to(device), cast, False, scale)
        # the update's A joins the quantized weight as extra rows; B stays float
        stacked = torch.cat([weight, side.a_t.t()]).to(device)
        made = kernel.make(stacked, cast, False, scale)
        assert isinstance(made, WeightOnlyLinear)  # the side-path formats' kernels
        made.stack_side(side.b_t.to(device, dtype))
        return made

    layers = [
        _layer(t, a, f"model.layers.{i}.", linear, adapter or AdapterFactors())
        for i in range(a.num_layers)
    ]
    embed = t.get("model.embed_tokens.weight", (a.vocab_size, hd))
    if getattr(hf_config, "tie_word_embeddings", False):
        head = embed
    else:
        head = t.get("lm_head.weight", (a.vocab_size, hd))
    head_scale = t.get("model.norm.weight", (hd,)) * hd**0.5
    if fmt in HEAD_FORMATS:  # the head keeps more bits than the layers (see HEAD_FORMATS)
        _, head_kernel = kernel_for(HEAD_FORMATS[fmt], [(a.vocab_size, hd)], 1)
        head = head_kernel.make(head.to(device), None, False, head_scale.to(device))
    else:
        head = linear(head, None, head_scale)
    rope = rope_table(hf_config, max_seq_len, device)
    model = Transformer(a, embed.to(device, dtype).contiguous(), layers, head, rope)
    model.kernel_choice = choice
    return model


def _layer(
    t: _Tensors, a: ModelArgs, prefix: str, linear: MakeLinear, adapter: AdapterFactors
) -> Layer:
    hd, inter = a.hidden_size, a.intermediate_size
    q_dim, kv_dim = a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim
    att, mlp = prefix + "self_attn.", prefix + "mlp."
    in_norm = t.get(prefix + "input_layernorm.weight", (hd,)) * hd**0.5
    post_norm = t.get(prefix + "post_attention_layernorm.weight", (hd,)) * hd**0.5
    qkv, qkv_bias = t.fused(
        [att + "q_proj", att + "k_proj", att + "v_proj"],
        [(q_dim, hd), (kv_dim, hd), (kv_dim, hd)],
    )
    rows = _rotary_rows(a)
    gate_up, gate_up_bias = t.fused([mlp + "gate_proj", mlp + "up_proj"], [(inter, hd)] * 2)

    def side(names: list[str], sizes: list[int], order: torch.Tensor | None = None):
        return fused_side_path(adapter, [n + ".weight" for n in names], sizes, order)

    qkv_side = side([att + "q_proj", att + "k_proj", att + "v_proj"], [q_dim, kv_dim, kv_dim], rows)
    gate_up_side = side([mlp + "gate_proj", mlp + "up_proj"], [inter] * 2)
    return Layer(
        qkv=linear(qkv[rows], qkv_bias[rows] if qkv_bias is not None else None, in_norm, qkv_side),
        o=linear(
            t.get(att + "o_proj.weight", (hd, q_dim)),
            t.optional(att + "o_proj.bias", (hd,)),
            None,
            side([att + "o_proj"], [hd]),
        ),
        gate_up=linear(gate_up, gate_up_bias, post_norm, gate_up_side),
        down=linear(
            t.get(mlp + "down_proj.weight", (hd, inter)),
            t.optional(mlp + "down_proj.bias", (hd,)),
            None,
            side([mlp + "down_proj"], [hd]),
        ),
    )


def _rotary_rows(a: ModelArgs) -> torch.Tensor:
    """Row order of the fused qkv projection: q and k rows interleaved per head, v unchanged."""
    q_dim, kv_dim = a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim
    perm = interleave_permutation(a.head_dim)
    q_rows = (torch.arange(a.num_heads)[:, None] * a.head_dim + perm).flatten()
    k_rows = (torch.arange(a.num_kv_heads)[:, None] * a.head_dim + perm).flatten()
    return torch.cat([q_rows, q_dim + k_rows, q_dim + kv_dim + torch.arange(kv_dim)])
