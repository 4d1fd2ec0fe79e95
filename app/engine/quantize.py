"""Weight-only quantizers: int8 per output row, int4 per group of 32 inputs (as GGUF's Q4_1)."""

from __future__ import annotations

import torch

INT4_GROUP = 32  # int4: one (scale, offset) per 32 inputs of an output row, as GGUF Q4_1 blocks


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output row: ``weight ≈ q * scale[:, None]``; ``q`` in [-127, 127]."""
    w = weight.float()
    scale = (w.abs().amax(dim=1) / 127).clamp_(min=1e-12)
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def quantize_int4(
    weight: torch.Tensor, group: int = INT4_GROUP
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric int4 per group of ``group`` inputs: ``weight ≈ q * scale + low`` per group, ``q``
    in [0, 15]. Returns ``q [out, in]`` (int32), ``scale`` and ``low`` ``[out, in / group]``."""
    out_features, in_features = weight.shape
    if in_features % group:
        raise ValueError(f"int4 needs input sizes divisible by {group}, got {in_features}")
    w = weight.float().reshape(out_features, in_features // group, group)
    low, high = w.amin(dim=-1), w.amax(dim=-1)
    scale = ((high - low) / 15).clamp_(min=1e-12)
    q = torch.round((w - low[..., None]) / scale[..., None]).clamp_(0, 15).to(torch.int32)
    return q.reshape(out_features, in_features), scale, low


def dequantize_int4(q: torch.Tensor, scale: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    groups = scale.shape[1]
    w = q.float().reshape(q.shape[0], groups, -1) * scale[..., None] + low[..., None]
    return w.reshape(q.shape)
