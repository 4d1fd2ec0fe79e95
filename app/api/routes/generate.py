"""``POST /v1/generate``: the native route (SPEC §3), as one JSON object or as SSE."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from app.api.deps import ServiceDep
from app.api.errors import ApiError, error_body, error_responses
from app.api.generation import GenerationService, Job
from app.api.middleware import ARRIVAL_KEY
from app.api.respond import SseEvent, respond
from app.api.schemas import GenerateRequest, GenerateResponse, TokenEventOut
from app.api.sse import SSE_MEDIA_TYPE, sse_event, wants_event_stream
from app.engine.types import FinalEvent, TokenEvent

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
    job = await service.prepare(body, arrival, text=body.prompt, max_new_tokens=body.max_new_tokens)
    stream = body.stream or wants_event_stream(request)
    return await respond(service, job, request, NativeShape(service, job), stream)


@dataclass
class NativeShape:
    """SPEC §3's payloads: the response object, ``token`` / ``done`` / ``error`` events."""

    service: GenerationService
    job: Job

    def whole(self, final: FinalEvent) -> dict[str, Any]:
        """The SPEC §3 response object (also the payload of the SSE ``done`` event); on Ray
        Serve it also names the replica that served it (``sortedserve.replica``)."""
        out = {
            "id": self.job.request_id,
            "text": final.text,
            "finish_reason": final.finish_reason,
            "exit_layer": final.exit_layer,
            "num_layers": self.service.engine.info.num_layers,
            "usage": {
                "prompt_tokens": final.prompt_tokens,
                "completion_tokens": final.completion_tokens,
            },
            "budget": self.service.budget_report(self.job, final),
            "timings": {
                "queue_ms": round(final.queue_ms, 3),
                "ttft_ms": round(final.ttft_ms, 3),
                "total_ms": round(final.total_ms, 3),
                "ms_per_token": round(final.ms_per_token, 3),
            },
        }
        if self.service.state.replica is not None:
            out["sortedserve"] = {"replica": self.service.state.replica}
        return out

    def opening(self) -> list[SseEvent]:
        return []

    def token(self, event: TokenEvent) -> SseEvent:
        out = TokenEventOut(
            index=event.index, text=event.text, token_id=event.token_id, exit_layer=event.exit_layer
        )
        return sse_event("token", out.model_dump())

    def done(self, final: FinalEvent) -> list[SseEvent]:
        return [sse_event("done", self.whole(final))]

    def error(self, err: ApiError) -> SseEvent:
        return sse_event("error", error_body(err.error_type, err.message))

    def closing(self) -> list[SseEvent]:
        return []
