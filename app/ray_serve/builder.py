"""The Ray Serve application: ``SortedServeIngress`` in front of N ``SortedServeEngine`` replicas.

:func:`build_app` is both what ``python -m app serve-ray`` deploys and the ``import_path`` of a
Serve config file (``app.ray_serve.builder:build_app``, with :class:`RayAppArgs` as ``args``),
e.g. the KubeRay ``RayService`` in ``deploy/k8s/``.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

logger = logging.getLogger(__name__)

ENGINE = "SortedServeEngine"
INGRESS = "SortedServeIngress"
APP_NAME = "sortedserve"


class RayAppArgs(BaseModel):
    """The application's arguments (``args`` of a Serve config file)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field("model_store/default", description="checkpoint every replica serves")
    replicas: int = Field(1, ge=1, description="engine replicas (the start, with autoscaling)")
    router: Literal["budget", "pow2", "round_robin"] = "budget"
    settings: dict[str, Any] = Field(
        default_factory=dict, description="more Settings fields for every replica (SPEC §1)"
    )
    replica_cpus: float = Field(1.0, ge=0, description="Ray CPUs reserved per engine replica")
    replica_gpus: float = Field(0.0, ge=0, description="Ray GPUs per engine replica")
    routing_stats_period_s: float = Field(0.2, gt=0, description="how often pictures refresh")
    health_check_period_s: float = Field(2.0, gt=0)
    min_replicas: int | None = Field(None, ge=0, description="autoscaling lower bound")
    max_replicas: int | None = Field(None, ge=1, description="autoscaling upper bound")
    target_ongoing_requests: float | None = Field(
        None, gt=0, description="autoscaling target per replica (default: its batch slots)"
    )
    met_target: float = Field(0.9, gt=0, le=1, description="autoscale up below this budget share")
    upscale_delay_s: float = Field(5.0, ge=0)
    downscale_delay_s: float = Field(60.0, ge=0)

    @model_validator(mode="after")
    def _bounds(self) -> RayAppArgs:
        if (self.min_replicas is None) != (self.max_replicas is None):
            raise ValueError("give both min_replicas and max_replicas, or neither")
        low, high = self.min_replicas, self.max_replicas
        if low is not None and high is not None and low > high:
            raise ValueError("min_replicas is larger than max_replicas")
        return self

    @property
    def autoscaling(self) -> bool:
        return self.max_replicas is not None

    def replica_settings(self) -> dict[str, Any]:
        from app.settings import Settings

        values = {**self.settings, "model": self.model}
        Settings(**values)  # fail here, once, rather than in every replica
        return values

    def batch_slots(self) -> int:
        from app.settings import Settings

        return Settings(**self.replica_settings()).max_batch_size

    def autoscaling_config(self) -> dict[str, Any] | None:
        """Scale on our own signals: requests waiting for a batch slot and the share of budgets
        met, as each replica reports them (app/ray_serve/autoscaling.py)."""
        if not self.autoscaling:
            return None
        return {
            "min_replicas": self.min_replicas,
            "initial_replicas": max(self.replicas, self.min_replicas or 0),
            "max_replicas": self.max_replicas,
            "target_ongoing_requests": self.target_ongoing_requests or self.batch_slots(),
            "upscale_delay_s": self.upscale_delay_s,
            "downscale_delay_s": self.downscale_delay_s,
            "metrics_interval_s": 1.0,
            "look_back_period_s": 5.0,
            "policy": {
                "policy_function": "app.ray_serve.autoscaling:SortedServePolicy",
                "policy_kwargs": {"met_target": self.met_target},
            },
        }


def build_app(args: dict[str, Any] | RayAppArgs) -> Any:
    """The Serve application for ``args`` (imports Ray: the ``[ray]`` extra)."""
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    from app.ray_serve.ingress import SortedServeIngress
    from app.ray_serve.replica import EngineReplica
    from app.ray_serve.router import router_import_path
    from app.settings import Settings

    a = args if isinstance(args, RayAppArgs) else RayAppArgs(**args)
    replica_settings = a.replica_settings()
    settings = Settings(**replica_settings)
    capacity = settings.max_batch_size + settings.max_queue
    scaling: dict[str, Any] = (
        {"autoscaling_config": a.autoscaling_config()}
        if a.autoscaling
        else {"num_replicas": a.replicas}
    )
    engine = serve.deployment(
        EngineReplica,
        name=ENGINE,
        ray_actor_options={"num_cpus": a.replica_cpus, "num_gpus": a.replica_gpus},
        # one more than the app admits: the app's own 429 answers, not Ray's queue
        max_ongoing_requests=capacity + 1,
        health_check_period_s=a.health_check_period_s,
        health_check_timeout_s=max(10.0, a.health_check_period_s * 5),
        graceful_shutdown_timeout_s=settings.drain_timeout_s + 10,
        request_router_config=RequestRouterConfig(
            request_router_class=router_import_path(a.router),
            request_routing_stats_period_s=a.routing_stats_period_s,
            request_routing_stats_timeout_s=max(5.0, a.routing_stats_period_s * 10),
        ),
        **scaling,
    ).bind(replica_settings)
    most = a.max_replicas if a.max_replicas is not None else a.replicas
    least = a.min_replicas if a.min_replicas is not None else a.replicas
    ingress = serve.deployment(
        SortedServeIngress,
        name=INGRESS,
        num_replicas=1,
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=max(1000, most * capacity * 2),
    ).bind(engine, max(least, 1), most, a.model, settings.default_max_new_tokens)
    logger.info(
        "application: %s x %s (router %s) on %s",
        f"{least}..{most}" if a.autoscaling else a.replicas,
        ENGINE,
        a.router,
        a.model,
    )
    return ingress
