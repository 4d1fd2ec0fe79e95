"""Live check of the dashboard: the real server (``python -m app serve`` on a tiny checkpoint) and a
real Prometheus (Debian's ``prometheus`` package, installed here with apt-get when missing and
running as root) scraping it every second while traffic runs; then every dashboard query is
evaluated through Prometheus's HTTP API and must return data.

Every subprocess is bounded in time and killed at the end, whatever happens.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.test_deploy_static import (
    SPEC_METRICS,
    concrete_promql,
    dashboard_targets,
    exported_series,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SERVER_START_TIMEOUT_S = 180.0
PROMETHEUS_START_TIMEOUT_S = 30.0
APT_TIMEOUT_S = 300.0
RATE_WINDOW = "1m"  # replaces $__rate_interval: spans the warm-up and the main traffic


# ---------------------------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running(
    cmd: list[str], log: Path, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """Start ``cmd`` in its own process group; SIGTERM, then SIGKILL, the group on exit."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    try:
        yield proc
    finally:
        for sig, wait_s in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 10.0)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(timeout=wait_s)
                break
            except subprocess.TimeoutExpired:
                continue


def tail(log: Path, n: int = 40) -> str:
    lines = log.read_text(errors="replace").splitlines() if log.exists() else []
    return "\n".join(lines[-n:])


