"""The two ways a generation answer leaves the service, shared by every route.

:func:`respond` either streams (SSE) or waits for the end and sends one JSON object. What the
payloads look like is the route's :class:`Shape` (native in ``routes/generate.py``, OpenAI in
``routes/openai_shapes.py``); the order of events, the error handling inside an open stream, the
client-disconnect handling and the release of the queue place are written once, here.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any, Protocol

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from app.api.errors import ApiError, error_response
from app.api.generation import GenerationService, Job
from app.api.sse import JobEventSource
from app.engine.types import FinalEvent, TokenEvent

logger = logging.getLogger(__name__)

SseEvent = dict[str, str]


class Shape(Protocol):
    """A route's payloads for one request."""

    def whole(self, final: FinalEvent) -> dict[str, Any]:
        """The non-streaming response body."""
        ...

    def opening(self) -> list[SseEvent]: ...

    def token(self, event: TokenEvent) -> SseEvent | None: ...

    def done(self, final: FinalEvent) -> list[SseEvent]: ...

    def error(self, err: ApiError) -> SseEvent: ...

    def closing(self) -> list[SseEvent]: ...


async def respond(
    service: GenerationService, job: Job, request: Request, shape: Shape, stream: bool
) -> Response:
    if stream:
        return JobEventSource(_stream(service, job, shape), lambda: service.release(job))
    final = await service.run(job, request.receive)
    if final is None:  # the client left; nobody reads this
        return error_response(503, "unavailable", "the client disconnected")
    if final.finish_reason == "error":
        raise service.error_from_final(final)
    return JSONResponse(shape.whole(final))


async def _stream(service: GenerationService, job: Job, shape: Shape) -> AsyncIterator[SseEvent]:
    try:
        for event in shape.opening():
            yield event
        async for event in service.events(job):
            if not isinstance(event, FinalEvent):
                sse = shape.token(event)
                if sse is not None:
                    yield sse
            elif event.finish_reason == "error":
                yield shape.error(service.error_from_final(event))
            else:
                for sse in shape.done(event):
                    yield sse
    except ApiError as exc:
        yield shape.error(exc)
    except Exception as exc:  # the stream is open: the failure must travel inside it
        logger.exception("stream %s failed", job.request_id)
        yield shape.error(ApiError(500, "internal", f"generation failed: {exc}"))
    for event in shape.closing():
        yield event
