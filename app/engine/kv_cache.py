"""The KV cache: one preallocated, contiguous slot per running request, per layer.

Layout: ``kv[layer]`` is a ``[max_slots, 2 * kv_heads, max_seq_len, head_dim]`` view of one tensor
allocated at start-up: the keys' heads, then the values' heads (``k[layer]``/``v[layer]`` are the
two halves), so a decode step writes both with one copy. A slot is a *row*; the engine keeps the
running requests in rows ``0..n-1`` ordered by exit, deepest first, so layer ``l`` works on the
prefix of rows whose exit is deeper than ``l``: a plain slice, no gather, no copy. A request's row
only ever receives the layers up to its exit; the deeper layers of that row are stale and never
read.

Why contiguous and not paged: the served models are small and the context is bounded
(``max_seq_len``), so reserving the whole context per slot costs little memory
(``2 * layers * slots * kv_heads * max_seq_len * head_dim`` elements) and buys the simplest and
fastest decode step: per-layer prefix views, per-row lengths handled by a mask, and static shapes
that CUDA graphs can capture later. Paging pays off when contexts are long and their lengths vary
a lot (memory is then the limit); it would need a block table and a gather in every attention call,
which is pure overhead at this scale. The price of the row order is a copy when a request joins,
leaves or moves to a shallower exit; :func:`app.engine.batch.plan_rows` keeps those copies to at
most a few rows per change, and only the layers and positions in use are copied.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from app.engine.rows import plan_rows

__all__ = ["KVCache", "plan_rows"]


class KVCache:
    def __init__(
        self,
        num_layers: int,
        max_slots: int,
        num_kv_heads: int,
        max_seq_len: int,
        head_dim: int,
        device: str | torch.device,
        dtype: torch.dtype,
    ) -> None:
        shape = (num_layers, max_slots, 2 * num_kv_heads, max_seq_len, head_dim)
        # Zeros, not empty: masked positions still enter the attention product, and an
        # uninitialised NaN there would poison the softmax-weighted sum.
        self._kv = torch.zeros(shape, device=device, dtype=dtype)
        self.kv: list[torch.Tensor] = list(self._kv.unbind(0))
        self.k = [kv[:, :num_kv_heads] for kv in self.kv]
        self.v = [kv[:, num_kv_heads:] for kv in self.kv]
        # The same memory as [slots * 2 * kv_heads * max_seq_len, head_dim]: a decode step writes
        # its new keys and values with one index_copy_ per layer (see flat_index).
        self.flat = [kv.view(-1, head_dim) for kv in self.kv]
        self.num_kv_heads = num_kv_heads
        self._windows: dict[tuple[int, int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self.max_slots = max_slots
        self.max_seq_len = max_seq_len

    @property
    def nbytes(self) -> int:
        return self._kv.nbytes

    def flat_index(self, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rows of ``flat`` for each (row, key or value head) at ``positions``:
        ``[n * 2 * kv_heads]``, row-major, so the first ``m * 2 * kv_heads`` serve the first ``m``
        rows."""
        heads = torch.arange(2 * self.num_kv_heads, device=rows.device)
        return (
            (rows[:, None] * (2 * self.num_kv_heads) + heads) * self.max_seq_len
            + positions[:, None]
        ).flatten()

    def window(self, layer: int, rows: int, span: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of rows ``0..rows-1``, positions ``0..span-1``: ``[rows, kv_heads,
        span, head_dim]`` views, memoised because a decode step asks for them once per layer."""
        key = (layer, rows, span)
        views = self._windows.get(key)
        if views is None:
            if len(self._windows) > 4096:
                self._windows.clear()
            views = self._windows[key] = (
                self.k[layer][:rows, :, :span],
                self.v[layer][:rows, :, :span],
            )
        return views

    def move_rows(self, moves: Sequence[tuple[int, int, int]], length: int) -> None:
        """Apply ``(src_row, dst_row, exit)`` moves at once (a permutation may swap rows).

        Only layers below each row's exit and positions below ``length`` are copied.
        """
        if not moves:
            return
        device = self._kv.device
        deepest = max(exit_layer for _, _, exit_layer in moves)
        for layer in range(deepest):
            sel = [(s, d) for s, d, e in moves if e > layer]
            src = torch.tensor([s for s, _ in sel], device=device)
            dst = torch.tensor([d for _, d in sel], device=device)
            cache = self.kv[layer]
            # Advanced indexing on the right makes a copy first, so overlapping moves are safe.
            cache[dst, :, :length] = cache[src, :, :length]
