"""One generation request's path through the service, for every route: prepare → run → release.

- :meth:`GenerationService.prepare` is the single place where a request is checked against the
  served model and the settings (queue place, prompt size, ``max_new_tokens``, context, trained
  exit; the checks themselves are in :mod:`app.api.limits`) and where it is tokenised and
  admitted by the depth scheduler. Its result is the request's
  one record, a :class:`Job` (the engine's ``GenerationRequest`` plus what the API adds).
- :meth:`GenerationService.events` runs it on the engine; :meth:`GenerationService.release` gives
  the queue place back and tells the scheduler and the metrics how it went.

Shaping the answers is :mod:`app.api.respond`'s job. Imports no torch.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
from starlette.types import Receive

from app.api import limits
from app.api.errors import ApiError, validation_error
from app.api.state import AppState
from app.engine.types import (
    EngineClosedError,
    Event,
    FinalEvent,
    GenerationRequest,
    SamplingParams,
)
from app.scheduler import Decision, SchedulingError

logger = logging.getLogger(__name__)


@dataclass
class Job:
    """An admitted request: it holds a queue place until :meth:`GenerationService.release`."""

    request: GenerationRequest  # what the engine runs (exit_layer: the scheduler's decision)
    budget_ms: float | None
    decision: Decision
    released: bool = False
    final: FinalEvent | None = None

    @property
    def request_id(self) -> str:
        return self.request.request_id


class GenerationService:
    def __init__(self, state: AppState) -> None:
        self.state = state
        self.settings = state.settings
        self.engine = state.engine
        self.scheduler = state.scheduler
        self.metrics = state.metrics

    # -- prepare: every check, once ------------------------------------------------------------
    async def prepare(
        self,
        body: Any,
        arrival: float,
        *,
        text: str | None = None,
        messages: list[dict[str, str]] | None = None,
        token_ids: list[int] | None = None,
        max_new_tokens: int | None = None,
        logprobs: int | None = None,
        prompt_logprobs: int | None = None,
        prompt_field: str = "prompt",
        max_field: str = "max_new_tokens",
        id_prefix: str = "gen",
    ) -> Job:
        """Check, tokenise (``text`` as is, ``messages`` through the chat template, or take
        ``token_ids`` as they are) and admit.

        ``body`` is any route's validated body: its sampling fields, ``budget_ms`` and
        ``exit_layer`` share their names across routes. Holds a queue place from the start (429
        when none is left), so that requests being tokenised count against the capacity.
        ``logprobs`` / ``prompt_logprobs`` are the engine's (``SamplingParams``); a
        ``max_new_tokens`` of 0 (only with ``prompt_logprobs``) scores the prompt only.
        """
        limits.take_place(self.state)
        try:
            chars = text if text is not None else "".join(m["content"] for m in messages or [])
            limits.check_chars(self.settings, chars, prompt_field)
            n = limits.max_new_tokens(self.settings, max_new_tokens, max_field)
            if token_ids is not None:
                limits.check_token_ids(self.state, token_ids, prompt_field)
                prompt_ids = list(token_ids)
            elif text is not None:
                prompt_ids = await anyio.to_thread.run_sync(self.engine.encode, text)
            else:
                prompt_ids = await self._encode_chat(messages or [], prompt_field)
            limits.check_context(self.state, len(prompt_ids), n, prompt_field, max_field)
            request_id = f"{id_prefix}-{uuid.uuid4().hex}"
            try:
                decision = self.scheduler.admit(
                    request_id,
                    prompt_tokens=len(prompt_ids),
                    max_new_tokens=n,
                    budget_ms=body.budget_ms,
                    exit_layer=body.exit_layer,
                    arrival=arrival,
                )
            except SchedulingError as exc:  # the exit_layer is not a trained exit
                raise validation_error("exit_layer", str(exc)) from exc
        except BaseException:
            self.state.inflight -= 1
            raise
        self.metrics.prompt_tokens.inc(len(prompt_ids))
        request = GenerationRequest(
            request_id=request_id,
            prompt_ids=prompt_ids,
            exit_layer=decision.exit_layer,
            sampling=SamplingParams(
                max_new_tokens=n,
                temperature=body.temperature,
                top_p=body.top_p,
                top_k=body.top_k,
                seed=body.seed,
                stop=stop_tuple(body.stop),
                ignore_eos=body.ignore_eos,
                logprobs=logprobs,
                prompt_logprobs=prompt_logprobs,
            ),
            arrival_time=arrival,
        )
        return Job(request, body.budget_ms, decision)

    async def _encode_chat(self, messages: list[dict[str, str]], field: str) -> list[int]:
        try:
            return await anyio.to_thread.run_sync(self.engine.encode_chat, messages)
        except (ValueError, TypeError, KeyError) as exc:  # template errors (e.g. role order)
            raise validation_error(field, f"cannot apply the chat template: {exc}") from exc

    # -- run ---------------------------------------------------------------------------------------
    async def events(self, job: Job) -> AsyncIterator[Event]:
        """The engine's events for ``job``; leaving early cancels the request in the engine (its
        stream's ``aclose``) and releases the job either way."""
        stream = self.engine.generate(job.request)
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
            with anyio.CancelScope(shield=True):
                await stream.aclose()
            self.release(job)

    async def run(self, job: Job, receive: Receive) -> FinalEvent | None:
        """Run ``job`` to its end; ``None`` when the client left first (which cancels it)."""
        error: Exception | None = None
        async with anyio.create_task_group() as tg:
            tg.start_soon(_cancel_on_disconnect, receive, tg.cancel_scope, job.request_id)
            try:
                async for _ in self.events(job):
                    pass
            except Exception as exc:  # raised bare below, not wrapped in an ExceptionGroup
                error = exc
            tg.cancel_scope.cancel()
        if error is not None:
            raise error
        return job.final

    def release(self, job: Job) -> None:
        """Give the queue place back and report the outcome (idempotent: the stream's end and the
        response's close both call it; the first one counts)."""
        if job.released:
            return
        job.released = True
        self.state.inflight -= 1
        final = job.final
        if final is None:
            self.scheduler.finish(job.request_id)
            return
        if job.request.sampling.prompt_logprobs is not None:
            # a scored prompt runs the head over every position: no lesson for other prefills
            self.scheduler.finish(job.request_id)
        else:
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
            budget_ms=job.budget_ms,
            predicted_ms=job.decision.predicted_ms,
            downgrades=len(final.downgrades),
        )

    # -- what every route's answer shares ------------------------------------------------------
    def budget_report(self, job: Job, final: FinalEvent) -> dict[str, Any]:
        budget = job.budget_ms
        return {
            "budget_ms": budget,
            "predicted_ms": round(job.decision.predicted_ms, 3),
            "elapsed_ms": round(final.total_ms, 3),
            "met": None if budget is None else final.total_ms <= budget,
            "feasible": job.decision.feasible,
            "initial_exit_layer": final.initial_exit_layer,
            "downgrades": [
                {"at_token": d.at_token, "from": d.from_exit, "to": d.to_exit}
                for d in final.downgrades
            ],
        }

    def error_from_final(self, final: FinalEvent) -> ApiError:
        if self.state.draining:
            return ApiError(503, "unavailable", "the server shut down before the request finished")
        reason = final.error or "the engine failed"
        return ApiError(500, "internal", f"generation failed: {reason}")


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
