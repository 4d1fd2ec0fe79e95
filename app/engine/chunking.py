"""How many prompt tokens the next prefill chunk may take while other requests decode.

Prefill on a CPU is compute-bound and a later chunk also attends to every earlier position, so
a fixed chunk size cannot promise anything about the stall it causes: on Sorted SmolLM2 (2 CPU
threads) 128 tokens at position 1024 take ~290 ms against a ~60 ms decode step of 8 streams.
The pacer sizes each chunk so that it takes at most ``stall`` times the current decode step
(EWMAs of both, measured by the loop), between ``MIN_CHUNK`` and ``max_tokens``. Running streams
then see gaps of at most about ``1 + stall`` steps. Pure Python: the loop feeds it seconds.
"""

from __future__ import annotations

MIN_CHUNK = 16  # below this, per-chunk overhead dominates and a long prompt barely advances
ALPHA = 0.3  # EWMA weight of the newest measurement


class ChunkPacer:
    def __init__(self, max_tokens: int, stall: float) -> None:
        """``max_tokens`` 0 turns chunking off (whole prompts at once)."""
        self.max_tokens = max_tokens
        self.stall = stall
        self.step_s: float | None = None  # a decode step, recent
        self.token_s: float | None = None  # one prefilled prompt token, recent

    def allowance(self, spent: int, others_running: bool) -> int | None:
        """Tokens the next chunk may take after ``spent`` this iteration (None: no limit; 0 or
        less: decode first). With nothing else running, full chunks, one after the other."""
        if not self.max_tokens:
            return None
        if not others_running:
            return self.max_tokens
        limit = self.max_tokens
        if self.step_s and self.token_s:
            paced = int(self.stall * self.step_s / self.token_s)
            limit = min(limit, max(MIN_CHUNK, paced))
        return limit - spent

    def prefilled(self, tokens: int, seconds: float) -> None:
        if tokens > 0 and seconds > 0:
            self.token_s = _ewma(self.token_s, seconds / tokens)

    def stepped(self, seconds: float) -> None:
        if seconds > 0:
            self.step_s = _ewma(self.step_s, seconds)


def _ewma(old: float | None, new: float) -> float:
    return new if old is None else (1 - ALPHA) * old + ALPHA * new
