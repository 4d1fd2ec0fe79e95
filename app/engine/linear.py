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

import torch
import torch.nn.functional as F

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
