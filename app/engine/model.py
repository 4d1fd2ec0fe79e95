"""The decoder forward (LLaMA / Mistral / Qwen2 layouts) that can stop after any layer.

Plain tensors and functional ops, gpt-fast style: RMSNorm, rotary embeddings, grouped-query
attention, SwiGLU, optional biases (Qwen2's qkv bias, LLaMA's ``attention_bias``/``mlp_bias``),
tied or untied head. A row that exits at ``k`` gets ``lm_head(norm(h_k))``: the model's own final
norm and shared head.

Load-time rewrites that keep the maths of the reference: q/k/v are fused into one projection;
each RMSNorm's weight is folded into the columns of the projection that reads it; q and k rows are
permuted per head so that rotary embedding is one complex multiply (see :mod:`app.engine.rope`).

Two entry points: :meth:`Transformer.prefill` runs one request's prompt and fills its cache row;
:meth:`Transformer.decode` runs one token for each of ``n`` rows, layer ``l`` over the prefix of
rows deeper than ``l``. The model knows rows and positions, not requests or tokenizers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from app.engine.kv_cache import KVCache
from app.engine.linear import Linear, packed_linear_available
from app.engine.rope import head_dim_of, interleave_permutation, rope_table
from app.model_store import ModelStoreError

KV_BLOCK = 32  # decode attention spans a multiple of this many positions
MAX_PACKED_BYTES = 2**30  # keep oneDNN-packed weight copies up to this model size


@dataclass(frozen=True)
class ModelArgs:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float

    @classmethod
    def from_hf(cls, hf_config: Any) -> ModelArgs:
        heads = int(hf_config.num_attention_heads)
        kv_heads = int(getattr(hf_config, "num_key_value_heads", None) or heads)
        if heads % kv_heads:
            raise ModelStoreError(f"{heads} attention heads do not divide into {kv_heads} kv heads")
        return cls(
            vocab_size=int(hf_config.vocab_size),
            hidden_size=int(hf_config.hidden_size),
            intermediate_size=int(hf_config.intermediate_size),
            num_layers=int(hf_config.num_hidden_layers),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim_of(hf_config),
            rms_norm_eps=float(hf_config.rms_norm_eps),
        )


@dataclass
class Layer:
    qkv: Linear  # input norm folded in; q, k rows interleaved for the rotary multiply
    o: Linear
    gate_up: Linear  # post-attention norm folded in; gate columns, then up columns
    down: Linear


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


def _cat_bias(parts: Sequence[torch.Tensor | None], sizes: Sequence[int]) -> torch.Tensor | None:
    if all(p is None for p in parts):
        return None
    return torch.cat(
        [p if p is not None else torch.zeros(n) for p, n in zip(parts, sizes, strict=True)]
    )


class Transformer:
    def __init__(
        self,
        args: ModelArgs,
        embed: torch.Tensor,
        layers: list[Layer],
        head: Linear,
        rope: torch.Tensor,
    ) -> None:
        self.args = args
        self.embed = embed
        self.layers = layers
        self.head = head  # final norm folded in
        self.rope = rope  # [max_seq_len, head_dim / 2] complex rotations
        self.max_seq_len = rope.shape[0]
        self.scale = args.head_dim**-0.5
        self._group = args.num_heads // args.num_kv_heads
        self._heads = args.num_heads
        self._sum_eps = torch.tensor(args.hidden_size * args.rms_norm_eps, device=embed.device)
        # Rotation per head: q and k heads rotate with the position, v heads do not (times 1).
        self._unrotated = (
            torch.arange(args.num_heads + 2 * args.num_kv_heads, device=embed.device)
            >= args.num_heads + args.num_kv_heads
        )[None, :, None]
        self._one = torch.ones((), dtype=rope.dtype, device=embed.device)
        self._float32 = embed.dtype == torch.float32
        self._positions = torch.arange(self.max_seq_len, device=embed.device)

    @property
    def device(self) -> torch.device:
        return self.embed.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    @classmethod
    def from_checkpoint(
        cls,
        hf_config: Any,
        tensors: dict[str, torch.Tensor],
        max_seq_len: int,
        device: str,
        dtype: torch.dtype,
        packed_linear: bool = True,
    ) -> Transformer:
        a = ModelArgs.from_hf(hf_config)
        t = _Tensors(tensors)
        weight_bytes = sum(v.numel() for v in tensors.values()) * torch.finfo(dtype).bits // 8
        # Packed copies double the weights' memory: worth it for the small models served on CPU.
        pack = (
            packed_linear
            and weight_bytes <= MAX_PACKED_BYTES
            and packed_linear_available(torch.device(device), dtype)
        )

        def linear(weight: torch.Tensor, bias: torch.Tensor | None = None) -> Linear:
            cast = bias.to(device, dtype) if bias is not None else None
            return Linear(weight.to(device, dtype), cast, pack)

        hd, inter = a.hidden_size, a.intermediate_size
        q_dim, kv_dim = a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim
        perm = interleave_permutation(a.head_dim)
        q_rows = (torch.arange(a.num_heads)[:, None] * a.head_dim + perm).flatten()
        k_rows = (torch.arange(a.num_kv_heads)[:, None] * a.head_dim + perm).flatten()
        rows = torch.cat([q_rows, q_dim + k_rows, q_dim + kv_dim + torch.arange(kv_dim)])
        layers = []
        for i in range(a.num_layers):
            p = f"model.layers.{i}."
            att, mlp = p + "self_attn.", p + "mlp."
            # sqrt(hidden) * weight: see _norm
            in_norm = t.get(p + "input_layernorm.weight", (hd,)) * hd**0.5
            post_norm = t.get(p + "post_attention_layernorm.weight", (hd,)) * hd**0.5
            qkv = torch.cat(
                [
                    t.get(att + "q_proj.weight", (q_dim, hd)),
                    t.get(att + "k_proj.weight", (kv_dim, hd)),
                    t.get(att + "v_proj.weight", (kv_dim, hd)),
                ]
            )
            qkv_bias = _cat_bias(
                [
                    t.optional(att + "q_proj.bias", (q_dim,)),
                    t.optional(att + "k_proj.bias", (kv_dim,)),
                    t.optional(att + "v_proj.bias", (kv_dim,)),
                ],
                (q_dim, kv_dim, kv_dim),
            )
            layers.append(
                Layer(
                    qkv=linear(
                        (qkv * in_norm)[rows], qkv_bias[rows] if qkv_bias is not None else None
                    ),
                    o=linear(
                        t.get(att + "o_proj.weight", (hd, q_dim)),
                        t.optional(att + "o_proj.bias", (hd,)),
                    ),
                    gate_up=linear(
                        torch.cat(
                            [
                                t.get(mlp + "gate_proj.weight", (inter, hd)),
                                t.get(mlp + "up_proj.weight", (inter, hd)),
                            ]
                        )
                        * post_norm,
                        _cat_bias(
                            [
                                t.optional(mlp + "gate_proj.bias", (inter,)),
                                t.optional(mlp + "up_proj.bias", (inter,)),
                            ],
                            (inter, inter),
                        ),
                    ),
                    down=linear(
                        t.get(mlp + "down_proj.weight", (hd, inter)),
                        t.optional(mlp + "down_proj.bias", (hd,)),
                    ),
                )
            )
        embed = t.get("model.embed_tokens.weight", (a.vocab_size, hd))
        if getattr(hf_config, "tie_word_embeddings", False):
            head = embed
        else:
            head = t.get("lm_head.weight", (a.vocab_size, hd))
        head = linear(head * (t.get("model.norm.weight", (hd,)) * hd**0.5))
        rope = rope_table(hf_config, max_seq_len, device)
        return cls(a, embed.to(device, dtype).contiguous(), layers, head, rope)

    # -- building blocks -------------------------------------------------------------------------

    # The decode step is bound by per-op overhead at this scale: these helpers keep the number of
    # torch calls per layer small (no no-op casts in float32, one split instead of slices).

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        """RMSNorm without its weight, in float32, divided by sqrt(hidden).

        ``x / sqrt(mean(x^2) + eps) = sqrt(d) * x / sqrt(sum(x^2) + d * eps)``: the sum saves the
        division a mean costs on CPU, and ``sqrt(d)`` joins the norm weight in the next projection.
        """
        # (eps as a float32 tensor: adding a Python float converts it on every call)
        if self._float32:
            return x * (x * x).sum(-1, keepdim=True).add_(self._sum_eps).rsqrt_()
        h = x.float()
        return (h * (h * h).sum(-1, keepdim=True).add_(self._sum_eps).rsqrt_()).to(x.dtype)

    def _rotations(self, positions: torch.Tensor) -> torch.Tensor:
        """``[t, heads + 2 * kv_heads, head_dim / 2]`` complex: each q and k head's rotation at
        its position, and 1 for the v heads, so one multiply serves the whole projection."""
        return torch.where(self._unrotated, self._one, self.rope[positions][:, None, :])

    def _qkv(self, x: torch.Tensor, w: Layer, rotations: torch.Tensor) -> torch.Tensor:
        """``[t, heads + 2 * kv_heads, head_dim]``: rotated q heads, rotated k heads, v heads."""
        qkv = w.qkv(self._norm(x)).view(x.shape[0], -1, self.args.head_dim // 2, 2)
        if self._float32:
            return torch.view_as_real(torch.view_as_complex(qkv) * rotations).flatten(-2)
        rotated = torch.view_as_complex(qkv.float()) * rotations
        return torch.view_as_real(rotated).flatten(-2).to(x.dtype)

    def _mlp(self, x: torch.Tensor, w: Layer) -> torch.Tensor:
        """``x + down(silu(gate(norm x)) * up(norm x))``."""
        gate, up = w.gate_up(self._norm(x)).chunk(2, dim=1)
        return w.down.add(F.silu(gate).mul_(up), x)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm and the shared head, in float32 for sampling."""
        out = self.head(self._norm(x))
        return out if self._float32 else out.float()

    # -- prefill ----------------------------------------------------------------------------------

    def prefill(
        self,
        ids: torch.Tensor,
        exit_layer: int,
        cache: KVCache | None = None,
        row: int = 0,
        all_logits: bool = False,
    ) -> torch.Tensor:
        """Run the prompt ``ids [t]`` through ``exit_layer`` layers, filling ``cache`` row ``row``.

        Returns float32 logits for the last position (``[1, vocab]``) or every position.
        """
        a = self.args
        t = ids.shape[0]
        x = F.embedding(ids, self.embed)
        rotations = self._rotations(self._positions[:t])
        heads, kv_heads = a.num_heads, a.num_kv_heads
        for layer in range(exit_layer):
            w = self.layers[layer]
            qkv = self._qkv(x, w, rotations).transpose(0, 1)  # [all heads, t, d]
            if cache is not None:
                cache.kv[layer][row, :, :t] = qkv[heads:]
            out = F.scaled_dot_product_attention(
                qkv[None, :heads],
                qkv[None, heads : heads + kv_heads],
                qkv[None, heads + kv_heads :],
                is_causal=True,
                scale=self.scale,
                enable_gqa=a.num_heads != a.num_kv_heads,
            )
            x = w.o.add(out[0].transpose(0, 1).reshape(t, -1), x)
            x = self._mlp(x, w)
        return self.logits(x if all_logits else x[-1:])

    # -- decode -----------------------------------------------------------------------------------

    def attention_mask(self, positions: torch.Tensor) -> torch.Tensor:
        """``[n, max_seq_len]`` additive mask: 0 up to each row's position, -inf after.

        Additive and float: the CPU attention kernel is about twice as fast with it as with a
        boolean mask at decode shapes.
        """
        hidden = self._positions > positions[:, None]
        return torch.where(hidden, float("-inf"), 0.0).to(self.dtype)

    def decode(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        rows_by_layer: Sequence[int],
        cache: KVCache,
        kv_len: int,
        mask: torch.Tensor | None = None,
        index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One token for each of the rows ``0..n-1`` of ``cache``; returns logits ``[n, vocab]``.

        ``ids[i]`` sits at ``positions[i]`` of row ``i``; ``rows_by_layer[l]`` is how many leading
        rows run layer ``l`` (rows are ordered by exit, deepest first), so its length is the
        deepest exit. ``kv_len`` bounds every row's context (``max(positions) + 1``). A row's
        hidden state is set aside when it reaches its exit; one final norm + head serves all.
        ``mask`` (``attention_mask``) and ``index`` (``cache.flat_index``) may come precomputed.
        """
        a = self.args
        n = ids.shape[0]
        x = F.embedding(ids, self.embed)
        rotations = self._rotations(positions)
        # Attend over a window rounded up to KV_BLOCK positions, so that the per-layer cache views
        # stay the same (and are reused) for KV_BLOCK steps; the mask hides the extra positions.
        span = min(self.max_seq_len, -(-kv_len // KV_BLOCK) * KV_BLOCK)
        if mask is None:
            mask = self.attention_mask(positions)
        mask = mask[:, :span].view(n, 1, 1, span)
        if index is None:
            index = cache.flat_index(self._positions[:n], positions)
        heads, kv_heads, group, head_dim = a.num_heads, a.num_kv_heads, self._group, a.head_dim
        exited: list[torch.Tensor] = []
        m = -1
        for layer, rows in enumerate(rows_by_layer):
            if rows != m:
                if rows < x.shape[0]:
                    exited.append(x[rows:])
                    x = x[:rows]
                m = rows
                m_rot, m_mask, m_index = rotations[:m], mask[:m], index[: m * 2 * kv_heads]
            w = self.layers[layer]
            qkv = self._qkv(x, w, m_rot)
            cache.flat[layer].index_copy_(0, m_index, qkv[:, heads:].reshape(-1, head_dim))
            keys, values = cache.window(layer, m, span)
            # One query token: the heads sharing a kv head act as that head's query rows.
            out = F.scaled_dot_product_attention(
                qkv[:, :heads].view(m, kv_heads, group, head_dim),
                keys,
                values,
                attn_mask=m_mask,
                scale=self.scale,
            )
            x = w.o.add(out.reshape(m, -1), x)
            x = self._mlp(x, w)
        if exited:
            x = torch.cat([x, *reversed(exited)])
        return self.logits(x)
