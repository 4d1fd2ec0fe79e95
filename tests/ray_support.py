"""A ``serve-ray`` application on a tiny checkpoint, as the Ray tests start it."""

from __future__ import annotations

import tempfile
from pathlib import Path

from app.ray_serve.launcher import RayServerProcess


def tiny_ray_server(checkpoint: Path, work: Path, replicas: int, *extra: str) -> RayServerProcess:
    """No CPU reserved per replica, one torch thread, profiles cached in ``work``, and a short
    ``RAY_TMPDIR`` of its own (Ray's socket paths must stay short, and the stop test looks for
    processes still mentioning it); ``extra`` flags after those."""
    return RayServerProcess(
        checkpoint,
        work / "serve-ray.log",
        replicas=replicas,
        args=[
            *("--replica-cpus", "0", "--threads", "1"),
            *("--profile-cache-dir", str(work / "profiles")),
            *extra,
        ],
        env={"RAY_TMPDIR": tempfile.mkdtemp(prefix="ssray-"), "RAY_USAGE_STATS_ENABLED": "0"},
    )


def tokens_by_replica(url: str) -> dict[str, float]:
    """Tokens each replica has generated so far (its sortedserve_generated_tokens_total)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", timeout=30).text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "sortedserve_generated_tokens_total":
                out[s.labels["replica"]] = out.get(s.labels["replica"], 0.0) + s.value
    return out
