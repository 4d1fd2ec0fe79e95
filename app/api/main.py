"""``create_app(settings)``: one FastAPI app with its own state, metrics registry and routes."""

from __future__ import annotations

import logging

from fastapi import FastAPI

from app.api.auth import ApiKeyMiddleware
from app.api.deps import ApiKeyDoc
from app.api.errors import install_error_handlers
from app.api.lifespan import EngineLoader, load_engine, make_lifespan
from app.api.metrics import Metrics
from app.api.middleware import BodyLimitMiddleware, RequestMetricsMiddleware
from app.api.routes import generate, openai, ops
from app.api.state import AppState
from app.settings import Settings

logger = logging.getLogger(__name__)


def create_app(settings: Settings, engine_loader: EngineLoader | None = None) -> FastAPI:
    """An app serving ``settings.model``; ``engine_loader`` replaces the real engine in tests."""
    app = FastAPI(
        title="SortedServe",
        summary="Serve a Sorted-Fine-Tuned model with a latency budget per request.",
        version="0.1.0",
        lifespan=make_lifespan(engine_loader or load_engine),
    )
    metrics = Metrics()
    app.state.core = AppState(settings=settings, metrics=metrics)
    install_error_handlers(app)
    # the bearer scheme appears in the OpenAPI document only when a key is required
    key_doc = [ApiKeyDoc] if settings.api_key else []
    app.include_router(generate.router, dependencies=key_doc)
    app.include_router(openai.router, dependencies=key_doc)
    app.include_router(ops.router)
    # added last = outermost: count every answer, then check the key, then bound the body
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=settings.max_body_bytes)
    app.add_middleware(ApiKeyMiddleware, api_key=settings.api_key)
    app.add_middleware(RequestMetricsMiddleware, metrics=metrics)
    return app
