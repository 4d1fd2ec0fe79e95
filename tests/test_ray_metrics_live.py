"""Every replica's metrics reach a real Prometheus, and the Grafana dashboard works unchanged.

``python -m app serve-ray`` with two replicas of a tiny model made in the test, and a real
Prometheus (as in tests/test_deploy_live.py, which this module borrows its fixtures and helpers
from) scraping the ingress's ``/metrics`` every second while the same mixed traffic runs. Then:
every ``sortedserve_*`` series comes from both replicas, each with its ``replica`` label; the
sums Prometheus computes equal the replicas' own counts; and every dashboard query returns data.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

pytest.importorskip("ray.serve")


from tests.ray_support import tiny_ray_server, tokens_by_replica
from tests.test_deploy_live import (
    _values,
    prometheus,
    prometheus_bin,
    query,
    traffic_round,
)
from tests.test_deploy_static import SPEC_METRICS, concrete_promql, dashboard_targets

__all__ = ["prometheus", "prometheus_bin"]  # fixtures used here (they ask for `server` below)

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def server(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The Ray application's URL (replaces tests/test_deploy_live.py's single server)."""
    work = tmp_path_factory.mktemp("ray-metrics")
    ray_server = tiny_ray_server(tiny_checkpoint, work, 2, "--max-batch-size", "4")
    ray_server.start(timeout_s=300)
    try:
        yield ray_server.url
    finally:
        ray_server.stop()


def test_every_replica_reaches_prometheus_and_the_dashboard_works(
    server: str, prometheus: str
) -> None:
    replicas = set(httpx.get(f"{server}/ready", timeout=30).json()["replicas"])
    assert len(replicas) == 2
    exits = httpx.get(f"{server}/info", timeout=30).json()["exits"]
    traffic_round(server, exits)  # creates every labelled series
    time.sleep(3)
    traffic_round(server, exits)

    tokens = tokens_by_replica(server)
    assert set(tokens) == replicas and all(v > 0 for v in tokens.values()), tokens
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if _values(query(prometheus, "sum(sortedserve_generated_tokens_total)")) == [
            sum(tokens.values())
        ]:
            break
        time.sleep(0.5)
    else:
        pytest.fail("Prometheus did not scrape the replicas' final counts within 20 s")

    # every SPEC series, once per replica, labelled
    for name, (kind, _labels) in SPEC_METRICS.items():
        series = f"{name}_count" if kind == "histogram" else name
        by_replica = query(prometheus, f"count by (replica) ({series})")
        assert {r["metric"].get("replica") for r in by_replica} == replicas, name

    failures = []
    for target in dashboard_targets():
        promql = concrete_promql(target.expr, rate_interval="1m", range_="5m")
        values = _values(query(prometheus, promql))
        if not any(not math.isnan(v) for v in values):
            failures.append(f"{target.name}: {promql}")
    assert not failures, "dashboard queries without data:\n" + "\n".join(failures)
