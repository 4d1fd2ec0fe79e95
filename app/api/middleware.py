"""Pure ASGI middleware (no BaseHTTPMiddleware: it would break streaming and disconnect detection).

- :class:`RequestMetricsMiddleware` stamps the arrival time and counts every answer by route
  template and status.
- :class:`BodyLimitMiddleware` refuses bodies over ``max_body_bytes`` with 413 before any parsing,
  then replays the buffered body; later ``receive`` calls reach the server, so that a client's
  disconnect is still seen by the routes. A refused body is read to its end first (up to
  ``DRAIN_MAX_BYTES`` and ``DRAIN_TIMEOUT_S``): closing on a client that is still sending gives
  it a broken pipe or a reset instead of the 413.
"""

from __future__ import annotations

import time

import anyio
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.errors import send_error
from app.api.metrics import Metrics

ARRIVAL_KEY = "sortedserve.arrival"
DRAIN_MAX_BYTES = 64 << 20  # past this much refused body, answer and close anyway
DRAIN_TIMEOUT_S = 10.0


class RequestMetricsMiddleware:
    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # a front end that forwards requests (app/ray_serve) may stamp an earlier arrival
        scope.setdefault(ARRIVAL_KEY, time.perf_counter())
        status = 500

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            self.metrics.observe_request(path, status)


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_body_bytes:
            await self._too_large(receive, send, 0)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left before sending its body: nothing to answer
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                more = message.get("more_body", False)
                await self._too_large(receive if more else None, send, size)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, receive: Receive | None, send: Send, received: int) -> None:
        """413, after reading what is left of the body (``receive``, None when it has all come)."""
        if receive is not None:
            with anyio.move_on_after(DRAIN_TIMEOUT_S):
                while received < DRAIN_MAX_BYTES:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return  # nobody left to answer
                    received += len(message.get("body", b""))
                    if not message.get("more_body", False):
                        break
        await send_error(
            send,
            413,
            "validation",
            f"request body: larger than the {self.max_body_bytes}-byte limit",
            [(b"connection", b"close")],
        )


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
