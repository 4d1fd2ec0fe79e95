"""Prometheus metrics of SPEC §6, on a registry owned by one app (tests build many apps).

The names and labels here are the contract with dashboards (deploy/) and alerts; the API layer and
the step hook call the small ``observe_*`` methods, never prometheus-client directly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# ms-to-seconds request latencies
LATENCY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75,
    1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 20.0, 30.0, 60.0,
)  # fmt: skip
# sub-ms-to-100s-of-ms per-token and per-step times
STEP_BUCKETS = (
    0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03,
    0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0,
)  # fmt: skip
RATIO_BUCKETS = (0.25, 0.5, 0.7, 0.8, 0.85, 0.9, 0.95, 1.0, 1.05, 1.1, 1.15, 1.25, 1.5, 2.0, 4.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    """Every SortedServe metric, registered on ``self.registry``."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "sortedserve_requests", "HTTP requests answered", ["route", "status"], registry=r
        )
        self.request_duration = Histogram(
            "sortedserve_request_duration_seconds",
            "generation time from arrival to the last token, by final exit",
            ["exit_layer"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "sortedserve_time_to_first_token_seconds",
            "arrival to first generated token, by initial exit",
            ["exit_layer"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inter_token = Histogram(
            "sortedserve_inter_token_latency_seconds",
            "time between consecutive tokens of a running request, by its exit",
            ["exit_layer"],
            buckets=STEP_BUCKETS,
            registry=r,
        )
        self.queue = Histogram(
            "sortedserve_queue_duration_seconds",
            "arrival to prefill start",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.decode_step = Histogram(
            "sortedserve_decode_step_seconds",
            "one batched decode step, by the deepest exit in the step",
            ["exit_layer"],
            buckets=STEP_BUCKETS,
            registry=r,
        )
        self.generated_tokens = Counter(
            "sortedserve_generated_tokens", "tokens generated, by exit", ["exit_layer"], registry=r
        )
        self.prompt_tokens = Counter(
            "sortedserve_prompt_tokens", "prompt tokens of admitted requests", registry=r
        )
        self.budget_requests = Counter(
            "sortedserve_budget_requests",
            "finished requests by budget outcome (none: no budget_ms)",
            ["outcome"],
            registry=r,
        )
        self.budget_overrun = Histogram(
            "sortedserve_budget_overrun_seconds",
            "how far past budget_ms a missed request finished",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.downgrades = Counter(
            "sortedserve_depth_downgrades", "exits lowered while decoding", registry=r
        )
        self.prediction_error = Histogram(
            "sortedserve_prediction_error_ratio",
            "actual / predicted request latency",
            buckets=RATIO_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "sortedserve_batch_size", "rows in each decode step", buckets=BATCH_BUCKETS, registry=r
        )
        self.running = Gauge(
            "sortedserve_requests_running", "requests decoding in the batch", registry=r
        )
        self.waiting = Gauge(
            "sortedserve_requests_waiting", "requests waiting for a batch slot", registry=r
        )
        self.weights = Gauge(
            "sortedserve_weights_info",
            "1 for the linear weights' format and the kernel that reads them",
            ["weights", "kernel"],
            registry=r,
        )
        for outcome in ("met", "missed", "none"):
            self.budget_requests.labels(outcome=outcome)

    def declare_weights(self, weights: str, kernel: str) -> None:
        self.weights.labels(weights=weights or "unknown", kernel=kernel or "unknown").set(1)

    def declare_exits(self, exits: Iterable[int]) -> None:
        """Create the per-exit series at zero so dashboards see every exit before traffic."""
        for k in exits:
            label = str(k)
            for metric in (
                self.request_duration,
                self.ttft,
                self.inter_token,
                self.decode_step,
                self.generated_tokens,
            ):
                metric.labels(exit_layer=label)

    def track_load(self, running: Callable[[], float], waiting: Callable[[], float]) -> None:
        """Read the running/waiting gauges from the engine at scrape time (never stale)."""
        self.running.set_function(running)
        self.waiting.set_function(waiting)

    # -- observations --------------------------------------------------------------------------
    def observe_request(self, route: str, status: int) -> None:
        self.requests.labels(route=route, status=str(status)).inc()

    def observe_token(self, exit_layer: int) -> None:
        self.generated_tokens.labels(exit_layer=str(exit_layer)).inc()

    def observe_step(
        self, step_seconds: float, deepest_exit: int, batch_size: int, intervals: Iterable[Any]
    ) -> None:
        """One decode step; ``intervals`` are (exit_layer, seconds since the row's last token)."""
        self.decode_step.labels(exit_layer=str(deepest_exit)).observe(step_seconds)
        self.batch_size.observe(batch_size)
        for exit_layer, seconds in intervals:
            self.inter_token.labels(exit_layer=str(exit_layer)).observe(seconds)

    def observe_finished(
        self,
        *,
        exit_layer: int,
        initial_exit_layer: int,
        queue_ms: float,
        ttft_ms: float,
        total_ms: float,
        completion_tokens: int,
        budget_ms: float | None,
        predicted_ms: float | None,
        downgrades: int,
    ) -> None:
        self.queue.observe(queue_ms / 1000)
        if completion_tokens > 0:
            self.ttft.labels(exit_layer=str(initial_exit_layer)).observe(ttft_ms / 1000)
            self.request_duration.labels(exit_layer=str(exit_layer)).observe(total_ms / 1000)
        if downgrades:
            self.downgrades.inc(downgrades)
        if predicted_ms and predicted_ms > 0:
            self.prediction_error.observe(total_ms / predicted_ms)
        if budget_ms is None:
            self.budget_requests.labels(outcome="none").inc()
        elif total_ms <= budget_ms:
            self.budget_requests.labels(outcome="met").inc()
        else:
            self.budget_requests.labels(outcome="missed").inc()
            self.budget_overrun.observe((total_ms - budget_ms) / 1000)

    def render(self) -> bytes:
        return generate_latest(self.registry)