def wait_until(
    check: Callable[[], bool],
    timeout_s: float,
    proc: subprocess.Popen[bytes],
    log: Path,
    what: str,
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{what}: the process exited with {proc.returncode}:\n{tail(log)}")
        with contextlib.suppress(httpx.HTTPError):
            if check():
                return
        time.sleep(0.25)
    pytest.fail(f"{what}: not within {timeout_s:.0f} s:\n{tail(log)}")


# ---------------------------------------------------------------------------------------------
# Prometheus: found, or installed from Debian when we may
# ---------------------------------------------------------------------------------------------


def find_prometheus() -> str | None:
    for candidate in (os.environ.get("PROMETHEUS_BIN"), shutil.which("prometheus")):
        if candidate and Path(candidate).is_file():
            return candidate
    return "/usr/bin/prometheus" if Path("/usr/bin/prometheus").is_file() else None


def install_prometheus() -> str:
    """apt-get install Debian's prometheus; skip (with the reason) only if it cannot be had."""
    apt = shutil.which("apt-get")
    if apt is None:
        pytest.skip("prometheus is not installed and there is no apt-get to install it")
    if os.geteuid() != 0:
        pytest.skip(
            "prometheus is not installed and installing it needs root: "
            "run `sudo apt-get install -y --no-install-recommends prometheus` "
            "or set PROMETHEUS_BIN"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = [apt, "install", "-y", "--no-install-recommends", "prometheus"]
    errors = []
    for step in ([install], [[apt, "update"], install]):
        for cmd in step:
            try:
                result = subprocess.run(
                    cmd, capture_output=True, text=True, env=env, timeout=APT_TIMEOUT_S
                )
            except subprocess.TimeoutExpired:
                errors.append(f"{' '.join(cmd)}: timed out after {APT_TIMEOUT_S:.0f} s")
                break
            if result.returncode != 0:
                errors.append(f"{' '.join(cmd)}: {result.stderr.strip()[-500:]}")
                break
        found = find_prometheus()
        if found:
            return found
    pytest.skip("prometheus cannot be installed here: " + " | ".join(errors))


@pytest.fixture(scope="module")
def prometheus_bin() -> str:
    return find_prometheus() or install_prometheus()


# ---------------------------------------------------------------------------------------------
# The server under test
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if (
        importlib.util.find_spec("app.api") is None
        or not (Path(__file__).resolve().parent.parent / "app" / "api" / "serve_cli.py").exists()
    ):
        pytest.skip("app.api (the HTTP server, `python -m app serve`) is not written yet")
    tmp = tmp_path_factory.mktemp("live-server")
    port = free_port()
    env = {
        **os.environ,
        "SORTEDSERVE_PROFILE_CACHE_DIR": str(tmp / "profile-cache"),
        "SORTEDSERVE_MAX_BATCH_SIZE": "4",
        "SORTEDSERVE_PROFILE_BATCH_SIZES": "[1,2,4]",
        "SORTEDSERVE_TORCH_THREADS": "1",
        "SORTEDSERVE_DEVICE": "cpu",
    }
    env.pop("SORTEDSERVE_API_KEY", None)
    cmd = [sys.executable, "-m", "app", "serve", "--model", str(tiny_checkpoint)]
    cmd += ["--host", "127.0.0.1", "--port", str(port)]
    log = tmp / "server.log"
    url = f"http://127.0.0.1:{port}"
    with running(cmd, log, env) as proc:
        wait_until(
            lambda: httpx.get(f"{url}/ready", timeout=2).status_code == 200,
            SERVER_START_TIMEOUT_S,
            proc,
            log,
            "server /ready",
        )
        yield url
        if proc.poll() is not None:
            pytest.fail(f"the server died during the test:\n{tail(log)}")


@pytest.fixture(scope="module")
def prometheus(
    prometheus_bin: str, server: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("live-prometheus")
    port = free_port()
    config = tmp / "prometheus.yml"
    # JSON is YAML: no YAML writer needed.
    config.write_text(
        json.dumps(
            {
                "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
                "scrape_configs": [
                    {
                        "job_name": "sortedserve",
                        "metrics_path": "/metrics",
                        "static_configs": [{"targets": [server.removeprefix("http://")]}],
                    }
                ],
            }
        )
    )
    cmd = [
        prometheus_bin,
        f"--config.file={config}",
        f"--storage.tsdb.path={tmp / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--log.level=warn",
    ]
    log = tmp / "prometheus.log"
    url = f"http://127.0.0.1:{port}"
    with running(cmd, log) as proc:
        wait_until(
            lambda: httpx.get(f"{url}/-/ready", timeout=2).status_code == 200,
            PROMETHEUS_START_TIMEOUT_S,
            proc,
            log,
            "prometheus /-/ready",
        )
        wait_until(
            lambda: _values(query(url, 'up{job="sortedserve"}')) == [1.0],
            PROMETHEUS_START_TIMEOUT_S,
            proc,
            log,
            "prometheus scraping the server",
        )
        yield url


def query(prometheus_url: str, promql: str) -> list[dict]:
    response = httpx.get(f"{prometheus_url}/api/v1/query", params={"query": promql}, timeout=10)
    body = response.json()
    if body.get("status") != "success":
        raise AssertionError(f"{promql!r}: {body.get('errorType')}: {body.get('error')}")
    assert body["data"]["resultType"] == "vector", promql
    return body["data"]["result"]


def _values(result: list[dict]) -> list[float]:
    return [float(sample["value"][1]) for sample in result]


# ---------------------------------------------------------------------------------------------
# Traffic
# ---------------------------------------------------------------------------------------------

PROMPTS = [
    "Once upon a time there was",
    "The quick brown fox",
    "### Instruction:\nSay hello.\n\n### Response:\n",
    "def add(a, b):",
]


def generate(url: str, body: dict) -> dict:
    """POST /v1/generate; a streaming request is read to its `done` event."""
    with httpx.Client(base_url=url, timeout=60) as client:
        if not body.get("stream"):
            response = client.post("/v1/generate", json=body)
            assert response.status_code == 200, response.text
            return response.json()
        event, final = None, None
        with client.stream("POST", "/v1/generate", json=body) as response:
            assert response.status_code == 200, response.read()
            for line in response.iter_lines():
                if line.startswith("event:"):
                    event = line.removeprefix("event:").strip()
                elif line.startswith("data:") and event in ("done", "error"):
                    final = json.loads(line.removeprefix("data:").strip())
                    assert event == "done", final
        assert final is not None, "the stream ended without a done event"
        return final


def traffic_round(url: str, exits: list[int]) -> list[dict]:
    """One of each kind of request the dashboard shows, run concurrently so that batches form."""
    bodies: list[dict] = []
    for i, prompt in enumerate(PROMPTS):
        bodies.append({"prompt": prompt, "max_new_tokens": 12})  # no budget: deepest exit
        bodies.append({"prompt": prompt, "max_new_tokens": 12, "stream": True})
        bodies.append({"prompt": prompt, "max_new_tokens": 12, "budget_ms": 60_000})  # met
        bodies.append({"prompt": prompt, "max_new_tokens": 24, "budget_ms": 1, "stream": True})
        bodies.append({"prompt": prompt, "max_new_tokens": 12, "exit_layer": exits[i % 2]})
        # Budgets that fit a deep exit only while the batch is light: downgrades under load.
        bodies.append({"prompt": prompt, "max_new_tokens": 48, "budget_ms": 150})
    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(lambda b: generate(url, b), bodies))


def scraped_metrics(url: str) -> dict[str, str]:
    """Family name -> type, from the server's own /metrics."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {f.name: f.type for f in text_string_to_metric_families(text)}


# ---------------------------------------------------------------------------------------------
# The test
# ---------------------------------------------------------------------------------------------


@pytest.mark.timeout(420)
def test_every_dashboard_query_returns_data_from_a_real_prometheus(
    server: str, prometheus: str
) -> None:
    families = scraped_metrics(server)
    for name, (kind, _labels) in SPEC_METRICS.items():
        family = name.removesuffix("_total") if kind == "counter" else name
        assert families.get(family) == kind, f"/metrics: {name} is {families.get(family)}"

    exits = httpx.get(f"{server}/info", timeout=10).json()["exits"]
    # Warm-up creates every labelled series; Prometheus then scrapes them before the main round
    # increments them, so that rate() over the window sees an increase.
    traffic_round(server, exits)
    time.sleep(3)
    responses = traffic_round(server, exits)
    assert {r["exit_layer"] for r in responses} >= {exits[0], exits[-1]}
    outcomes = {r["budget"]["met"] for r in responses if r.get("budget")}
    assert outcomes == {True, False}, "budgets both met and missed"

    # Wait for Prometheus to hold the server's final counts.
    text = httpx.get(f"{server}/metrics", timeout=10).text
    tokens = sum(
        s.value
        for f in text_string_to_metric_families(text)
        if f.name == "sortedserve_generated_tokens"
        for s in f.samples
        if s.name == "sortedserve_generated_tokens_total"
    )
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if _values(query(prometheus, "sum(sortedserve_generated_tokens_total)")) == [tokens]:
            break
        time.sleep(0.5)
    else:
        pytest.fail("Prometheus did not scrape the final counts within 15 s")

    # Every series name a query uses is in the server's exposition.
    series = exported_series()
    for target in dashboard_targets():
        for name in series:
            if name in target.expr:
                base = series[name][0]
                kind = SPEC_METRICS[base][0]
                assert (base.removesuffix("_total") if kind == "counter" else base) in families

    failures = []
    for target in dashboard_targets():
        promql = concrete_promql(target.expr, rate_interval=RATE_WINDOW, range_="5m")
        result = query(prometheus, promql)
        values = _values(result)
        if not any(not math.isnan(v) for v in values):
            failures.append(f"{target.name}: {promql}\n    -> {result}")
    assert not failures, "dashboard queries without data:\n" + "\n".join(failures)
