"""How many prompt tokens the next prefill chunk may take while other requests decode.

Prefill on a CPU is compute-bound and a later chunk also attends to every earlier position, so
a fixed chunk size cannot promise anything about the stall it causes: on Sorted SmolLM2 (2 CPU
threads) 128 tokens at position 1024 take ~290 ms against a ~60 ms decode step of 8 streams.
The pacer sizes each chunk so that it takes at most ``stall`` times the current decode step,
between ``MIN_CHUNK`` and ``max_tokens``; running streams then see gaps of at most about
``1 + stall`` steps. A chunk costs a fixed part (per-layer overhead, the head) plus a part per
token, so the pacer fits ``seconds ≈ fixed + tokens × per_token`` through the recent prefills
(short prompts' and earlier chunks') and takes the decode step as an EWMA. Pure Python: the loop
feeds it seconds.
"""

from __future__ import annotations

from collections import deque

MIN_CHUNK = 16  # below this, per-chunk overhead dominates and a long prompt barely advances
ALPHA = 0.3  # EWMA weight of the newest decode step
SAMPLES = 16  # recent prefills the cost line goes through


class ChunkPacer:
    def __init__(self, max_tokens: int, stall: float) -> None:
        """``max_tokens`` 0 turns chunking off (whole prompts at once)."""
        self.max_tokens = max_tokens
        self.stall = stall
        self.step_s: float | None = None  # a decode step, recent
        self.samples: deque[tuple[int, float]] = deque(maxlen=SAMPLES)  # (tokens, seconds)

    def allowance(self, spent: int, others_running: bool) -> int | None:
        """Tokens the next chunk may take after ``spent`` this iteration (None: no limit; 0 or
        less: decode first). With nothing else running, full chunks, one after the other."""
        if not self.max_tokens:
            return None
        if not others_running:
            return self.max_tokens
        limit = self.max_tokens
        line = self.cost_line()
        if self.step_s and line is not None:
            fixed, per_token = line
            paced = int((self.stall * self.step_s - fixed) / per_token)
            limit = min(limit, max(MIN_CHUNK, paced))
        return limit - spent

    def cost_line(self) -> tuple[float, float] | None:
        """``(fixed, per_token)`` seconds of a prefill, least squares through the samples (a
        line through the origin while they all have one size); None before any sample."""
        if not self.samples:
            return None
        n = len(self.samples)
        mt = sum(t for t, _ in self.samples) / n
        ms = sum(s for _, s in self.samples) / n
        var = sum((t - mt) ** 2 for t, _ in self.samples)
        if var > 0:
            slope = sum((t - mt) * (s - ms) for t, s in self.samples) / var
            fixed = ms - slope * mt
            if slope > 0 and fixed >= 0:
                return fixed, slope
        return 0.0, ms / mt

    def prefilled(self, tokens: int, seconds: float) -> None:
        if tokens > 0 and seconds > 0:
            self.samples.append((tokens, seconds))

    def stepped(self, seconds: float) -> None:
        if seconds > 0:
            self.step_s = (
                seconds if self.step_s is None else (1 - ALPHA) * self.step_s + ALPHA * seconds
            )
