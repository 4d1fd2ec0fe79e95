"""Operations routes: ``/health``, ``/ready``, ``/info``, ``/metrics`` (open, even with a key)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from app.api.deps import StateDep
from app.api.errors import error_response, error_responses
from app.api.limits import context_length
from app.api.metrics import CONTENT_TYPE

router = APIRouter(tags=["operations"])


@router.get("/health", summary="200 while the process lives")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/ready",
    summary="200 once the model is loaded and profiled; 503 before and while draining",
    responses=error_responses(503),
)
async def ready(state: StateDep) -> JSONResponse:
    if state.draining:
        return error_response(503, "unavailable", "the server is draining")
    if not state.ready:
        reason = f"the model failed to load: {state.load_error}" if state.load_error else None
        return error_response(503, "unavailable", reason or "the model is loading")
    return JSONResponse({"status": "ready"})


@router.get(
    "/info",
    summary="Model, exits, per-exit quality, latency profile and limits",
    responses=error_responses(503),
)
async def info(state: StateDep) -> Any:
    if state.engine is None or state.scheduler is None:
        return error_response(503, "unavailable", "the model is still loading")
    model = state.engine.info
    settings = state.settings
    scheduler = state.scheduler
    stats = state.engine.stats()
    return {
        "model_id": state.model_id,
        "model_type": model.model_type,
        "num_layers": model.num_layers,
        "exits": list(model.exits),
        "soft_tuned": model.soft_tuned,
        "quality": {"metric": model.metric, "by_exit": model.quality},
        "device": model.device,
        "dtype": model.dtype,
        "weights": model.weights,  # the linear weights' format, and the kernel that reads them
        "weight_kernel": model.weight_kernel,
        "latency_profile": {
            "source": state.profile_source,
            "batch_sizes": list(scheduler.profile.batch_sizes),
            "exits": scheduler.profile.to_json(),
            **scheduler.snapshot(),
        },
        "limits": {
            "max_batch_size": stats.max_slots,
            "max_queue": settings.max_queue,
            "max_seq_len": context_length(state),
            "max_prompt_chars": settings.max_prompt_chars,
            "max_new_tokens": settings.max_new_tokens_limit,
            "default_max_new_tokens": settings.default_max_new_tokens,
            "max_body_bytes": settings.max_body_bytes,
            "drain_timeout_s": settings.drain_timeout_s,
        },
        "load": {
            "running": stats.running,
            "waiting": stats.waiting,
            "free_slots": stats.free_slots,
            "max_slots": stats.max_slots,
            "inflight": state.inflight,
        },
        "auth": settings.api_key is not None,
    }


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(state: StateDep) -> Response:
    return Response(state.metrics.render(), media_type=CONTENT_TYPE)
