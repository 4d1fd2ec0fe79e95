"""``POST /v1/generate``: the native route (SPEC §3), as one JSON object or as SSE."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from app.api.deps import ServiceDep
from app.api.errors import ApiError, error_body, error_response, error_responses
from app.api.generation import GenerationParams, GenerationService, Job
from app.api.middleware import ARRIVAL_KEY
from app.api.schemas import GenerateRequest, GenerateResponse, TokenEventOut
from app.api.sse import SSE_MEDIA_TYPE, JobEventSource, sse_event, wants_event_stream
from app.engine.types import FinalEvent

logger = logging.getLogger(__name__)

router = APIRouter(tags=["generate"])

_STREAM_DOC = {
    SSE_MEDIA_TYPE: {
        "schema": {  # one event (OpenAPI 3.1: the schema of a stream describes each event)
            "type": "object",
            "properties": {
                "event": {"type": "string", "enum": ["token", "done", "error"]},
                "data": {"type": "string", "contentMediaType": "application/json"},
            },
            "required": ["event", "data"],
        },
        "example": 'event: token\ndata: {"index": 0, "text": "Hi", "token_id": 42, '
        '"exit_layer": 6}\n\nevent: done\ndata: {...the JSON response...}\n\n',
    }
}


@router.post(
    "/v1/generate",
    response_model=GenerateResponse,
    summary="Generate text within a latency budget",
    responses={
        200: {"content": _STREAM_DOC, "description": "JSON, or SSE when streaming"},
        **error_responses(401, 413, 422, 429, 500, 503),
    },
)
async def generate(body: GenerateRequest, request: Request, service: ServiceDep) -> Response:
    """Generate from ``prompt``. With ``budget_ms`` the depth scheduler picks the deepest trained
    exit predicted to finish in time (lowering it while decoding if the request falls behind);
    without it the request runs at the deepest exit, or at ``exit_layer`` when given. With
    ``stream`` (or ``Accept: text/event-stream``) the answer is a stream of ``token`` events and
    one final ``done`` event holding the JSON response."""
    arrival = request.scope.get(ARRIVAL_KEY, time.perf_counter())
    service.check_capacity()
    service.check_prompt_chars(body.prompt)
    max_new_tokens = service.resolve_max_new_tokens(body.max_new_tokens)
    service.check_exit_layer(body.exit_layer, body.budget_ms)
    prompt_ids = await service.tokenize(body.prompt)
    service.check_context(len(prompt_ids), max_new_tokens)
    job = service.admit(GenerationParams.from_body(body, prompt_ids, max_new_tokens, arrival))
    if body.stream or wants_event_stream(request):
        return JobEventSource(_events(service, job), lambda: service.release(job))
    final = await service.run(job, request.receive)
    if final is None:  # the client left; nobody reads this
        return error_response(503, "unavailable", "the client disconnected")
    if final.finish_reason == "error":
        raise service.error_from_final(final)
    return JSONResponse(service.response(job, final))


async def _events(service: GenerationService, job: Job) -> AsyncIterator[dict[str, str]]:
    try:
        async for event in service.events(job):
            if not isinstance(event, FinalEvent):
                token = TokenEventOut(
                    index=event.index,
                    text=event.text,
                    token_id=event.token_id,
                    exit_layer=event.exit_layer,
                )
                yield sse_event("token", token.model_dump())
            elif event.finish_reason == "error":
                err = service.error_from_final(event)
                yield sse_event("error", error_body(err.error_type, err.message))
            else:
                yield sse_event("done", service.response(job, event))
    except ApiError as exc:
        yield sse_event("error", error_body(exc.error_type, exc.message))
    except Exception as exc:  # the stream is open: the failure must travel inside it
        logger.exception("stream %s failed", job.request_id)
        yield sse_event("error", error_body("internal", f"generation failed: {exc}"))
