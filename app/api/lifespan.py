"""Start-up and shutdown of one app: load the engine, get its latency profile, drain, stop.

Loading runs in a worker thread after the server is already listening, so ``/health`` answers and
``/ready`` says 503 while the checkpoint loads and the profile is measured (or read from the
cache). A failure is logged as one line and reported through ``AppState.on_fatal`` (serve_cli then
stops the server with a non-zero exit). On shutdown the app drains: ``/ready`` and new requests get
503 while admitted requests finish, for up to ``drain_timeout_s``; then the engine stops.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any

import anyio
from fastapi import FastAPI

from app.api.profile_cache import load_profile, profile_key, save_profile
from app.api.state import AppState
from app.scheduler import DepthScheduler, LatencyProfile, SchedulerConfig, fill_exits
from app.settings import Settings

logger = logging.getLogger(__name__)

StepHook = Callable[[Any], Mapping[str, int] | None]
EngineLoader = Callable[[Settings, StepHook], Any]


def load_engine(settings: Settings, step_hook: StepHook) -> Any:
    """The real engine (imported here: torch loads only when a server starts)."""
    from app.engine import Engine, EngineConfig

    config = EngineConfig(
        device=settings.device,
        dtype=settings.dtype,
        max_slots=settings.max_batch_size,
        max_seq_len=settings.max_seq_len,
        torch_threads=settings.torch_threads,
        prefill_chunk=settings.prefill_chunk,
        prefill_stall=settings.prefill_stall,
        weights=settings.weights,
        kernel_cache_dir=str(settings.profile_cache_dir),
    )
    return Engine.from_pretrained(settings.model, config, step_hook)


class StepObserver:
    """The engine's step hook: decode-step metrics, then the scheduler's per-step re-check."""

    def __init__(self, state: AppState) -> None:
        self.state = state
        self._last: tuple[float, frozenset[str]] | None = None

    def __call__(self, report: Any) -> Mapping[str, int] | None:
        try:
            # a row also present in the previous step got its previous token at that step's end
            intervals: list[tuple[int, float]] = []
            if self._last is not None:
                last_now, last_ids = self._last
                intervals = [
                    (r.exit_layer, report.now - last_now)
                    for r in report.rows
                    if r.request_id in last_ids
                ]
            self._last = (report.now, frozenset(r.request_id for r in report.rows))
            self.state.metrics.observe_step(
                report.step_seconds, report.deepest_exit, report.batch_size, intervals
            )
            scheduler = self.state.scheduler
            if scheduler is None:
                return None
            return scheduler.on_step(report) or None
        except Exception:  # never let a metrics or scheduling bug kill the engine loop
            logger.exception("the step hook failed")
            return None


def profile_batch_sizes(settings: Settings, max_slots: int) -> tuple[int, ...]:
    sizes = {b for b in settings.profile_batch_sizes if 1 <= b <= max_slots} | {1, max_slots}
    return tuple(sorted(sizes))


def prepare(state: AppState, loader: EngineLoader) -> None:
    """Load, profile and start the engine (blocking: runs in a worker thread)."""
    settings = state.settings
    started = time.perf_counter()
    engine = loader(settings, StepObserver(state))
    info = engine.info
    max_slots = engine.stats().max_slots
    sizes = profile_batch_sizes(settings, max_slots)
    key = profile_key(
        settings.model,
        info.device,
        info.dtype,
        settings.torch_threads,
        sizes,
        max_slots,
        settings.profile_depths,
    )
    key["weights"] = getattr(info, "weights", "")  # a profile holds for one weight format
    profile = None if settings.reprofile else load_profile(settings.profile_cache_dir, key)
    state.profile_source = "cache"
    if profile is None:
        t0 = time.perf_counter()
        points = engine.measure_profile(
            list(sizes), depths=settings.profile_depths, max_seconds=settings.profile_max_s
        )
        profile = LatencyProfile(fill_exits(points, info.exits))
        logger.info("measured the latency profile in %.1f s", time.perf_counter() - t0)
        save_profile(settings.profile_cache_dir, key, profile)
        state.profile_source = "measured"
    if tuple(profile.exits) != tuple(info.exits):
        raise ValueError(f"profile exits {profile.exits} differ from the model's {info.exits}")
    state.scheduler = DepthScheduler(
        profile,
        SchedulerConfig(
            max_slots=max_slots,
            headroom=settings.budget_headroom,
            recheck=settings.budget_recheck,
            prefill_chunk=settings.prefill_chunk,
            prefill_stall=settings.prefill_stall,
        ),
    )
    state.metrics.declare_exits(info.exits)
    state.metrics.declare_weights(getattr(info, "weights", ""), getattr(info, "weight_kernel", ""))
    state.metrics.track_load(lambda: engine.stats().running, lambda: engine.stats().waiting)
    engine.start()
    state.engine = engine
    state.model_id = info.model_id
    state.ready = True
    logger.info(
        "serving %s (%s, exits %s) on %s/%s, weights %s; ready in %.1f s",
        info.model_id,
        info.model_type,
        list(info.exits),
        info.device,
        info.dtype,
        getattr(info, "weights", "") or info.dtype,
        time.perf_counter() - started,
    )


async def load_in_background(state: AppState, loader: EngineLoader) -> None:
    try:
        await anyio.to_thread.run_sync(prepare, state, loader)
    except Exception as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        state.load_error = message
        logger.error("cannot serve %s: %s", state.settings.model, message)
        logger.debug("load failure", exc_info=exc)
        if state.on_fatal is not None:
            state.on_fatal(message)


def start_draining(state: AppState) -> None:
    """Refuse new work from now on; admitted requests may finish until ``drain_deadline``."""
    if not state.draining:
        logger.info("draining: %d request(s) in flight", state.inflight)
        state.drain_deadline = time.monotonic() + state.settings.drain_timeout_s
    state.draining = True


def drained(state: AppState) -> bool:
    """True once no admitted request is left, or the drain deadline has passed."""
    deadline = state.drain_deadline if state.drain_deadline is not None else 0.0
    return state.inflight <= 0 or time.monotonic() >= deadline


async def drain(state: AppState) -> None:
    start_draining(state)
    while not drained(state):
        await anyio.sleep(0.05)
    if state.inflight > 0:
        logger.warning("drain timeout: cancelling %d request(s)", state.inflight)


def make_lifespan(loader: EngineLoader) -> Callable[[FastAPI], Any]:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state: AppState = app.state.core
        async with anyio.create_task_group() as tg:
            tg.start_soon(load_in_background, state, loader)
            try:
                yield
            finally:
                await drain(state)
                state.ready = False
        # the loader has finished (a task group waits for its tasks) before the engine stops
        if state.engine is not None:
            await anyio.to_thread.run_sync(state.engine.shutdown, 5.0)
            logger.info("engine stopped")

    return lifespan
