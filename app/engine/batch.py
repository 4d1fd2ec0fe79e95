"""The batch: which requests wait, which run in which cache row, and what leaves when.

Pure Python (no torch), owned by the engine's worker thread and unit-tested on its own. It keeps
the running requests in rows ``0..n-1`` ordered by exit, deepest first (see
:mod:`app.engine.kv_cache` for why), plans the row moves that keep that order, turns each chosen
token into its events and finishes requests. Events are collected per event loop in ``outbox``;
the worker loop hands them to the relay.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from app.engine.request_state import RequestState, RowSampling, Scores
from app.engine.rows import plan_rows
from app.engine.types import Event, FinishReason, RowState, StepReport

logger = logging.getLogger(__name__)

__all__ = ["Batch", "Layout", "Outbox", "StepInputs", "plan_rows"]

Outbox = dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, Event]]]


@dataclass(frozen=True)
class Layout:
    """Row moves ``(src, dst, exit)`` copying positions ``< copy_len``; then rows ``0..n-1``
    hold requests at these positions and exits (non-increasing)."""

    moves: list[tuple[int, int, int]]
    copy_len: int
    positions: list[int]
    exits: list[int]


@dataclass(frozen=True)
class StepInputs:
    tokens: list[int]  # each row's newest token
    kv_len: int  # positions any row attends to
    sampled: list[tuple[int, RowSampling]]  # non-greedy rows
    scored: list[tuple[int, int]] = field(
        default_factory=list
    )  # (row, alternatives) wanting logprobs


class Batch:
    def __init__(
        self,
        max_slots: int,
        max_seq_len: int,
        eos: frozenset[int],
        on_done: Callable[[str], None] = lambda _: None,
    ) -> None:
        self.max_slots = max_slots
        self.max_seq_len = max_seq_len
        self.eos = eos
        self._on_done = on_done  # told when a request has sent its final event
        self.requests: dict[str, RequestState] = {}
        self.waiting: deque[RequestState] = deque()
        self.running: list[RequestState] = []  # in row order once laid out
        # the request whose prompt is being prefilled chunk by chunk: it holds a row outside
        # the running rows' 0..n-1 (see layout) but does not decode yet
        self.prefilling: RequestState | None = None
        self.left: list[RowState] = []  # rows that left since the last report
        self.outbox: Outbox = {}
        self._dirty = False

    @property
    def busy(self) -> bool:
        return bool(self.running or self.waiting or self.prefilling)

    def add(self, state: RequestState) -> None:
        self.requests[state.request_id] = state
        self.waiting.append(state)

    def cancel(self, request_id: str) -> None:
        state = self.requests.get(request_id)
        if state is not None:
            self.finish(state, "cancelled")

    # -- admission --------------------------------------------------------------------------------
    def next_admission(self) -> RequestState | None:
        """The request to prefill next: the one part-way through its prompt, else the next
        waiting one, given the lowest free row (where it most likely stays once it runs)."""
        if self.prefilling is not None:
            return self.prefilling
        if not self.waiting or len(self.running) >= self.max_slots:
            return None
        state = self.waiting.popleft()
        used = {s.row for s in self.running}
        state.row = next(r for r in range(self.max_slots) if r not in used)
        state.prefill_start = time.perf_counter()
        self.prefilling = state
        return state

    def chunk_done(self, state: RequestState, tokens: int, scores: Sequence[Scores] | None) -> None:
        """``tokens`` more prompt positions of ``state`` are in its row (not the last chunk)."""
        state.prefilled += tokens
        if scores:
            state.chunk_scores.extend(scores)

    def joined(
        self,
        state: RequestState,
        token: int | None,
        now: float,
        scores: Scores | None = None,
        prompt_scores: Sequence[Scores] | None = None,
    ) -> None:
        """``state``'s prefill chose ``token``: it runs from the next step unless already done.

        ``token`` is None when the request only scores its prompt: it ends here (``length``).
        ``prompt_scores`` are the last chunk's; earlier chunks' came through :meth:`chunk_done`.
        """
        if self.prefilling is state:
            self.prefilling = None
        state.prefilled = state.prompt_len
        self.running.append(state)
        self._dirty = True
        if prompt_scores is not None:
            state.score_prompt([*state.chunk_scores, *prompt_scores])
            state.chunk_scores = []
        if token is None:
            state.first_token_at = state.last_token_at = now
            self.finish(state, "length")
        else:
            self.accept(state, token, now, scores)

    # -- layout and steps -------------------------------------------------------------------------
    def lower(self, state: RequestState, exit_layer: object) -> None:
        if not isinstance(exit_layer, int) or not 1 <= exit_layer < state.exit_layer:
            logger.debug("ignored lowering %s to %r", state.request_id, exit_layer)
            return
        state.lower_exit(exit_layer)
        if state.row >= 0:
            self._dirty = True

    def layout(self) -> Layout | None:
        """The new row layout if membership or exits changed since the last one, else None."""
        if not self._dirty:
            return None
        self._dirty = False
        running = self.running
        current = [s.row for s in running]
        exits = [s.exit_layer for s in running]
        rows = plan_rows(current, exits)
        moved = [i for i, (c, n) in enumerate(zip(current, rows, strict=True)) if c != n]
        moves = [(current[i], rows[i], exits[i]) for i in moved]
        copy_len = max((running[i].position for i in moved), default=0)
        p = self.prefilling
        if p is not None and p.row < len(rows):  # in the way: it goes just above the running
            moves.append((p.row, len(rows), p.exit_layer))
            copy_len = max(copy_len, p.prefilled)
            p.row = len(rows)
        for state, row in zip(running, rows, strict=True):
            state.row = row
        running.sort(key=lambda s: s.row)
        return Layout(
            moves, copy_len, [s.position for s in running], [s.exit_layer for s in running]
        )

    def step_inputs(self) -> StepInputs:
        running = self.running
        sampled = []
        scored = []
        for i, state in enumerate(running):
            params = state.next_sampling()
            if params is not None:
                sampled.append((i, params))
            if state.request.sampling.logprobs is not None:
                scored.append((i, state.request.sampling.logprobs))
        return StepInputs(
            [s.generated[-1] for s in running],
            max(s.position for s in running) + 1,
            sampled,
            scored,
        )

    def stepped(
        self,
        tokens: Sequence[int],
        now: float,
        seconds: float,
        scores: Mapping[int, Scores] | None = None,
    ) -> StepReport:
        """Post-process one decode step's tokens and scores (by row); the step's report."""
        stepped = list(self.running)
        exits = tuple(s.exit_layer for s in stepped)
        scores = scores or {}
        for i, (state, token) in enumerate(zip(stepped, tokens, strict=True)):
            try:
                self.accept(state, token, now, scores.get(i))
            except Exception as exc:
                logger.exception("post-processing failed for %s", state.request_id)
                self.finish(state, "error", error=f"post-processing failed: {exc}")
        left, self.left = self.left, []
        return StepReport(
            now=now,
            step_seconds=seconds,
            exits=exits,
            rows=tuple(s.row_state() for s in self.running),
            finished=tuple(left),
            waiting=len(self.waiting),
        )

    # -- tokens and endings -----------------------------------------------------------------------
    def accept(
        self, state: RequestState, token: int, now: float, scores: Scores | None = None
    ) -> None:
        event, reason = state.accept(token, now, self.eos, self.max_seq_len, scores)
        self._emit(state, event)
        if reason is not None:
            self.finish(state, reason)

    def finish(self, state: RequestState, reason: FinishReason, error: str | None = None) -> None:
        if state.finish_reason is not None:
            return
        self._emit(state, state.final_event(reason, time.perf_counter(), error))
        self.requests.pop(state.request_id, None)
        if state in self.running:
            self.left.append(state.row_state())
            self.running.remove(state)
            self._dirty = True
        elif state is self.prefilling:
            self.prefilling = None
        elif state in self.waiting:
            self.waiting.remove(state)
        state.row = -1
        self._on_done(state.request_id)

    def finish_all(self, reason: FinishReason, error: str | None = None) -> None:
        prefilling = [self.prefilling] if self.prefilling is not None else []
        for state in [*self.running, *prefilling, *self.waiting]:
            self.finish(state, reason, error)

    def _emit(self, state: RequestState, event: Event) -> None:
        if state.loop is not None and state.queue is not None:
            self.outbox.setdefault(state.loop, []).append((state.queue, event))

    def take_events(self) -> Outbox:
        outbox, self.outbox = self.outbox, {}
        return outbox
