"""``serve-ray --address``: the application joins a Ray cluster that is already running (started
here by the test process itself), serves from it, and on SIGTERM removes only its own application:
the cluster, and Ray Serve on it, keep running."""

from __future__ import annotations

import tempfile
from pathlib import Path

import httpx
import pytest

pytest.importorskip("ray.serve")

from app.ray_serve.launcher import RayServerProcess

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]


def test_joins_a_running_cluster_and_leaves_it_running(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    import ray
    from ray import serve

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    class Other:  # someone else's application on the same cluster (pickled by value)
        def __call__(self, request: object) -> str:
            return "still here"

    ray.init(
        num_cpus=2,
        include_dashboard=False,
        namespace="sortedserve-test",
        _temp_dir=tempfile.mkdtemp(prefix="ssray-"),
    )
    try:
        address = ray.get_runtime_context().gcs_address
        server = RayServerProcess(
            tiny_checkpoint,
            tmp_path / "serve-ray.log",
            replicas=2,
            args=[
                *("--address", address, "--replica-cpus", "0", "--threads", "1"),
                *("--max-batch-size", "2", "--profile-cache-dir", str(tmp_path / "profiles")),
            ],
        )
        # Serve already runs there, with another application that must survive us
        serve.start(http_options={"host": "127.0.0.1", "port": server.port})
        serve.run(Other.bind(), name="other", route_prefix="/other")
        server.start(timeout_s=300)
        try:
            assert len(httpx.get(f"{server.url}/ready", timeout=30).json()["replicas"]) == 2
            body = {"prompt": "Once", "max_new_tokens": 4}
            r = httpx.post(f"{server.url}/v1/generate", json=body, timeout=60)
            assert r.status_code == 200 and r.json()["sortedserve"]["replica"]
            # the replicas run on the test's own cluster
            names = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)}
            assert any("SortedServeEngine" in n for n in names), names
        finally:
            assert server.stop() == 0, server.tail()
        # our application is gone; Serve, the other application and the cluster are not
        apps = serve.status().applications
        assert "sortedserve" not in apps
        assert apps["other"].status == "RUNNING"
        assert httpx.get(f"{server.url}/other", timeout=30).text == "still here"
        assert ray.is_initialized() and ray.cluster_resources().get("CPU") == 2
    finally:
        serve.shutdown()
        ray.shutdown()
