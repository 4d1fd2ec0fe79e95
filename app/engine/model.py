"""The decoder forward (LLaMA / Mistral / Qwen2 layouts) that can stop after any layer.

Plain tensors and functional ops, gpt-fast style: RMSNorm, rotary embeddings, grouped-query
attention, SwiGLU, optional biases (Qwen2's qkv bias, LLaMA's ``attention_bias``/``mlp_bias``),
tied or untied head. A row that exits at ``k`` gets ``lm_head(norm(h_k))``: the model's own final
norm and shared head.

The weights arrive already fused and folded (:mod:`app.engine.weights`): one qkv projection with
the input norm folded in and q/k rows interleaved for the rotary multiply, one gate/up projection
with the post-attention norm folded in, the final norm folded into the head.

Two entry points share one layer body (:meth:`Transformer._layer`) and differ only in attention:
:meth:`Transformer.prefill` runs one request's prompt causally and fills its cache row;
:meth:`Transformer.decode` runs one token for each of ``n`` rows, layer ``l`` over the prefix of
rows deeper than ``l``, attending over the cache. The model knows rows and positions, not requests
or tokenizers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from app.engine.kv_cache import KVCache
from app.engine.linear import Linear
from app.engine.rope import head_dim_of
from app.model_store import ModelStoreError

KV_BLOCK = 32  # decode attention spans a multiple of this many positions


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
        self.kernel_choice: Any = None  # the weight format's kernel (app.engine.kernels), if known

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
        """The model of a checkpoint's tensors (see :func:`app.engine.weights.build_model`)."""
        from app.engine.weights import build_model

        return build_model(hf_config, tensors, max_seq_len, device, dtype, packed_linear)

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

    def _layer(
        self,
        x: torch.Tensor,
        layer: int,
        rotations: torch.Tensor,
        attend: Callable[[torch.Tensor, int], torch.Tensor],
    ) -> torch.Tensor:
        """One decoder layer over the rows of ``x [t, hidden]``; ``attend(qkv, layer)`` stores
        the keys and values and returns the attention output ``[t, heads * head_dim]``."""
        w = self.layers[layer]
        x = w.o.add(attend(self._qkv(x, w, rotations), layer), x)
        return self._mlp(x, w)

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
        start: int = 0,
        head: bool = True,
    ) -> torch.Tensor:
        """Run the prompt ``ids [t]`` through ``exit_layer`` layers, filling ``cache`` row ``row``.

        ``ids`` sit at positions ``start..start+t-1``: a chunk after ``start`` positions already
        in the row attends to them in the cache (chunked prefill). Returns float32 logits for the
        last position (``[1, vocab]``) or every position; nothing (an empty tensor) without
        ``head``, for a chunk whose logits nobody reads.
        """
        a = self.args
        t = ids.shape[0]
        end = start + t
        heads, kv_heads = a.num_heads, a.num_kv_heads
        if start and cache is None:
            raise ValueError("a prefill chunk after position 0 needs the cache")
        # a later chunk: query i (at start + i) sees keys 0..start + i
        mask = self._positions[None, :end] <= self._positions[start:end, None] if start else None

        def attend(qkv: torch.Tensor, layer: int) -> torch.Tensor:
            qkv = qkv.transpose(0, 1)  # [all heads, t, d]
            if cache is not None:
                cache.kv[layer][row, :, start:end] = qkv[heads:]
            if start:
                keys = cache.k[layer][row : row + 1, :, :end]  # type: ignore[union-attr]
                values = cache.v[layer][row : row + 1, :, :end]  # type: ignore[union-attr]
            else:
                keys, values = qkv[None, heads : heads + kv_heads], qkv[None, heads + kv_heads :]
            out = F.scaled_dot_product_attention(
                qkv[None, :heads],
                keys,
                values,
                attn_mask=mask,
                is_causal=not start,
                scale=self.scale,
                enable_gqa=heads != kv_heads,
            )
            return out[0].transpose(0, 1).reshape(t, -1)

        x = F.embedding(ids, self.embed)
        rotations = self._rotations(self._positions[start:end])
        for layer in range(exit_layer):
            x = self._layer(x, layer, rotations, attend)
        if not head:
            return x[:0]
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
        m = -1

        def attend(qkv: torch.Tensor, layer: int) -> torch.Tensor:
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
            return out.reshape(m, -1)

        exited: list[torch.Tensor] = []
        for layer, rows in enumerate(rows_by_layer):
            if rows != m:
                if rows < x.shape[0]:
                    exited.append(x[rows:])
                    x = x[:rows]
                m = rows
                m_rot, m_mask, m_index = rotations[:m], mask[:m], index[: m * 2 * kv_heads]
            x = self._layer(x, layer, m_rot, attend)
        if exited:
            x = torch.cat([x, *reversed(exited)])
        return self.logits(x)
