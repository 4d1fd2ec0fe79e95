"""The optional API key (``SORTEDSERVE_API_KEY``): every ``/v1/`` route needs the bearer key.

Enforced as ASGI middleware so that the key is checked before anything else (a request without it
learns nothing, not even whether its body was valid); operations routes (``/health``, ``/ready``,
``/info``, ``/metrics``) and the API docs stay open. The comparison is constant-time.
"""

from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from app.api.errors import send_error

PROTECTED_PREFIX = "/v1/"


def key_matches(authorization: str | None, expected: str) -> bool:
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer":
        given = ""
    return hmac.compare_digest(given.strip().encode(), expected.encode())


class ApiKeyMiddleware:
    def __init__(self, app: ASGIApp, api_key: str | None) -> None:
        self.app = app
        self.api_key = api_key or None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            self.api_key is None
            or scope["type"] != "http"
            or not scope["path"].startswith(PROTECTED_PREFIX)
        ):
            await self.app(scope, receive, send)
            return
        header = next(
            (v.decode("latin-1") for k, v in scope.get("headers", []) if k == b"authorization"),
            None,
        )
        if key_matches(header, self.api_key):
            await self.app(scope, receive, send)
            return
        message = "wrong API key"
        if header is None:
            message = "missing API key: send Authorization: Bearer <key>"
        await send_error(send, 401, "auth", message, [(b"www-authenticate", b"Bearer")])
