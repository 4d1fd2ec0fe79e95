"""One request's running state inside the engine: tokens, exit, cache row, text, timings.

Pure Python (no torch). The engine thread owns every field; only ``queue`` and ``loop`` are used to
hand events back to the asyncio side. :meth:`RequestState.accept` is the whole per-token
post-processing: detokenise, match stop strings, decide whether the request is finished, and turn
the runner's log-probabilities (:class:`Scores`) into :class:`~app.engine.types.TokenLogprob`
records with the tokens' texts; :meth:`RequestState.score_prompt` does the same for the prompt.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from app.engine.detokenizer import Decode, IncrementalDecoder, StopMatcher
from app.engine.types import (
    Alternative,
    Downgrade,
    FinalEvent,
    FinishReason,
    GenerationRequest,
    RowState,
    TokenEvent,
    TokenLogprob,
)


@dataclass(frozen=True)
class RowSampling:
    """One row's sampling for one token (greedy rows have none)."""

    temperature: float
    top_k: int
    top_p: float
    uniform: float  # in [0, 1), drawn from the request's own generator


class Scores(NamedTuple):
    """What the runner reads back for one scored position: the token's log-probability and the
    best alternatives (ids and log-probabilities, best first)."""

    logprob: float
    top_ids: list[int]
    top_logprobs: list[float]


@dataclass(frozen=True)
class Prefilled:
    """A prefill's outcome: the first token (None when only the prompt is scored), its scores
    and the prompt's (positions 1..t-1), each when asked for."""

    token: int | None
    scores: Scores | None = None
    prompt_scores: list[Scores] | None = None


@dataclass(eq=False)
class RequestState:
    request: GenerationRequest
    loop: asyncio.AbstractEventLoop | None
    queue: asyncio.Queue | None
    exit_layer: int
    decode: Decode
    decoder: IncrementalDecoder
    stops: StopMatcher
    rng: random.Random
    arrival: float
    row: int = -1
    generated: list[int] = field(default_factory=list)
    downgrades: list[Downgrade] = field(default_factory=list)
    prefill_start: float | None = None
    prefilled: int = 0  # prompt positions in the cache so far (chunked prefill)
    chunk_scores: list[Scores] = field(default_factory=list)  # the prompt's, chunk by chunk
    first_token_at: float | None = None
    last_token_at: float | None = None
    sent_text: list[str] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: tuple[TokenLogprob, ...] | None = None

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
            decode=decode,
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
        self,
        token: int,
        now: float,
        eos: frozenset[int],
        max_seq_len: int,
        scores: Scores | None = None,
    ) -> tuple[TokenEvent, FinishReason | None]:
        """Take one generated token (and its scores, when asked for): its event (with the text
        now safe to send), and why the request ends here, if it does."""
        self.generated.append(token)
        self.last_token_at = now
        if self.first_token_at is None:
            self.first_token_at = now
        p = self.request.sampling
        texts = self.decoder.peek(scores.top_ids) if scores is not None else []
        reason: FinishReason | None = None
        if token in eos and not p.ignore_eos:
            reason = "eos"
            piece = text = ""
        else:
            piece = self.decoder.add(token)
            text = self.stops.push(piece)
            if self.stops.stopped:
                reason = "stop"
            elif len(self.generated) >= p.max_new_tokens or self.position + 1 >= max_seq_len:
                reason = "length"
        if reason in ("eos", "length"):
            tail = self.decoder.flush()
            piece += tail
            text += self.stops.push(tail)
            if self.stops.stopped:
                reason = "stop"
            else:
                text += self.stops.flush()
        self.sent_text.append(text)
        logprob = None
        if scores is not None:
            logprob = _record(token, piece, scores, texts)
            self.logprobs.append(logprob)
        first = len(self.generated) == 1
        event = TokenEvent(
            len(self.generated) - 1,
            text,
            token,
            self.exit_layer,
            logprobs=logprob,
            prompt_logprobs=self.prompt_logprobs if first else None,
        )
        return event, reason

    def score_prompt(self, scores: Sequence[Scores]) -> None:
        """Keep the prompt's records: ``scores[i]`` is of prompt token ``i + 1``."""
        ids = self.request.prompt_ids
        decoder = IncrementalDecoder(self.decode, [])
        records = []
        for i, token in enumerate(ids):
            s = scores[i - 1] if i else None
            texts = decoder.peek(s.top_ids) if s is not None else []
            piece = decoder.add(token)
            if i == len(ids) - 1:
                piece += decoder.flush()
            records.append(_record(token, piece, s, texts))
        self.prompt_logprobs = tuple(records)

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
            logprobs=tuple(self.logprobs) if self.request.sampling.logprobs is not None else None,
            prompt_logprobs=self.prompt_logprobs,
        )


def _record(token: int, text: str, scores: Scores | None, texts: Sequence[str]) -> TokenLogprob:
    """``token``'s record; an alternative that is the token itself shows the token's own text."""
    if scores is None:
        return TokenLogprob(token, text, None)
    top = tuple(
        Alternative(t, text if t == token else alt, lp)
        for t, alt, lp in zip(scores.top_ids, texts, scores.top_logprobs, strict=True)
    )
    return TokenLogprob(token, text, scores.logprob, top)
