"""Static checks of the Ray deployment files (no cluster, no Kubernetes; seconds):

- ``deploy/k8s/rayservice.yaml`` against our schema of KubeRay's RayService (``check-jsonschema``);
- its ``serveConfigV2`` against Ray Serve's own ``ServeDeploySchema``, its ``import_path`` and
  ``args`` against ``app.ray_serve.builder`` (the application it names really builds);
- readiness on ``/ready`` for the Pods that serve, never for the head;
- the Grafana dashboard aggregates every series, so it works unchanged with a ``replica`` label;
- ``deploy/k8s/Dockerfile.ray`` passes hadolint.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from app.ray_serve.builder import RayAppArgs

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
RAYSERVICE = K8S / "rayservice.yaml"
SCHEMA = K8S / "rayservice.schema.json"
DOCKERFILE = K8S / "Dockerfile.ray"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "sortedserve.json"


def _tool(name: str) -> str:
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed (it is in the dev extra)")
    return found


def manifest() -> dict[str, Any]:
    return yaml.safe_load(RAYSERVICE.read_text())


def serve_config() -> dict[str, Any]:
    return yaml.safe_load(manifest()["spec"]["serveConfigV2"])


def test_rayservice_matches_the_schema() -> None:
    result = subprocess.run(
        [_tool("check-jsonschema"), "--schemafile", str(SCHEMA), str(RAYSERVICE)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_schema_refuses_a_misspelt_field(tmp_path: Path) -> None:
    bad = manifest()
    bad["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["replica"] = 2  # not "replicas"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    result = subprocess.run(
        [_tool("check-jsonschema"), "--schemafile", str(SCHEMA), str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0


def test_serve_config_is_valid_for_ray_serve_and_builds_our_application() -> None:
    pytest.importorskip("ray.serve")
    from ray.serve.schema import ServeDeploySchema

    from app.ray_serve.builder import ENGINE, INGRESS, build_app

    config = ServeDeploySchema.model_validate(serve_config())
    assert config.http_options.port == 8000
    (application,) = config.applications
    assert application.route_prefix == "/"
    assert application.import_path == "app.ray_serve.builder:build_app"
    args = RayAppArgs(**application.args)
    assert args.router == "budget"
    built = build_app(application.args)
    deployments = {d.name: d for d in _deployments(built)}
    assert set(deployments) == {ENGINE, INGRESS}
    engine = deployments[ENGINE]
    scaling = engine._deployment_config.autoscaling_config
    assert (scaling.min_replicas, scaling.max_replicas) == (args.min_replicas, args.max_replicas)
    router = engine._deployment_config.request_router_config
    assert router.request_router_class.endswith("BudgetAwareRouter")


def _deployments(application: Any) -> list[Any]:
    """The deployments bound in ``application`` (the ingress and what it was bound with)."""
    found = []
    stack = [application]
    while stack:
        node = stack.pop()
        deployment = getattr(node, "_bound_deployment", None)
        if deployment is None:
            continue
        found.append(deployment)
        stack.extend(deployment.init_args)
    return found


def test_workers_are_ready_on_ready_and_the_head_keeps_kuberay_probes() -> None:
    cluster = manifest()["spec"]["rayClusterConfig"]
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"]
    assert all("readinessProbe" not in c for c in head)  # the app is submitted once it is ready
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    for group in cluster["workerGroupSpecs"]:
        (container,) = group["template"]["spec"]["containers"]
        probe = container["readinessProbe"]
        assert probe["httpGet"] == {"path": "/ready", "port": 8000}
        assert probe["periodSeconds"] * probe["failureThreshold"] >= 30
        assert any(p["containerPort"] == 8000 for p in container["ports"])


def test_worker_resources_hold_the_replicas_they_are_given() -> None:
    cluster = manifest()["spec"]["rayClusterConfig"]
    args = RayAppArgs(**serve_config()["applications"][0]["args"])
    most = args.max_replicas or args.replicas
    per_worker = float(cluster["workerGroupSpecs"][0]["rayStartParams"]["num-cpus"])
    workers = cluster["workerGroupSpecs"][0]["maxReplicas"]
    assert per_worker * workers >= most * args.replica_cpus
    threads = args.settings.get("torch_threads")
    assert threads is not None and threads <= args.replica_cpus


def test_the_dashboard_aggregates_every_series_across_replicas() -> None:
    import json

    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", []) if "expr" in t]
    assert exprs
    for expr in exprs:
        inner = re.sub(r"^histogram_quantile\(\s*[0-9.]+\s*,\s*", "", expr)
        assert inner.startswith("sum"), expr  # one series per panel line, not one per replica
        for group in re.findall(r"by \(([^)]*)\)", expr):
            assert "replica" not in group and "instance" not in group, expr


def test_the_ray_image_dockerfile_passes_hadolint() -> None:
    result = subprocess.run(
        [_tool("hadolint"), str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ray[serve]==2.60.0" in DOCKERFILE.read_text()  # the pin of pyproject's [ray] extra
    assert '"ray[serve]==2.60.0"' in (ROOT / "pyproject.toml").read_text()
