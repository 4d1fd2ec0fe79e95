"""The model runner: the only part of the engine loop that touches torch.

It owns the model, the KV cache and the device-side position buffer, and speaks plain Python to
the loop: token ids and row counts in, chosen token ids (and, for rows that ask, their
log-probabilities) out. One decode step is one call with one host read (the chosen tokens; one
more when a row wants log-probabilities); everything else stays on the device. A later CUDA-graph or
``torch.compile`` path for fixed batch sizes belongs here, behind the same two methods.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

from app.engine.kv_cache import KVCache
from app.engine.logprobs import token_scores
from app.engine.model import Transformer
from app.engine.request_state import Prefilled, Scores
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
        self,
        row: int,
        prompt_ids: Sequence[int],
        exit_layer: int,
        sampling: RowSampling | None,
        logprobs: int | None = None,
        prompt_logprobs: int | None = None,
        generate: bool = True,
        start: int = 0,
        end: int | None = None,
    ) -> Prefilled:
        """Fill cache row ``row`` with prompt positions ``start..end-1`` (all by default) through
        ``exit_layer`` layers. After the last chunk: the first token (unless not ``generate``),
        with its scores for ``logprobs`` alternatives; with ``prompt_logprobs`` the scores of the
        prompt tokens this chunk predicts (the head then runs over every position of it)."""
        prompt = list(prompt_ids)
        end = len(prompt) if end is None else end
        last_chunk = end == len(prompt)
        ids = torch.tensor(prompt[start:end], dtype=torch.long, device=self.device)
        every = prompt_logprobs is not None
        logits = self.model.prefill(
            ids, exit_layer, self.cache, row, every, start, head=every or last_chunk
        )
        token: int | None = None
        scores: Scores | None = None
        if generate and last_chunk:
            last = logits[-1:]
            chosen = sample(last, [(0, sampling)] if sampling else [])
            token = int(chosen.item())
            if logprobs is not None:
                scores = token_scores(last, chosen, [logprobs])[0]
        prompt_scores = None
        if every:  # position i predicts token i + 1; the logits become log-probabilities
            targets = torch.tensor(
                prompt[start + 1 : end + 1], dtype=torch.long, device=self.device
            )
            n = targets.shape[0]
            prompt_scores = token_scores(logits[:n], targets, [prompt_logprobs] * n, in_place=True)
        return Prefilled(token, scores, prompt_scores)

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
        self,
        tokens: Sequence[int],
        kv_len: int,
        sampled: Sequence[tuple[int, RowSampling]],
        scored: Sequence[tuple[int, int]] = (),
    ) -> tuple[list[int], dict[int, Scores]]:
        """One step for rows ``0..n-1`` (``tokens[i]`` is row ``i``'s newest token): the chosen
        tokens, and the scores of the ``scored`` rows (``(row, alternatives)`` pairs) by row."""
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
        scores: dict[int, Scores] = {}
        if scored:
            rows = [r for r, _ in scored]
            picked = torch.tensor(rows, device=self.device)
            found = token_scores(  # (indexing copied the rows: in place is safe)
                logits[picked], chosen[picked], [k for _, k in scored], in_place=True
            )
            scores = dict(zip(rows, found, strict=True))
        return chosen.tolist(), scores
