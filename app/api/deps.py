"""FastAPI dependencies, named as ``Annotated`` aliases that routes put in their signatures."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app.api.errors import ApiError
from app.api.generation import GenerationService
from app.api.state import AppState

_bearer = HTTPBearer(auto_error=False, description="needed when SORTEDSERVE_API_KEY is set")


def get_state(request: Request) -> AppState:
    return request.app.state.core


StateDep = Annotated[AppState, Depends(get_state)]


def document_api_key(
    _: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """Declares the bearer key in the OpenAPI document; app.api.auth enforces it, first."""


def get_ready_state(state: StateDep) -> AppState:
    """The state of a server that can take generation requests now (503 otherwise)."""
    if state.draining:
        raise ApiError(503, "unavailable", "the server is shutting down and takes no new requests")
    if not state.ready:
        if state.load_error:
            raise ApiError(503, "unavailable", f"the model failed to load: {state.load_error}")
        raise ApiError(
            503, "unavailable", "the model is still loading", headers={"Retry-After": "5"}
        )
    return state


ReadyStateDep = Annotated[AppState, Depends(get_ready_state)]


def get_service(state: ReadyStateDep) -> GenerationService:
    return GenerationService(state)


ServiceDep = Annotated[GenerationService, Depends(get_service)]
ApiKeyDoc = Depends(document_api_key)
