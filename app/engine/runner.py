"""The model runner: the only part of the engine loop that touches torch.

It owns the model, the KV cache and the device-side position buffer, and speaks plain Python to
the loop: token ids and row counts in, chosen token ids out. One decode step is one call with one
host read (the chosen tokens); everything else stays on the device. A later CUDA-graph or
``torch.compile`` path for fixed batch sizes belongs here, behind the same two methods.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from app.engine.kv_cache import KVCache
from app.engine.model import Transformer
from app.engine.sampling import RowSampling, sample


class ModelRunner:
    def __init__(self, model: Transformer, cache: KVCache) -> None:
        self.model = model
        self.cache = cache
        self.device = model.device
        self.positions = torch.zeros(cache.max_slots, dtype=torch.long, device=self.device)
        self._rows_by_layer: list[int] = []
        self._n = 0

    def prefill(
        self, row: int, prompt_ids: Sequence[int], exit_layer: int, sampling: RowSampling | None
    ) -> int:
        """Fill cache row ``row`` with the prompt through ``exit_layer`` layers; the first token."""
        ids = torch.tensor(list(prompt_ids), dtype=torch.long, device=self.device)
        logits = self.model.prefill(ids, exit_layer, self.cache, row)
        return int(sample(logits, [(0, sampling)] if sampling else []).item())

    def set_layout(
        self,
        moves: Sequence[tuple[int, int, int]],
        copy_len: int,
        positions: Sequence[int],
        exits: Sequence[int],
    ) -> None:
        """Move rows (``(src, dst, exit)``), then take rows ``0..n-1`` with these positions/exits.

        ``exits`` must be in non-increasing order (the row order).
        """
        self.cache.move_rows(moves, copy_len)
        n = len(positions)
        if n:
            self.positions[:n].copy_(torch.tensor(list(positions), dtype=torch.long))
        deepest = exits[0] if n else 0
        self._rows_by_layer = [sum(1 for e in exits if e > layer) for layer in range(deepest)]
        self._n = n

    def decode(
        self, tokens: Sequence[int], kv_len: int, sampled: Sequence[tuple[int, RowSampling]]
    ) -> list[int]:
        """One step for rows ``0..n-1`` (``tokens[i]`` is row ``i``'s newest token)."""
        n = self._n
        ids = torch.tensor(list(tokens), dtype=torch.long, device=self.device)
        positions = self.positions[:n]
        logits = self.model.decode(ids, positions, self._rows_by_layer, self.cache, kv_len)
        chosen = sample(logits, sampled)
        positions += 1
        return chosen.tolist()
