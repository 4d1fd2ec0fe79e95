"""How many prompt tokens the next prefill chunk may take while other requests decode.

Prefill on a CPU is compute-bound and a later chunk also attends to every earlier position, so
a fixed chunk size cannot promise anything about the stall it causes: on Sorted SmolLM2 (2 CPU
threads) 128 tokens at position 1024 take ~290 ms against a ~60 ms decode step of 8 streams.
The pacer aims each chunk at ``stall`` times the current decode step (an EWMA), between
``MIN_CHUNK`` and ``max_tokens`` tokens, so that running streams see gaps of about
``1 + stall`` steps. It steers by the last chunk: ``next = last × target / its seconds`` (at most
doubling), which settles where ``fixed + tokens × per_token`` meets the target whatever the fixed
part, and follows the cost up as the context grows. (Per-token costs estimated from short
prompts, or a line fitted through a narrow range of chunk sizes, both went wrong on SmolLM2.)
Pure Python: the loop feeds it seconds.
"""

from __future__ import annotations

MIN_CHUNK = 16  # below this, per-chunk overhead dominates and a long prompt barely advances
FIRST_CHUNK = 32  # the first chunk of a prompt while others decode, before any measurement
ALPHA = 0.3  # EWMA weight of the newest decode step


class ChunkPacer:
    def __init__(self, max_tokens: int, stall: float) -> None:
        """``max_tokens`` 0 turns chunking off (whole prompts at once)."""
        self.max_tokens = max_tokens
        self.stall = stall
        self.step_s: float | None = None  # a decode step, recent
        self.chunk = min(FIRST_CHUNK, max_tokens)  # tokens the next paced chunk may take

    def allowance(self, spent: int, others_running: bool) -> int | None:
        """Tokens the next chunk may take after ``spent`` this iteration (None: no limit; 0 or
        less: decode first). With nothing else running, full chunks, one after the other."""
        if not self.max_tokens:
            return None
        if not others_running:
            return self.max_tokens
        return self.chunk - spent

    def prefilled(self, tokens: int, seconds: float, others_running: bool = True) -> None:
        """A chunk of ``tokens`` took ``seconds``: steer the next one (only paced chunks, and
        only a full one: a prompt's short tail says little about the rate)."""
        if not (others_running and self.step_s and seconds > 0 and tokens >= self.chunk):
            return
        target = self.stall * self.step_s
        wanted = int(tokens * target / seconds)
        self.chunk = max(min(MIN_CHUNK, self.max_tokens), min(wanted, 2 * tokens, self.max_tokens))

    def stepped(self, seconds: float) -> None:
        if seconds > 0:
            old = self.step_s
            self.step_s = seconds if old is None else (1 - ALPHA) * old + ALPHA * seconds
