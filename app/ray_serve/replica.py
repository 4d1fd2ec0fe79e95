"""One engine replica on Ray Serve: the single-machine app (``create_app``) running in a replica.

The replica builds the same FastAPI app as ``python -m app serve`` (routes, validation, SSE,
OpenAI shapes, metrics, the depth scheduler) and runs its lifespan in a task of its own; its
constructor returns only once the checkpoint is loaded and profiled, so Ray routes nothing to a
replica that is not ready. The ingress forwards each HTTP request to :meth:`EngineReplica.handle`,
which runs it through the app in-process (:mod:`app.ray_serve.asgi_bridge`) and streams the
answer back. :meth:`EngineReplica.record_routing_stats` publishes the scheduler's load picture
for the router; :meth:`EngineReplica.check_health` fails once the engine has stopped.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

from app.api.lifespan import StepHook, load_engine
from app.api.main import create_app
from app.ray_serve.asgi_bridge import ForwardedRequest, ResponseStart, call_app
from app.ray_serve.autoscaling import replica_stats
from app.ray_serve.picture import take_picture
from app.settings import Settings

logger = logging.getLogger(__name__)

REPLICA_HEADER = "x-sortedserve-replica"


class BatchWatcher:
    """Wraps the app's step hook: remembers the exits of the rows of the last decode step."""

    def __init__(self, hook: StepHook) -> None:
        self.hook = hook
        self.row_exits: tuple[int, ...] = ()

    def __call__(self, report: Any) -> Mapping[str, int] | None:
        try:
            self.row_exits = tuple(int(r.exit_layer) for r in report.rows)
        except Exception:  # never break the engine loop over a statistic
            logger.exception("cannot read the step report")
        return self.hook(report)


class EngineReplica:
    """The body of the ``SortedServeEngine`` deployment (see :mod:`app.ray_serve.builder`)."""

    async def __init__(self, settings: Mapping[str, Any], name: str | None = None) -> None:
        self.name = name or _replica_name()
        self.settings = Settings(**settings)
        self.watcher: BatchWatcher | None = None
        self.app = create_app(self.settings, engine_loader=self._load)
        self.state = self.app.state.core
        self.state.replica = self.name
        self._stop = asyncio.Event()
        self._started = asyncio.Event()
        self._lifespan = asyncio.create_task(self._run_lifespan())
        t0 = time.perf_counter()
        await self._started.wait()
        while not self.state.ready:
            if self.state.load_error or self._lifespan.done():
                raise RuntimeError(f"replica {self.name}: {self.state.load_error or 'stopped'}")
            await asyncio.sleep(0.05)
        logger.info("replica %s ready in %.1f s", self.name, time.perf_counter() - t0)

    def _load(self, settings: Settings, hook: StepHook) -> Any:
        self.watcher = BatchWatcher(hook)
        return load_engine(settings, self.watcher)

    async def _run_lifespan(self) -> None:
        async with self.app.router.lifespan_context(self.app):
            self._started.set()
            await self._stop.wait()

    # -- requests ------------------------------------------------------------------------------
    async def handle(
        self, request: ForwardedRequest, shape: Mapping[str, Any] | None = None
    ) -> AsyncIterator[ResponseStart | bytes]:
        """The app's answer to one forwarded request (``shape`` is for the router only)."""
        extra = ((REPLICA_HEADER.encode(), self.name.encode()),)
        async for part in call_app(self.app, request, extra):
            yield part

    async def probe(self, fanout_exclude: list[str] | None = None) -> dict[str, Any]:
        """Who this replica is and whether it takes requests (the ingress's ``/ready``)."""
        return {
            "replica": self.name,
            "ready": self.state.ready and not self.state.draining,
            "pid": os.getpid(),
            "inflight": self.state.inflight,
        }

    async def metrics(self, fanout_exclude: list[str] | None = None) -> dict[str, Any]:
        """This replica's Prometheus text (the ingress adds the ``replica`` label)."""
        return {"replica": self.name, "text": self.state.metrics.render().decode()}

    # -- Ray Serve hooks -----------------------------------------------------------------------
    def record_routing_stats(self) -> dict[str, Any]:
        state = self.state
        if state.scheduler is None or state.engine is None:
            return {}
        stats = state.engine.stats()
        rows = self.watcher.row_exits if self.watcher is not None and stats.running else ()
        return take_picture(
            self.name,
            state.scheduler,
            running=stats.running,
            waiting=stats.waiting,
            inflight=state.inflight,
            max_slots=stats.max_slots,
            batch_exits=rows,
            ready=state.ready,
            draining=state.draining,
        ).to_stats()

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Waiting and running requests, slots, budgets met and missed (see autoscaling.py)."""
        return replica_stats(self.state)

    def check_health(self) -> None:
        if self.state.load_error:
            raise RuntimeError(f"the model failed to load: {self.state.load_error}")
        if self._lifespan.done():
            raise RuntimeError("the app has stopped")
        alive = getattr(self.state.engine, "alive", None)
        if callable(alive) and not alive():
            raise RuntimeError("the engine loop has stopped")

    async def __del__(self) -> None:
        """Drain (admitted requests finish, up to ``drain_timeout_s``), then stop the engine."""
        self._stop.set()
        try:
            await asyncio.wait_for(self._lifespan, self.settings.drain_timeout_s + 10)
        except Exception:
            logger.exception("replica %s did not stop cleanly", self.name)


def _replica_name() -> str:
    try:
        from ray import serve

        return str(serve.get_replica_context().replica_id.unique_id)
    except Exception:  # outside a replica (tests of the class itself)
        return f"local-{os.getpid()}"
