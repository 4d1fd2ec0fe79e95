"""The model runner: the only part of the engine loop that touches torch.

It owns the model, the KV cache and the device-side position buffer, and speaks plain Python to
the loop: token ids and row counts in, chosen token ids out. One decode step is one call with one
host read (the chosen tokens); everything else stays on the device. A later CUDA-graph or
``torch.compile`` path for fixed batch sizes belongs here, behind the same two methods.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

from app.engine.kv_cache import KVCache
from app.engine.model import Transformer
from app.engine.sampling import RowSampling, sample


class ModelRunner:
    def __init__(self, model: Transformer, cache: KVCache) -> None:
        self.model = model
        self.cache = cache
        self.device = model.device
        # Per-row decode state kept on the device and advanced in place each step, so that a
        # step builds no position-dependent tensors: positions, the attention mask rows and the
        # cache-write index. Rebuilt only when the row layout changes.
        slots = cache.max_slots
        self.positions = torch.zeros(slots, dtype=torch.long, device=self.device)
        self._mask = torch.zeros(slots, cache.max_seq_len, dtype=model.dtype, device=self.device)
        self._index = torch.zeros(
            slots * 2 * cache.num_kv_heads, dtype=torch.long, device=self.device
        )
        self._rows = torch.arange(slots, device=self.device)
        self._zero = torch.zeros((), dtype=model.dtype, device=self.device)
        self._next_ids: torch.Tensor | None = None  # the last step's choices, while rows stay put
        self._rows_by_layer: list[int] = []
        self._n = 0

    @contextlib.contextmanager
    def inference(self) -> Iterator[None]:
        """The torch mode every runner call runs under (per thread)."""
        with torch.inference_mode():
            yield

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
            pos = self.positions[:n]
            pos.copy_(torch.tensor(list(positions), dtype=torch.long))
            self._mask[:n] = self.model.attention_mask(pos)
            self._index[: n * 2 * self.cache.num_kv_heads] = self.cache.flat_index(
                self._rows[:n], pos
            )
        self._next_ids = None
        deepest = exits[0] if n else 0
        self._rows_by_layer = [sum(1 for e in exits if e > layer) for layer in range(deepest)]
        self._n = n

    def decode(
        self, tokens: Sequence[int], kv_len: int, sampled: Sequence[tuple[int, RowSampling]]
    ) -> list[int]:
        """One step for rows ``0..n-1`` (``tokens[i]`` is row ``i``'s newest token)."""
        n = self._n
        ids = self._next_ids
        if ids is None:
            ids = torch.tensor(list(tokens), dtype=torch.long, device=self.device)
        positions = self.positions[:n]
        mask = self._mask[:n]
        index = self._index[: n * 2 * self.cache.num_kv_heads]
        logits = self.model.decode(
            ids, positions, self._rows_by_layer, self.cache, kv_len, mask, index
        )
        chosen = sample(logits, sampled)
        positions += 1
        index += 1
        mask.index_put_((self._rows[:n], positions), self._zero)
        self._next_ids = chosen
        return chosen.tolist()
