"""Run one forwarded HTTP request through an in-process ASGI app, as a stream of parts.

The ingress hands a replica a :class:`ForwardedRequest` (method, path, headers, the whole body);
:func:`call_app` runs the replica's own FastAPI app on it and yields a :class:`ResponseStart`,
then the body chunks as the app sends them (SSE events one by one). Closing the stream early
(the client left, Ray cancelled the call) tells the app ``http.disconnect``, which cancels the
request in the engine, as a real disconnect would. Pure asyncio, no Ray.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from starlette.types import ASGIApp, Message

logger = logging.getLogger(__name__)

ARRIVAL_KEY = "sortedserve.arrival"  # the key app.api.middleware stamps (kept in step)
_DISCONNECT_GRACE_S = 2.0  # how long the app may take to wind down after a disconnect


@dataclass(frozen=True)
class ForwardedRequest:
    method: str
    path: str
    query_string: bytes = b""
    headers: tuple[tuple[bytes, bytes], ...] = ()
    body: bytes = b""
    arrived_wall: float = field(default_factory=time.time)  # time.time() at the ingress
    client: tuple[str, int] | None = None


@dataclass(frozen=True)
class ResponseStart:
    status: int
    headers: tuple[tuple[bytes, bytes], ...]

    def header(self, name: str) -> str | None:
        key = name.lower().encode()
        for k, v in self.headers:
            if k.lower() == key:
                return v.decode("latin-1")
        return None


def scope_for(request: ForwardedRequest) -> dict[str, Any]:
    """An ASGI HTTP scope; the arrival is backdated to the ingress's clock, so that a budget
    counts from the moment the request reached the service, routing included."""
    waited = max(time.time() - request.arrived_wall, 0.0)
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": request.method,
        "scheme": "http",
        "path": request.path,
        "raw_path": request.path.encode(),
        "root_path": "",
        "query_string": request.query_string,
        "headers": list(request.headers),
        "client": request.client,
        "server": ("ray-serve", 0),
        ARRIVAL_KEY: time.perf_counter() - waited,
    }


async def call_app(
    app: ASGIApp, request: ForwardedRequest, extra_headers: tuple[tuple[bytes, bytes], ...] = ()
) -> AsyncIterator[ResponseStart | bytes]:
    """The app's answer to ``request``: one :class:`ResponseStart`, then body chunks."""
    messages: asyncio.Queue[Message | None] = asyncio.Queue()
    left = asyncio.Event()
    body_sent = False

    async def receive() -> Message:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await left.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        await messages.put(message)

    async def run() -> None:
        try:
            await app(scope_for(request), receive, send)
        finally:
            await messages.put(None)

    task = asyncio.create_task(run())
    finished = False
    try:
        while True:
            message = await messages.get()
            if message is None:  # the app returned (or failed) without finishing its answer
                break
            if message["type"] == "http.response.start":
                headers = tuple((bytes(k), bytes(v)) for k, v in message.get("headers", []))
                yield ResponseStart(int(message["status"]), headers + extra_headers)
            elif message["type"] == "http.response.body":
                chunk = bytes(message.get("body", b""))
                if chunk:
                    yield chunk
                if not message.get("more_body", False):
                    finished = True
                    break
        if task.done() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]
    finally:
        if not finished:
            left.set()  # the app sees the client leave and cancels its request
        try:
            await asyncio.wait_for(asyncio.shield(task), _DISCONNECT_GRACE_S)
        except (TimeoutError, asyncio.CancelledError):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        except Exception:
            logger.exception("the app failed on %s %s", request.method, request.path)
