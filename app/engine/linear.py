"""Linear layers tuned for decoding: input-major weights, fused residual, oneDNN for batches.

A decode step of a small model is bound by weight traffic and per-op overhead, not arithmetic.
Measured on CPU float32 at decode shapes (a few rows against a few-MB weight):

- one row: ``x @ W`` with ``W`` stored ``[in, out]`` (a plain NN GEMM) beats ``F.linear``'s
  ``x @ W.T`` by 1.4-1.7x, and ``addmm`` folds the residual connection into the same call;
- several rows against a large weight: oneDNN's packed-weight linear
  (``torch.ops.mkldnn._linear_pointwise``, what Inductor emits for frozen CPU graphs) is 1.5-2x
  faster than either, with the residual add fused as a post-op; but each call costs ~20 us more,
  so for small weights (the default model's) plain ``mm`` stays faster at any row count.

So on CPU float32 a ``Linear`` with a weight of at least ``PACKED_MIN_NUMEL`` elements keeps both
forms and picks by row count. Elsewhere (CUDA, other dtypes, a torch build without oneDNN) only the
NN form exists; the model code has one path.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F

from app.engine.quantize import INT4_GROUP, dequantize_int4, quantize_int4, quantize_int8

logger = logging.getLogger(__name__)

PACKED_MIN_ROWS = 2  # use the oneDNN packed weight from this many rows up
PACKED_MIN_NUMEL = 1 << 17  # and only for weights this large (512 KiB in float32)


def packed_linear_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether oneDNN packed linears work here and agree with ``F.linear``."""
    if device.type != "cpu" or dtype != torch.float32 or not torch.backends.mkldnn.is_available():
        return False
    try:
        op = torch.ops.mkldnn._linear_pointwise
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(3, 16, generator=generator)
        w = torch.randn(8, 16, generator=generator)
        b = torch.randn(8, generator=generator)
        other = torch.randn(3, 8, generator=generator)
        packed = torch.ops.mkldnn._reorder_linear_weight(w, None)
        checks = [
            (op(x, packed, b, "none", [], ""), F.linear(x, w, b)),
            (op.binary(x, other, packed, b, "add"), F.linear(x, w, b) + other),
        ]
        return all(torch.allclose(got, want, rtol=1e-4, atol=1e-5) for got, want in checks)
    except Exception as exc:  # a build without these private ops: the portable path only
        logger.info("oneDNN packed linear unavailable (%s); using torch.mm", exc)
        return False


