"""Helpers shared by the reliability tests (tests/test_reliability_*.py).

The tests are black-box: they start ``python -m app serve`` through :mod:`app.api.launcher`, speak
HTTP to it, and write the figures they measure to ``bench/results/reliability.json`` (one section
per test) so that the numbers in docs/reliability.md can be traced to a run.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

REPO_ROOT = Path(__file__).resolve().parents[1]
FIGURES_PATH = REPO_ROOT / "bench" / "results" / "reliability.json"
ERROR_KINDS = {
    "validation": (413, 422),
    "auth": (401,),
    "not_found": (404, 405),
    "overloaded": (429,),
    "unavailable": (503,),
    "internal": (500,),
}
PROMPT = "Once upon a time there was"


def server_env(profile_cache: Path, **settings: str | int) -> dict[str, str]:
    """``SORTEDSERVE_*`` variables for a small CPU server; ``settings`` override (lower case)."""
    env = {
        "SORTEDSERVE_PROFILE_CACHE_DIR": str(profile_cache),
        "SORTEDSERVE_MAX_BATCH_SIZE": "2",
        "SORTEDSERVE_PROFILE_BATCH_SIZES": "[1,2]",
        "SORTEDSERVE_TORCH_THREADS": "1",
        "SORTEDSERVE_DEVICE": "cpu",
        "SORTEDSERVE_API_KEY": "",
    }
    env.update({f"SORTEDSERVE_{k.upper()}": str(v) for k, v in settings.items()})
    return env


def assert_error_shape(response: httpx.Response, status: int | None = None) -> dict[str, str]:
    """The SPEC §3 error body: exactly ``error`` and ``error_type``, a kind matching the status."""
    assert response.headers.get("content-type", "").startswith("application/json"), response.text
    body = response.json()
    assert isinstance(body, dict) and set(body) == {"error", "error_type"}, body
    assert isinstance(body["error"], str) and body["error"].strip(), body
    assert body["error_type"] in ERROR_KINDS, body
    assert response.status_code in ERROR_KINDS[body["error_type"]], (response.status_code, body)
    if status is not None:
        assert response.status_code == status, (response.status_code, body)
    return body


def sse_events(lines: Iterator[str]) -> Iterator[tuple[str, str]]:
    """(event, data) pairs from an SSE line stream (comments and ids ignored)."""
    event, data = "message", []
    for line in lines:
        if line == "":
            if data:
                yield event, "\n".join(data)
            event, data = "message", []
        elif not line.startswith(":"):
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "event":
                event = value
            elif name == "data":
                data.append(value)


def metric_samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def load_gauges(client: httpx.Client) -> dict[str, float]:
    """The load as /metrics and /info report it: gauges, admitted requests, free KV slots."""
    samples = metric_samples(client.get("/metrics").text)
    load = client.get("/info").json()["load"]
    return {
        "running": samples.get(("sortedserve_requests_running", frozenset()), -1.0),
        "waiting": samples.get(("sortedserve_requests_waiting", frozenset()), -1.0),
        "inflight": load["inflight"],
        "engine_running": load["running"],
        "engine_waiting": load["waiting"],
        "free_slots": load["free_slots"],
        "max_slots": load["max_slots"],
    }


def is_idle(g: Mapping[str, float]) -> bool:
    return (
        g["running"] == 0
        and g["waiting"] == 0
        and g["inflight"] == 0
        and g["engine_running"] == 0
        and g["engine_waiting"] == 0
        and g["free_slots"] == g["max_slots"]
    )


def poll(
    predicate: Callable[[], Any], timeout_s: float, interval_s: float = 0.05
) -> tuple[Any, float]:
    """Call ``predicate`` until it is truthy or time runs out; (last value, seconds taken)."""
    start = time.monotonic()
    while True:
        value = predicate()
        elapsed = time.monotonic() - start
        if value or elapsed >= timeout_s:
            return value, elapsed
        time.sleep(interval_s)


def rss_kib(pid: int) -> int:
    """Resident memory of a process, from /proc (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def record_figures(section: str, figures: Mapping[str, Any]) -> None:
    """Merge one test's figures into bench/results/reliability.json (created if missing)."""
    FIGURES_PATH.parent.mkdir(parents=True, exist_ok=True)
    try:
        data = json.loads(FIGURES_PATH.read_text())
    except (OSError, ValueError):
        data = {}
    data[section] = {
        "recorded_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        **figures,
    }
    tmp = FIGURES_PATH.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    tmp.replace(FIGURES_PATH)
