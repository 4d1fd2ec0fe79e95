"""Server-sent events for generation streams (sse-starlette), tied to the request's lifetime.

:class:`JobEventSource` releases the request's queue place however the response ends (finished,
client gone before the first event, server shutting down), so that no admitted request leaks.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from sse_starlette.sse import EventSourceResponse
from starlette.requests import Request
from starlette.types import Receive, Scope, Send

SSE_MEDIA_TYPE = "text/event-stream"

# Characters that JSON leaves raw but str.splitlines() breaks lines on (httpx's iter_lines and many
# SSE clients): escaped, the payload decodes to the same text and stays on one data line.
_LINE_SEPARATORS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def wants_event_stream(request: Request) -> bool:
    return SSE_MEDIA_TYPE in request.headers.get("accept", "")


def sse_event(event: str | None, data: Any) -> dict[str, str]:
    if isinstance(data, str):
        payload = data
    else:
        payload = json.dumps(data, ensure_ascii=False).translate(_LINE_SEPARATORS)
    return {"event": event, "data": payload} if event else {"data": payload}


class JobEventSource(EventSourceResponse):
    def __init__(self, content: AsyncIterator[dict[str, str]], on_close: Callable[[], None]):
        super().__init__(content, sep="\n", headers={"Cache-Control": "no-cache"})
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()
