"""The HTTP front of the Ray Serve application (``SortedServeIngress``).

Every request but three is forwarded whole to an engine replica, chosen by the engine
deployment's request router from the request's shape (:mod:`app.ray_serve.shapes`), and the
replica's answer is streamed back as it comes. The three answered here:

- ``/health``: 200 while the ingress lives.
- ``/ready``: 200 only when at least ``min_ready`` replicas are up and none of them is loading or
  draining (each is asked, through the router's fan-out).
- ``/metrics``: every replica's metrics in one exposition, each series labelled ``replica``.

A replica that dies before answering is retried once on another; one that dies mid-stream ends
the stream with an error event (``event: error`` on the native route, an ``error`` object on the
OpenAI routes), never a hung connection.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from app.ray_serve.asgi_bridge import ForwardedRequest, ResponseStart
from app.ray_serve.metrics_merge import merge
from app.ray_serve.router import FANOUT_KWARG, SHAPE_KWARG
from app.ray_serve.shapes import TokenCounter, read_shape

logger = logging.getLogger(__name__)

_FANOUT_TIMEOUT_S = 3.0
_ATTEMPTS = 2  # a replica that dies before its first byte: one more try elsewhere


def error_json(status: int, kind: str, message: str, **headers: str) -> JSONResponse:
    return JSONResponse({"error": message, "error_type": kind}, status, headers=headers or None)


class SortedServeIngress:
    def __init__(
        self,
        engine: Any,
        min_ready: int,
        max_replicas: int,
        model: str | None = None,
        default_max_new_tokens: int = 128,
    ) -> None:
        self.engine = engine  # DeploymentHandle of the engine deployment
        self.min_ready = min_ready
        self.max_replicas = max_replicas
        self.counter = TokenCounter(model)
        self.default_max_new_tokens = default_max_new_tokens

    async def __call__(self, request: Request) -> Response:
        path = request.url.path
        if path == "/health":
            return JSONResponse({"status": "ok"})
        if path == "/ready":
            return await self.ready()
        if path == "/metrics":
            return await self.metrics()
        return await self.forward(request)

    # -- fan-out -------------------------------------------------------------------------------
    async def fanout(self, method: str) -> list[dict[str, Any]]:
        """``method``'s answer from every replica the router can reach, each once."""
        seen: list[str] = []
        answers: list[dict[str, Any]] = []
        for _ in range(self.max_replicas + 1):
            call = self.engine.options(method_name=method).remote(**{FANOUT_KWARG: list(seen)})
            try:
                answer = await asyncio.wait_for(call, _FANOUT_TIMEOUT_S)
            except TimeoutError:  # no replica to route to (or none answering): stop asking
                logger.info("fan-out %s: no answer within %.0f s", method, _FANOUT_TIMEOUT_S)
                break
            except Exception as exc:  # a replica going away mid-question: ask the others
                logger.info("fan-out %s: %s", method, type(exc).__name__)
                continue
            if answer["replica"] in seen:
                break
            seen.append(answer["replica"])
            answers.append(answer)
        return answers

    async def ready(self) -> Response:
        replicas = await self.fanout("probe")
        up = [r for r in replicas if r["ready"]]
        if len(up) < self.min_ready or len(up) < len(replicas):
            return error_json(
                503,
                "unavailable",
                f"{len(up)} of {self.min_ready} replicas ready",
                **{"Retry-After": "5"},
            )
        details = [{k: r[k] for k in ("replica", "pid", "inflight")} for r in up]
        return JSONResponse(
            {
                "status": "ready",
                "replicas": sorted(r["replica"] for r in up),
                "details": sorted(details, key=lambda d: d["replica"]),
            }
        )

    async def metrics(self) -> Response:
        texts = {a["replica"]: a["text"] for a in await self.fanout("metrics")}
        return Response(merge(texts), media_type="text/plain; version=0.0.4; charset=utf-8")

    # -- forwarding ----------------------------------------------------------------------------
    async def forward(self, request: Request) -> Response:
        body = await request.body()
        client = (request.client.host, request.client.port) if request.client else None
        forwarded = ForwardedRequest(
            method=request.method,
            path=request.url.path,
            query_string=request.url.query.encode(),
            headers=tuple(request.headers.raw),
            body=body,
            arrived_wall=time.time(),
            client=client,
        )
        shape = read_shape(forwarded.path, body, self.counter, self.default_max_new_tokens)
        shape_kwarg = shape.to_dict() if shape is not None else None
        for attempt in range(_ATTEMPTS):
            stream = self.engine.options(stream=True, method_name="handle").remote(
                forwarded, **{SHAPE_KWARG: shape_kwarg}
            )
            try:
                start = await stream.__anext__()
            except Exception as exc:
                logger.warning("attempt %d of %s failed: %s", attempt + 1, forwarded.path, exc)
                continue
            if not isinstance(start, ResponseStart):
                stream.cancel()
                return error_json(500, "internal", "the replica answered out of order")
            response = StreamingResponse(
                _rest(stream, forwarded.path, start), status_code=start.status
            )
            response.raw_headers = [(k, v) for k, v in start.headers]
            return response
        return error_json(
            503, "unavailable", "no replica could take the request", **{"Retry-After": "1"}
        )


async def _rest(stream: Any, path: str, start: ResponseStart) -> AsyncIterator[bytes]:
    """The body after the start; a failure mid-stream becomes the route's error event."""
    done = False
    try:
        async for part in stream:
            yield part
        done = True
    except Exception as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        logger.warning("the replica failed mid-answer on %s: %s", path, reason)
        if "text/event-stream" in (start.header("content-type") or ""):
            yield _stream_error(path, f"the replica serving this request failed: {reason}")
        done = True
    finally:
        if not done:  # the client left: stop the replica's work
            stream.cancel()


def _stream_error(path: str, message: str) -> bytes:
    payload = json.dumps({"error": message, "error_type": "unavailable"})
    if path == "/v1/generate":
        return f"event: error\ndata: {payload}\n\n".encode()
    return f"data: {payload}\n\ndata: [DONE]\n\n".encode()
