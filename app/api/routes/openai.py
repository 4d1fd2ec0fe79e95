"""OpenAI-compatible routes: ``/v1/completions``, ``/v1/chat/completions``, ``/v1/models``.

Same path as ``/v1/generate`` (prepare → respond); only the bodies and the payload shapes
(:mod:`app.api.routes.openai_shapes`) differ.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from app.api.deps import ServiceDep, StateDep
from app.api.errors import error_responses
from app.api.middleware import ARRIVAL_KEY
from app.api.openai_schemas import ChatCompletionRequest, CompletionRequest
from app.api.respond import respond
from app.api.routes.openai_shapes import OpenAIShape
from app.api.sse import SSE_MEDIA_TYPE

router = APIRouter(tags=["openai"])

_ERRORS = error_responses(401, 413, 422, 429, 500, 503)
_EVENT = {"type": "object", "properties": {"data": {"type": "string"}}, "required": ["data"]}
_STREAM_DOC = {200: {"content": {SSE_MEDIA_TYPE: {"schema": _EVENT}}}}


def _include_usage(body: CompletionRequest | ChatCompletionRequest) -> bool:
    return bool(body.stream and body.stream_options and body.stream_options.include_usage)


@router.post(
    "/v1/completions",
    summary="OpenAI-compatible text completion",
    responses={**_STREAM_DOC, **_ERRORS},
)
async def completions(body: CompletionRequest, request: Request, service: ServiceDep) -> Response:
    job = await service.prepare(
        body,
        request.scope.get(ARRIVAL_KEY, time.perf_counter()),
        text=body.prompt_text,
        token_ids=body.prompt_ids,
        max_new_tokens=body.max_tokens,
        logprobs=body.logprobs,
        prompt_logprobs=_prompt_logprobs(body),
        max_field="max_tokens",
        id_prefix="cmpl",
    )
    shape = OpenAIShape(
        service, job, "completion", _include_usage(body), body.echo, body.prompt_text
    )
    return await respond(service, job, request, shape, body.stream)


def _prompt_logprobs(body: CompletionRequest) -> int | None:
    """Echo scores the prompt when logprobs are asked for; it also does (for their text) with a
    prompt of token ids, and when nothing is generated (the engine then only scores)."""
    if not body.echo:
        return None
    if body.logprobs is not None:
        return body.logprobs
    return 0 if body.prompt_ids is not None or body.max_tokens == 0 else None


@router.post(
    "/v1/chat/completions",
    summary="OpenAI-compatible chat completion (the tokenizer's chat template is applied)",
    responses={**_STREAM_DOC, **_ERRORS},
)
async def chat_completions(
    body: ChatCompletionRequest, request: Request, service: ServiceDep
) -> Response:
    job = await service.prepare(
        body,
        request.scope.get(ARRIVAL_KEY, time.perf_counter()),
        messages=[m.as_template_message() for m in body.messages],
        max_new_tokens=body.max_new_tokens,
        prompt_field="messages",
        max_field="max_completion_tokens" if body.max_completion_tokens else "max_tokens",
        id_prefix="chatcmpl",
    )
    shape = OpenAIShape(service, job, "chat", _include_usage(body))
    return await respond(service, job, request, shape, body.stream)


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
