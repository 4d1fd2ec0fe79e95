"""Every error leaves the service as ``{"error": "<sentence>", "error_type": "<kind>"}`` (SPEC §3).

This module owns the error kinds, the :class:`ApiError` that routes raise, and the exception
handlers that turn FastAPI's and Starlette's own errors (validation, 404, 405, bad bodies, crashes)
into that shape. Nothing here knows about the engine.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)

ErrorType = Literal["validation", "auth", "not_found", "overloaded", "unavailable", "internal"]

# HTTP status → error kind, for errors raised by the framework rather than by our routes.
_KIND_BY_STATUS: dict[int, ErrorType] = {
    400: "validation",
    401: "auth",
    404: "not_found",
    405: "not_found",
    413: "validation",
    415: "validation",
    422: "validation",
    429: "overloaded",
    503: "unavailable",
}


class ErrorResponse(BaseModel):
    """The body of every error response."""

    error: str
    error_type: ErrorType


class ApiError(Exception):
    """An error with a status, a kind and one human sentence; optional extra headers."""

    def __init__(
        self,
        status_code: int,
        error_type: ErrorType,
        message: str,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.error_type = error_type
        self.message = message
        self.headers = dict(headers or {})


def validation_error(field: str, problem: str) -> ApiError:
    """A 422 naming the offending field, e.g. ``max_new_tokens: must be ≤ 1024``."""
    return ApiError(422, "validation", f"{field}: {problem}")


def error_body(error_type: ErrorType, message: str) -> dict[str, str]:
    return {"error": message, "error_type": error_type}


async def send_error(
    send: Any,
    status: int,
    error_type: ErrorType,
    message: str,
    headers: Sequence[tuple[bytes, bytes]] = (),
) -> None:
    """Answer with the error shape from raw ASGI middleware (before any route runs)."""
    body = json.dumps(error_body(error_type, message)).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def error_response(
    status_code: int,
    error_type: ErrorType,
    message: str,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(error_body(error_type, message), status_code, headers=dict(headers or {}))


def _field_name(loc: Sequence[Any]) -> str:
    parts = [str(p) for p in loc]
    if parts and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:]
    # pydantic adds the union member's type to the location; it only confuses a reader
    parts = [p for p in parts if not p.startswith(("function-", "constrained-"))]
    if not parts or parts[0].isdigit():  # whole body (json_invalid reports a byte position)
        return "request body"
    return ".".join(parts)


def _problem(err: Mapping[str, Any]) -> str:
    kind = err.get("type", "")
    msg = str(err.get("msg", "invalid value"))
    if kind == "json_invalid":
        detail = (err.get("ctx") or {}).get("error")
        return f"is not valid JSON ({detail})" if detail else "is not valid JSON"
    if kind == "model_attributes_type" or (kind == "dict_type" and len(err.get("loc", ())) <= 1):
        return "must be a JSON object sent with Content-Type: application/json"
    if kind == "missing":
        return "is required"
    if kind == "extra_forbidden":
        return "is not a known field"
    for prefix in ("Value error, ", "Assertion failed, "):
        msg = msg.removeprefix(prefix)
    return msg[:1].lower() + msg[1:]


def describe_validation_errors(errors: Sequence[Mapping[str, Any]]) -> str:
    """One sentence naming every offending field: ``budget_ms: input should be greater than 0``."""
    seen: list[str] = []
    for err in errors:
        text = f"{_field_name(err.get('loc', ()))}: {_problem(err)}"
        if text not in seen:
            seen.append(text)
    return "; ".join(seen[:5]) + (f"; and {len(seen) - 5} more" if len(seen) > 5 else "")


async def _api_error(_: Request, exc: Exception) -> JSONResponse:
    err = exc if isinstance(exc, ApiError) else ApiError(500, "internal", str(exc))
    return error_response(err.status_code, err.error_type, err.message, err.headers)


async def _validation(_: Request, exc: Exception) -> JSONResponse:
    errors = exc.errors() if isinstance(exc, RequestValidationError) else []
    return error_response(422, "validation", describe_validation_errors(errors))


async def _http(request: Request, exc: Exception) -> JSONResponse:
    status = exc.status_code if isinstance(exc, StarletteHTTPException) else 500
    detail = str(getattr(exc, "detail", "") or "")
    headers = dict(getattr(exc, "headers", None) or {})
    kind = _KIND_BY_STATUS.get(status, "internal" if status >= 500 else "validation")
    if status == 400 and "parsing the body" in detail:
        # FastAPI's answer to a body it cannot decode (e.g. not UTF-8): a validation error here
        return error_response(422, "validation", "request body: cannot be read as UTF-8 JSON")
    if status == 404:
        detail = f"{request.method} {request.url.path} is not a route of this server"
    elif status == 405:
        allowed = headers.get("allow") or headers.get("Allow")
        detail = f"{request.url.path} does not accept {request.method}" + (
            f"; use {allowed}" if allowed else ""
        )
    return error_response(status, kind, detail or "request failed", headers)


async def _internal(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, "internal", "the server failed to handle this request")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(StarletteHTTPException, _http)
    app.add_exception_handler(Exception, _internal)


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses=`` entries documenting the error shape for these statuses."""
    descriptions = {
        401: "missing or wrong API key",
        404: "not found",
        413: "request body too large",
        422: "invalid request (the message names the field)",
        429: "queue full; retry after the Retry-After header's seconds",
        500: "internal error",
        503: "model loading or server draining",
    }
    return {
        s: {"model": ErrorResponse, "description": descriptions.get(s, "error")} for s in statuses
    }
