"""One generation request's path through the service: limits → admission → engine → response.

Routes (native and OpenAI-compatible) parse their own bodies, then call this module: it checks the
limits that depend on the served model, tokenizes off the event loop, admits the request (429 when
the bounded queue is full), asks the depth scheduler for an exit, runs it on the engine, records
the metrics and builds the SPEC §3 response object. It never imports torch.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
from starlette.types import Receive

from app.api.errors import ApiError, validation_error
from app.api.state import AppState
from app.engine import EngineClosedError
from app.engine.types import FinalEvent, GenerationRequest, SamplingParams, TokenEvent
from app.scheduler import Decision

logger = logging.getLogger(__name__)

Event = TokenEvent | FinalEvent


@dataclass(frozen=True)
class GenerationParams:
    """A validated request, whatever route it came from."""

    prompt_ids: list[int]
    sampling: SamplingParams
    budget_ms: float | None = None
    exit_layer: int | None = None
    arrival: float = field(default_factory=time.perf_counter)

    @classmethod
    def from_body(
        cls, body: Any, prompt_ids: list[int], max_new_tokens: int, arrival: float
    ) -> GenerationParams:
        """From any route's validated body (native or OpenAI): the fields they share."""
        return cls(
            prompt_ids=prompt_ids,
            sampling=SamplingParams(
                max_new_tokens=max_new_tokens,
                temperature=body.temperature,
                top_p=body.top_p,
                top_k=body.top_k,
                seed=body.seed,
                stop=stop_tuple(body.stop),
                ignore_eos=body.ignore_eos,
            ),
            budget_ms=body.budget_ms,
            exit_layer=body.exit_layer,
            arrival=arrival,
        )


@dataclass
class Job:
    """An admitted request: it holds a queue place until :meth:`GenerationService.release`."""

    request_id: str
    params: GenerationParams
    decision: Decision
    released: bool = False
    final: FinalEvent | None = None