class Linear:
    """``y = x @ weight.T + bias`` for 2-D ``x`` (``weight`` given in PyTorch's ``[out, in]``)."""

    __slots__ = ("bias", "packed", "weight_t")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, pack: bool) -> None:
        self.weight_t = weight.t().contiguous()
        self.bias = bias
        self.packed = (
            torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), None)
            if pack and weight.numel() >= PACKED_MIN_NUMEL
            else None
        )

    @property
    def out_features(self) -> int:
        return self.weight_t.shape[1]

    @property
    def kernel(self) -> str:
        """The op that reads the weight at one row (what ``/info`` and the benchmarks report)."""
        return f"mm/{_name(self.weight_t.dtype)}"

    def dequantized(self) -> torch.Tensor:
        """The ``[out, in]`` weight this layer multiplies by, in float32."""
        return self.weight_t.t().float()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None and x.shape[0] >= PACKED_MIN_ROWS:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        if self.bias is None:
            return torch.mm(x, self.weight_t)
        return torch.addmm(self.bias, x, self.weight_t)

    def add(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """``residual + linear(x)``, the residual connection fused into the GEMM."""
        if self.packed is not None and x.shape[0] >= PACKED_MIN_ROWS:
            return torch.ops.mkldnn._linear_pointwise.binary(
                x, residual, self.packed, self.bias, "add"
            )
        out = torch.addmm(residual, x, self.weight_t)
        return out if self.bias is None else out.add_(self.bias)


# -- weight-only formats -------------------------------------------------------------------------
#
# The weights are stored smaller and read by one of torch's packed library kernels; activations
# keep the model's dtype and are cast to the kernel's around the call. Which kernel serves a format
# on this machine is measured, not assumed (:mod:`app.engine.kernels`).

INT4_N_MULTIPLE = 16  # torch's CPU int4 packing wants a multiple of 16 output rows


class WeightOnlyLinear(Linear):
    """A :class:`Linear` whose weight is read by ``op(x_cast) -> [rows, out]`` in ``act`` dtype.

    ``dense`` is the float32 ``[out, in]`` weight the format represents (dequantized), kept only
    where asked (tests compare the kernel against it). ``in_scale`` (float32 ``[in]``), when set,
    multiplies the input first: a norm weight that the float formats fold into the weight's
    columns, kept out of a quantized weight so that it does not distort its groups' ranges.
    ``side_b`` (set by :meth:`stack_side`): a low-rank update ``B A`` beside the quantized base
    (an adapter's, :mod:`app.engine.side_path`). Its ``A`` is stored as ``rank`` extra output rows
    of the quantized weight, so the kernel's one call returns ``[base product, x A^T]``; ``B``
    stays float and one ``addmm`` adds ``(x A^T) B^T`` to the base product."""

    __slots__ = ("act", "dense", "in_scale", "name", "op", "out", "side_b")

    def __init__(
        self,
        op: Callable[[torch.Tensor], torch.Tensor],
        out_features: int,
        act: torch.dtype,
        bias: torch.Tensor | None,
        kernel: str,
        dense: torch.Tensor | None = None,
        in_scale: torch.Tensor | None = None,
    ) -> None:
        self.op, self.out, self.act, self.bias, self.name = op, out_features, act, bias, kernel
        self.dense, self.packed, self.weight_t, self.in_scale = dense, None, None, in_scale
        self.side_b: torch.Tensor | None = None  # [rank, out], the model's dtype
        if dense is not None and in_scale is not None:
            self.dense = dense * in_scale.to(dense.device)[None, :]

    @property
    def out_features(self) -> int:
        return self.out

    @property
    def kernel(self) -> str:
        return self.name

    def stack_side(self, b_t: torch.Tensor) -> None:
        """Take this linear's last ``b_t.shape[0]`` output rows as the ``A`` of a low-rank update
        whose ``B^T`` is ``b_t``: from now on it returns ``base x + B (A x)``."""
        rank = b_t.shape[0]
        if b_t.shape[1] != self.out - rank:
            raise ValueError(f"B^T {tuple(b_t.shape)} does not fit {self.out - rank} outputs")
        self.side_b, self.out = b_t, self.out - rank

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_scale is not None:
            x = x * self.in_scale
        y = self.op(x if x.dtype == self.act else x.to(self.act))
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        if self.side_b is not None:  # y = [base product | x A^T], ours to change in place
            y = y[:, : self.out].addmm_(y[:, self.out :], self.side_b)
            if y.shape[0] > 1:  # rows of the wider product: make them adjacent again
                y = y.contiguous()
        return y if self.bias is None else y.add_(self.bias)

    def add(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self(x).add_(residual)

    def dequantized(self) -> torch.Tensor:
        if self.dense is None:
            raise ValueError("this linear was built without its dequantized weight")
        if self.side_b is None:
            return self.dense
        base, a = self.dense[: self.out], self.dense[self.out :]  # (input scale included)
        return base + self.side_b.float().t() @ a


def cast_linear(
    weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype, keep: bool = False
) -> WeightOnlyLinear:
    """Weights stored in ``dtype`` (e.g. bfloat16 under float32 activations), ``x @ W`` in it."""
    w_t = weight.t().to(dtype).contiguous()
    dense = w_t.t().float() if keep else None
    return WeightOnlyLinear(
        lambda x: torch.mm(x, w_t), weight.shape[0], dtype, bias, f"mm/{_name(dtype)}", dense
    )


def onednn_cast_linear(
    weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype, keep: bool = False
) -> WeightOnlyLinear:
    """Weights stored in ``dtype``, oneDNN-packed (``mkldnn._linear_pointwise``), CPU only."""
    w = weight.to(dtype).contiguous()
    dense = w.float() if keep else None
    packed = torch.ops.mkldnn._reorder_linear_weight(w, None)
    op = torch.ops.mkldnn._linear_pointwise
    return WeightOnlyLinear(
        lambda x: op(x, packed, None, "none", [], ""),
        weight.shape[0],
        dtype,
        bias,
        f"mkldnn._linear_pointwise/{_name(dtype)}",
        dense,
    )


def int8_linear(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    act: torch.dtype,
    keep: bool = False,
    in_scale: torch.Tensor | None = None,
) -> WeightOnlyLinear:
    """int8 per-row weights through ``aten._weight_int8pack_mm`` with ``act`` activations; the
    layer computes ``(x * in_scale) @ weight.T``."""
    q, scale = quantize_int8(weight)
    q, s = q.to(weight.device), scale.to(weight.device, act)
    dense = (q.float() * scale.to(q.device)[:, None]) if keep else None
    op = torch.ops.aten._weight_int8pack_mm
    return WeightOnlyLinear(
        lambda x: op(x, q, s),
        weight.shape[0],
        act,
        bias,
        f"_weight_int8pack_mm/{_name(act)}",
        dense,
        in_scale,
    )


def int4_linear(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    act: torch.dtype,
    keep: bool = False,
    in_scale: torch.Tensor | None = None,
) -> WeightOnlyLinear:
    """int4 weights, groups of 32, through ``aten._weight_int4pack_mm_for_cpu``; the layer
    computes ``(x * in_scale) @ weight.T``."""
    out_features = weight.shape[0]
    q, scale, low = quantize_int4(weight)
    dense = dequantize_int4(q, scale, low) if keep else None
    pad = -out_features % INT4_N_MULTIPLE
    if pad:  # zero rows make up the multiple; their outputs are sliced off
        q = torch.cat([q, q.new_zeros(pad, q.shape[1])])
        scale = torch.cat([scale, scale.new_zeros(pad, scale.shape[1])])
        low = torch.cat([low, low.new_zeros(pad, low.shape[1])])
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 1)
    # the kernel computes (q - 8) * scale + zero: zero = low + 8 * scale
    scales_zeros = torch.stack([scale.t(), (low + 8 * scale).t()], dim=-1).to(act).contiguous()
    op = torch.ops.aten._weight_int4pack_mm_for_cpu

    def run(x: torch.Tensor) -> torch.Tensor:
        y = op(x, packed, INT4_GROUP, scales_zeros)
        return y[:, :out_features].contiguous() if pad else y

    name = f"_weight_int4pack_mm_for_cpu/{_name(act)}"
    return WeightOnlyLinear(run, out_features, act, bias, name, dense, in_scale)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
