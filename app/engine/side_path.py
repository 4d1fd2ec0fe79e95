"""A LoRA adapter kept beside its base for the integer weight formats.

A SoFT adapter's update to a projection is small: on Sorted SmolLM2 it is ~20x below one int4
step of the base's weights, so int4 (or int8) of the *merged* weight rounds most of it away and
the intermediate exits fall back towards the untuned base (measured in docs/performance.md). So
the integer formats quantize the base's own weights (a GGUF base's are already 4-bit values) and
run the update as a low-rank side path: ``y = Q(W_base) x + B Q(A) x``. ``A`` (rank rows) is
quantized with the base as extra output rows of the same kernel call, ``B`` stays float: one
``addmm`` per projection (:meth:`app.engine.linear.WeightOnlyLinear.stack_side`). The float
formats keep serving the merged weights.

:class:`AdapterFactors` holds, per adapted linear (by its Hugging Face weight name), the base
weight and the factors ``a [r, in]`` and ``b [out, r]`` (PEFT's scaling folded into ``b``), so that
``merged = base + b @ a``. :func:`fused_side_path` stacks several projections' factors in the
order the engine fuses them (q/k/v, gate/up).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


@dataclass
class AdapterFactors:
    base: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> [out, in]
    a: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> [r, in]
    b: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> [out, r], scaling folded

    def __contains__(self, name: str) -> bool:
        return name in self.a


@dataclass(frozen=True)
class SidePath:
    """``x @ a_t @ b_t``: the low-rank update of one (fused) projection, input-major."""

    a_t: torch.Tensor  # [in, r]
    b_t: torch.Tensor  # [r, out]

    def dense(self) -> torch.Tensor:
        """The update as a float32 ``[out, in]`` weight."""
        return (self.a_t.float() @ self.b_t.float()).t()


def fused_side_path(
    factors: AdapterFactors,
    names: Sequence[str],
    out_sizes: Sequence[int],
    rows: torch.Tensor | None = None,
) -> SidePath | None:
    """The side path of the projections ``names`` stacked by output rows (``out_sizes`` each;
    ``rows`` reorders the stacked outputs as the engine's fused weight does), or None when none
    of them is adapted. ``a`` stacks the ranks; ``b`` is block-diagonal."""
    adapted = [(i, n) for i, n in enumerate(names) if n in factors]
    if not adapted:
        return None
    a = torch.cat([factors.a[n].float() for _, n in adapted])
    b = torch.zeros(sum(out_sizes), a.shape[0])
    starts = [sum(out_sizes[:i]) for i in range(len(out_sizes))]
    col = 0
    for i, name in adapted:
        part = factors.b[name].float()
        if part.shape[0] != out_sizes[i]:
            raise ValueError(f"{name}: update has {part.shape[0]} rows, expected {out_sizes[i]}")
        b[starts[i] : starts[i] + out_sizes[i], col : col + part.shape[1]] = part
        col += part.shape[1]
    if rows is not None:
        b = b[rows]
    return SidePath(a.t().contiguous(), b.t().contiguous())
