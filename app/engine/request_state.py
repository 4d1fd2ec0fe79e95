"""One request's running state inside the engine: tokens, exit, cache row, text, timings.

Pure Python (no torch). The engine thread owns every field; only ``queue`` and ``loop`` are used to
hand events back to the asyncio side. :meth:`RequestState.accept` is the whole per-token
post-processing: detokenise, match stop strings, decide whether the request is finished.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field

from app.engine.detokenizer import Decode, IncrementalDecoder, StopMatcher
from app.engine.types import (
    Downgrade,
    FinalEvent,
    FinishReason,
    GenerationRequest,
    RowState,
    TokenEvent,
)


@dataclass(frozen=True)
class RowSampling:
    """One row's sampling for one token (greedy rows have none)."""

    temperature: float
    top_k: int
    top_p: float
    uniform: float  # in [0, 1), drawn from the request's own generator


@dataclass(eq=False)
class RequestState:
    request: GenerationRequest
    loop: asyncio.AbstractEventLoop | None
    queue: asyncio.Queue | None
    exit_layer: int
    decoder: IncrementalDecoder
    stops: StopMatcher
    rng: random.Random
    arrival: float
    row: int = -1
    generated: list[int] = field(default_factory=list)
    downgrades: list[Downgrade] = field(default_factory=list)
    prefill_start: float | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None
    sent_text: list[str] = field(default_factory=list)
    finish_reason: FinishReason | None = None

    @classmethod
    def create(
        cls,
        request: GenerationRequest,
        loop: asyncio.AbstractEventLoop | None,
        queue: asyncio.Queue | None,
        decode: Decode,
        arrival: float,
    ) -> RequestState:
        seed = request.sampling.seed
        return cls(
            request=request,
            loop=loop,
            queue=queue,
            exit_layer=request.exit_layer,
            decoder=IncrementalDecoder(decode, request.prompt_ids),
            stops=StopMatcher(request.sampling.stop),
            rng=random.Random(seed) if seed is not None else random.Random(),
            arrival=arrival,
        )

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt_ids)

    @property
    def position(self) -> int:
        """Where the newest token goes in the cache (= positions already filled)."""
        return self.prompt_len + len(self.generated) - 1

    def next_sampling(self) -> RowSampling | None:
        """This token's sampling parameters (one draw from the request's own generator)."""
        p = self.request.sampling
        if p.temperature <= 0.0:
            return None
        return RowSampling(p.temperature, p.top_k, p.top_p, self.rng.random())

    def lower_exit(self, new_exit: int) -> None:
        self.downgrades.append(Downgrade(len(self.generated), self.exit_layer, new_exit))
        self.exit_layer = new_exit

    def accept(
        self, token: int, now: float, eos: frozenset[int], max_seq_len: int
    ) -> tuple[TokenEvent, FinishReason | None]:
        """Take one generated token: its event (with the text now safe to send), and why the
        request ends here, if it does."""
        self.generated.append(token)
        self.last_token_at = now
        if self.first_token_at is None:
            self.first_token_at = now
        p = self.request.sampling
        reason: FinishReason | None = None
        if token in eos and not p.ignore_eos:
            reason = "eos"
            text = ""
        else:
            text = self.stops.push(self.decoder.add(token))
            if self.stops.stopped:
                reason = "stop"
            elif len(self.generated) >= p.max_new_tokens or self.position + 1 >= max_seq_len:
                reason = "length"
        if reason in ("eos", "length"):
            text += self.stops.push(self.decoder.flush())
            if self.stops.stopped:
                reason = "stop"
            else:
                text += self.stops.flush()
        self.sent_text.append(text)
        return TokenEvent(len(self.generated) - 1, text, token, self.exit_layer), reason

    def row_state(self) -> RowState:
        return RowState(
            request_id=self.request_id,
            exit_layer=self.exit_layer,
            generated=len(self.generated),
            max_new_tokens=self.request.sampling.max_new_tokens,
            prompt_tokens=self.prompt_len,
            arrival_time=self.arrival,
        )

    def final_event(self, reason: FinishReason, now: float, error: str | None = None) -> FinalEvent:
        self.finish_reason = reason
        n = len(self.generated)
        first = self.first_token_at
        last = self.last_token_at if self.last_token_at is not None else now
        per_token = (last - first) / (n - 1) * 1000 if first is not None and n > 1 else 0.0
        start = self.prefill_start if self.prefill_start is not None else now
        return FinalEvent(
            request_id=self.request_id,
            text="".join(self.sent_text),
            finish_reason=reason,
            exit_layer=self.exit_layer,
            initial_exit_layer=self.request.exit_layer,
            downgrades=tuple(self.downgrades),
            prompt_tokens=self.prompt_len,
            completion_tokens=n,
            queue_ms=(start - self.arrival) * 1000,
            ttft_ms=(first - self.arrival) * 1000 if first is not None else 0.0,
            total_ms=(last - self.arrival) * 1000,
            ms_per_token=per_token,
            error=error,
        )
