"""OpenAI-compatible routes: ``/v1/completions``, ``/v1/chat/completions``, ``/v1/models``.

Same path through the service as ``/v1/generate``; only the body and the response shapes differ.
The chosen exit (and the budget report) travels in a ``sortedserve`` object on every response and
stream chunk. Streams end with ``data: [DONE]``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from app.api.deps import ServiceDep, StateDep
from app.api.errors import ApiError, error_body, error_response, error_responses
from app.api.generation import GenerationParams, GenerationService, Job
from app.api.middleware import ARRIVAL_KEY
from app.api.openai_schemas import ChatCompletionRequest, CompletionRequest
from app.api.sse import SSE_MEDIA_TYPE, JobEventSource, sse_event
from app.engine.types import FinalEvent

logger = logging.getLogger(__name__)

router = APIRouter(tags=["openai"])

Kind = Literal["completion", "chat"]
_FINISH = {"length": "length", "stop": "stop", "eos": "stop", "cancelled": "abort"}
_ERRORS = error_responses(401, 413, 422, 429, 500, 503)
_EVENT = {"type": "object", "properties": {"data": {"type": "string"}}, "required": ["data"]}
_STREAM_DOC = {200: {"content": {SSE_MEDIA_TYPE: {"schema": _EVENT}}}}


def _sortedserve(service: GenerationService, job: Job, final: FinalEvent) -> dict[str, Any]:
    return {
        "exit_layer": final.exit_layer,
        "initial_exit_layer": final.initial_exit_layer,
        "num_layers": service.engine.info.num_layers,
        "budget": service.budget_report(job, final),
    }


def _usage(final: FinalEvent) -> dict[str, int]:
    return {
        "prompt_tokens": final.prompt_tokens,
        "completion_tokens": final.completion_tokens,
        "total_tokens": final.prompt_tokens + final.completion_tokens,
    }


def _admit(
    service: GenerationService,
    body: CompletionRequest | ChatCompletionRequest,
    prompt_ids: list[int],
    max_new_tokens: int,
    arrival: float,
    id_prefix: str,
) -> Job:
    return service.admit(
        GenerationParams.from_body(body, prompt_ids, max_new_tokens, arrival),
        id_prefix=id_prefix,
    )


@router.post(
    "/v1/completions",
    summary="OpenAI-compatible text completion",
    responses={**_STREAM_DOC, **_ERRORS},
)
async def completions(body: CompletionRequest, request: Request, service: ServiceDep) -> Response:
    arrival = request.scope.get(ARRIVAL_KEY, time.perf_counter())
    service.check_capacity()
    prompt = body.prompt_text
    service.check_prompt_chars(prompt)
    max_new_tokens = service.resolve_max_new_tokens(body.max_tokens, "max_tokens")
    service.check_exit_layer(body.exit_layer, body.budget_ms)
    prompt_ids = await service.tokenize(prompt)
    service.check_context(len(prompt_ids), max_new_tokens, "prompt", "max_tokens")
    job = _admit(service, body, prompt_ids, max_new_tokens, arrival, "cmpl")
    return await _respond(service, job, body, request, "completion")


@router.post(
    "/v1/chat/completions",
    summary="OpenAI-compatible chat completion (the tokenizer's chat template is applied)",
    responses={**_STREAM_DOC, **_ERRORS},
)
async def chat_completions(
    body: ChatCompletionRequest, request: Request, service: ServiceDep
) -> Response:
    arrival = request.scope.get(ARRIVAL_KEY, time.perf_counter())
    service.check_capacity()
    messages = [m.as_template_message() for m in body.messages]
    service.check_prompt_chars("".join(m["content"] for m in messages), "messages")
    field = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
    max_new_tokens = service.resolve_max_new_tokens(body.max_new_tokens, field)
    service.check_exit_layer(body.exit_layer, body.budget_ms)
    prompt_ids = await service.tokenize_chat(messages)
    service.check_context(len(prompt_ids), max_new_tokens, "messages", field)
    job = _admit(service, body, prompt_ids, max_new_tokens, arrival, "chatcmpl")
    return await _respond(service, job, body, request, "chat")


async def _respond(
    service: GenerationService,
    job: Job,
    body: CompletionRequest | ChatCompletionRequest,
    request: Request,
    kind: Kind,
) -> Response:
    chunks = _Chunks(service, job, kind, body.model)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return JobEventSource(_stream(chunks, include_usage), lambda: service.release(job))
    final = await service.run(job, request.receive)
    if final is None:
        return error_response(503, "unavailable", "the client disconnected")
    if final.finish_reason == "error":
        raise service.error_from_final(final)
    return JSONResponse(chunks.whole(final))


class _Chunks:
    """Builds the OpenAI-shaped objects of one request."""

    def __init__(self, service: GenerationService, job: Job, kind: Kind, model: str | None):
        self.service = service
        self.job = job
        self.kind = kind
        self.created = int(time.time())
        self.model = service.state.model_id

    def _envelope(self, chunk: bool) -> dict[str, Any]:
        if self.kind == "chat":
            obj = "chat.completion.chunk" if chunk else "chat.completion"
        else:
            obj = "text_completion"
        return {
            "id": self.job.request_id,
            "object": obj,
            "created": self.created,
            "model": self.model,
        }

    def _choice(self, text: str | None, finish: str | None, chunk: bool, role: bool = False):
        choice: dict[str, Any] = {"index": 0}
        if self.kind == "completion":
            choice.update(text=text or "", logprobs=None)
        elif chunk:
            delta: dict[str, Any] = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            choice.update(delta=delta, logprobs=None)
        else:
            choice.update(message={"role": "assistant", "content": text}, logprobs=None)
        choice["finish_reason"] = finish
        return choice

    def whole(self, final: FinalEvent) -> dict[str, Any]:
        return {
            **self._envelope(chunk=False),
            "choices": [self._choice(final.text, _FINISH[final.finish_reason], chunk=False)],
            "usage": _usage(final),
            "sortedserve": _sortedserve(self.service, self.job, final),
        }

    def first(self) -> dict[str, Any] | None:
        if self.kind != "chat":
            return None
        return {**self._envelope(True), "choices": [self._choice("", None, True, role=True)]}

    def token(self, text: str, exit_layer: int) -> dict[str, Any]:
        return {
            **self._envelope(True),
            "choices": [self._choice(text, None, True)],
            "sortedserve": {"exit_layer": exit_layer},
        }

    def last(self, final: FinalEvent) -> dict[str, Any]:
        return {
            **self._envelope(True),
            "choices": [self._choice(None, _FINISH[final.finish_reason], True)],
            "sortedserve": _sortedserve(self.service, self.job, final),
        }

    def usage(self, final: FinalEvent) -> dict[str, Any]:
        return {**self._envelope(True), "choices": [], "usage": _usage(final)}


async def _stream(chunks: _Chunks, include_usage: bool) -> AsyncIterator[dict[str, str]]:
    service, job = chunks.service, chunks.job
    usage_field = {"usage": None} if include_usage else {}
    try:
        first = chunks.first()
        if first is not None:
            yield sse_event(None, {**first, **usage_field})
        async for event in service.events(job):
            if not isinstance(event, FinalEvent):
                if event.text:
                    chunk = chunks.token(event.text, event.exit_layer)
                    yield sse_event(None, {**chunk, **usage_field})
            elif event.finish_reason == "error":
                err = service.error_from_final(event)
                yield sse_event(None, error_body(err.error_type, err.message))
            else:
                yield sse_event(None, {**chunks.last(event), **usage_field})
                if include_usage:
                    yield sse_event(None, chunks.usage(event))
    except ApiError as exc:
        yield sse_event(None, error_body(exc.error_type, exc.message))
    except Exception as exc:  # the stream is open: the failure must travel inside it
        logger.exception("stream %s failed", job.request_id)
        yield sse_event(None, error_body("internal", f"generation failed: {exc}"))
    yield sse_event(None, "[DONE]")


@router.get("/v1/models", summary="The served model (OpenAI-compatible)", responses=_ERRORS)
async def models(state: StateDep) -> dict[str, Any]:
    data = []
    if state.engine is not None:
        info = state.engine.info
        data.append(
            {
                "id": state.model_id,
                "object": "model",
                "created": state.created,
                "owned_by": "sortedserve",
                "max_model_len": info.max_seq_len,
                "sortedserve": {"num_layers": info.num_layers, "exits": list(info.exits)},
            }
        )
    return {"object": "list", "data": data}