class GenerationService:
    def __init__(self, state: AppState) -> None:
        self.state = state
        self.settings = state.settings
        self.engine = state.engine
        self.scheduler = state.scheduler
        self.metrics = state.metrics

    # -- checks that depend on the served model and the settings --------------------------------
    def check_prompt_chars(self, text: str, field_name: str = "prompt") -> None:
        limit = self.settings.max_prompt_chars
        if len(text) > limit:
            raise validation_error(field_name, f"has {len(text)} characters; the limit is {limit}")

    def resolve_max_new_tokens(self, value: int | None, field_name: str = "max_new_tokens") -> int:
        limit = self.settings.max_new_tokens_limit
        n = min(self.settings.default_max_new_tokens, limit) if value is None else value
        if n > limit:
            raise validation_error(field_name, f"is {n}; this server allows at most {limit}")
        return n

    def check_exit_layer(
        self, exit_layer: int | None, budget_ms: float | None, field_name: str = "exit_layer"
    ) -> None:
        if exit_layer is None:
            return
        if budget_ms is not None:
            raise validation_error(
                field_name, "cannot be combined with budget_ms (the budget chooses the exit)"
            )
        exits = list(self.engine.info.exits)
        if exit_layer not in exits:
            raise validation_error(field_name, f"{exit_layer} is not a trained exit {exits}")

    async def tokenize(self, text: str) -> list[int]:
        return await anyio.to_thread.run_sync(self.engine.encode, text)

    async def tokenize_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        try:
            return await anyio.to_thread.run_sync(self.engine.encode_chat, messages)
        except (ValueError, TypeError, KeyError) as exc:  # template errors (e.g. role order)
            raise validation_error("messages", f"cannot apply the chat template: {exc}") from exc

    def check_context(
        self,
        prompt_tokens: int,
        max_new_tokens: int,
        prompt_field: str = "prompt",
        max_field: str = "max_new_tokens",
    ) -> None:
        context = self.context_length
        if prompt_tokens == 0:
            raise validation_error(prompt_field, "has no tokens")
        if prompt_tokens >= context:
            raise validation_error(
                prompt_field, f"is {prompt_tokens} tokens; the context length is {context}"
            )
        if prompt_tokens + max_new_tokens > context:
            raise validation_error(
                max_field,
                f"{max_new_tokens} plus the prompt's {prompt_tokens} tokens exceeds the context "
                f"length {context}; ask for at most {context - prompt_tokens}",
            )

    @property
    def context_length(self) -> int:
        limit = self.engine.info.max_seq_len
        if self.settings.max_seq_len is not None:
            limit = min(limit, self.settings.max_seq_len)
        return limit

    # -- admission ---------------------------------------------------------------------------------
    def check_capacity(self) -> None:
        """429 when every slot and queue place is taken; called first, so that refusing is cheap
        (again at admission, as other requests may have been admitted meanwhile)."""
        state = self.state
        if state.inflight >= state.capacity:
            wait_s = self.scheduler.expected_wait_ms() / 1000 if self.scheduler else 1.0
            retry = str(min(max(math.ceil(wait_s), 1), 60))
            raise ApiError(
                429,
                "overloaded",
                f"the server is at capacity ({state.capacity} requests in flight); retry later",
                headers={"Retry-After": retry},
            )

    def admit(self, params: GenerationParams, id_prefix: str = "gen") -> Job:
        state = self.state
        self.check_capacity()
        request_id = f"{id_prefix}-{uuid.uuid4().hex}"
        decision = self.scheduler.admit(
            request_id,
            prompt_tokens=len(params.prompt_ids),
            max_new_tokens=params.sampling.max_new_tokens,
            budget_ms=params.budget_ms,
            exit_layer=params.exit_layer,
            arrival=params.arrival,
        )
        state.inflight += 1
        self.metrics.prompt_tokens.inc(len(params.prompt_ids))
        return Job(request_id, params, decision)

    def release(self, job: Job) -> None:
        """Give the queue place back (idempotent); the stream or the route calls it on any exit."""
        if job.released:
            return
        job.released = True
        self.state.inflight -= 1
        final = job.final
        if final is None:
            self.engine.cancel(job.request_id)  # thread-safe; a no-op for a finished request
            self.scheduler.finish(job.request_id)
            return
        self.scheduler.finish(
            job.request_id,
            queue_ms=final.queue_ms,
            ttft_ms=final.ttft_ms,
            total_ms=final.total_ms if final.finish_reason != "cancelled" else None,
            completion_tokens=final.completion_tokens,
        )
        if final.finish_reason in ("cancelled", "error"):
            return
        self.metrics.observe_finished(
            exit_layer=final.exit_layer,
            initial_exit_layer=final.initial_exit_layer,
            queue_ms=final.queue_ms,
            ttft_ms=final.ttft_ms,
            total_ms=final.total_ms,
            completion_tokens=final.completion_tokens,
            budget_ms=job.params.budget_ms,
            predicted_ms=job.decision.predicted_ms,
            downgrades=len(final.downgrades),
        )

    # -- running -----------------------------------------------------------------------------------
    async def events(self, job: Job) -> AsyncIterator[Event]:
        """The engine's events for ``job``; leaving early cancels the request in the engine."""
        p = job.params
        request = GenerationRequest(
            request_id=job.request_id,
            prompt_ids=p.prompt_ids,
            exit_layer=job.decision.exit_layer,
            sampling=p.sampling,
            arrival_time=p.arrival,
        )
        stream = self.engine.generate(request)
        try:
            async for event in stream:
                if isinstance(event, FinalEvent):
                    job.final = event
                else:
                    self.metrics.observe_token(event.exit_layer)
                yield event
        except EngineClosedError as exc:
            raise ApiError(503, "unavailable", "the server is shutting down") from exc
        finally:
            if job.final is None:
                self.engine.cancel(job.request_id)  # thread-safe: the row leaves at the next step
                with anyio.CancelScope(shield=True):
                    await stream.aclose()
            self.release(job)

    async def run(self, job: Job, receive: Receive | None = None) -> FinalEvent | None:
        """Run ``job`` to its end; ``None`` when the client left first (which cancels it)."""
        error: Exception | None = None
        try:
            async with anyio.create_task_group() as tg:
                if receive is not None:
                    tg.start_soon(_cancel_on_disconnect, receive, tg.cancel_scope, job.request_id)
                try:
                    async for _ in self.events(job):
                        pass
                except Exception as exc:  # raised bare below, not wrapped in an ExceptionGroup
                    error = exc
                tg.cancel_scope.cancel()
        finally:
            self.release(job)
        if error is not None:
            raise error
        return job.final

    # -- responses ---------------------------------------------------------------------------------
    def response(self, job: Job, final: FinalEvent) -> dict[str, Any]:
        """The SPEC §3 response object (also the payload of the SSE ``done`` event)."""
        return {
            "id": job.request_id,
            "text": final.text,
            "finish_reason": final.finish_reason,
            "exit_layer": final.exit_layer,
            "num_layers": self.engine.info.num_layers,
            "usage": {
                "prompt_tokens": final.prompt_tokens,
                "completion_tokens": final.completion_tokens,
            },
            "budget": self.budget_report(job, final),
            "timings": {
                "queue_ms": round(final.queue_ms, 3),
                "ttft_ms": round(final.ttft_ms, 3),
                "total_ms": round(final.total_ms, 3),
                "ms_per_token": round(final.ms_per_token, 3),
            },
        }

    def budget_report(self, job: Job, final: FinalEvent) -> dict[str, Any]:
        budget = job.params.budget_ms
        return {
            "budget_ms": budget,
            "predicted_ms": round(job.decision.predicted_ms, 3),
            "elapsed_ms": round(final.total_ms, 3),
            "met": None if budget is None else final.total_ms <= budget,
            "feasible": job.decision.feasible,
            "initial_exit_layer": final.initial_exit_layer,
            "downgrades": downgrades_json(final),
        }

    def error_from_final(self, final: FinalEvent) -> ApiError:
        if self.state.draining:
            return ApiError(503, "unavailable", "the server shut down before the request finished")
        reason = final.error or "the engine failed"
        return ApiError(500, "internal", f"generation failed: {reason}")


def downgrades_json(final: FinalEvent) -> list[dict[str, int]]:
    return [
        {"at_token": d.at_token, "from": d.from_exit, "to": d.to_exit} for d in final.downgrades
    ]


def stop_tuple(stop: str | Sequence[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    return (stop,) if isinstance(stop, str) else tuple(stop)


async def _cancel_on_disconnect(
    receive: Receive, scope: anyio.CancelScope, request_id: str
) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            logger.info("client left; cancelling %s", request_id)
            scope.cancel()
            return
        await anyio.sleep(0.05)  # a stray body message: never spin
