"""Live checks of the deployment, without Docker.

- The dashboard: the real server (``python -m app serve`` on a tiny checkpoint) and a real
  Prometheus (Debian's ``prometheus`` package, installed here with apt-get when missing and running
  as root) scraping it every second while traffic runs; then every dashboard query is evaluated
  through Prometheus's HTTP API and must return data.
- The image's command: the Dockerfile's runtime ``WORKDIR``/``ENV``/``CMD`` replayed on the host
  (the same files laid out in a temporary folder) serves, passes the image's ``HEALTHCHECK``, and
  on its ``STOPSIGNAL`` drains an open stream and exits 0.

Every subprocess is bounded in time and killed at the end, whatever happens.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.test_deploy_static import (
    DOCKERFILE,
    ROOT,
    SPEC_METRICS,
    concrete_promql,
    dashboard_targets,
    exported_series,
    final_stage,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SERVER_START_TIMEOUT_S = 180.0
PROMETHEUS_START_TIMEOUT_S = 30.0
APT_TIMEOUT_S = 120.0  # per apt-get command; at most three run
# A small batch and few profiled batch sizes: quick start-up on a 2-core CI machine.
FAST_PROFILE = {
    "SORTEDSERVE_MAX_BATCH_SIZE": "4",
    "SORTEDSERVE_PROFILE_BATCH_SIZES": "[1,2,4]",
    "SORTEDSERVE_TORCH_THREADS": "1",
}
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
    cmd: list[str], log: Path, env: dict[str, str] | None = None, cwd: Path | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """Start ``cmd`` in its own process group; SIGTERM, then SIGKILL, the group on exit."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True
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
    tmp = tmp_path_factory.mktemp("live-server")
    port = free_port()
    env = {
        **os.environ,
        **FAST_PROFILE,
        "SORTEDSERVE_PROFILE_CACHE_DIR": str(tmp / "profile-cache"),
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


def generate(url: str, body: dict, on_token: Callable[[int], None] | None = None) -> dict:
    """POST /v1/generate; a streaming request is read to its `done` event, calling ``on_token``
    with the number of tokens received so far after each token event."""
    with httpx.Client(base_url=url, timeout=60) as client:
        if not body.get("stream"):
            response = client.post("/v1/generate", json=body)
            assert response.status_code == 200, response.text
            return response.json()
        event, final = None, None
        with client.stream("POST", "/v1/generate", json=body) as response:
            assert response.status_code == 200, response.read()
            tokens = 0
            for line in response.iter_lines():
                if line.startswith("event:"):
                    event = line.removeprefix("event:").strip()
                elif line.startswith("data:") and event == "token":
                    tokens += 1
                    if on_token is not None:
                        on_token(tokens)
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


@pytest.mark.timeout(600)  # includes installing prometheus on a fresh machine
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
    outcomes = {r["budget"]["met"] for r in responses if (r.get("budget") or {}).get("budget_ms")}
    assert outcomes == {True, False}, "budgets both met and missed"
    downgrades = sum(len(r["budget"].get("downgrades") or []) for r in responses if r.get("budget"))

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
    print(f"{len(dashboard_targets())} dashboard queries returned data; downgrades: {downgrades}")


# ---------------------------------------------------------------------------------------------
# The image's command, replayed on the host
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RuntimeStage:
    workdir: str
    env: dict[str, str]
    copies: list[tuple[str, str]]  # (source in the repository, destination under workdir)
    cmd: list[str]
    healthcheck: list[str]
    stopsignal: str


def runtime_stage() -> RuntimeStage:
    workdir, env, copies = "/", {}, []
    cmd: list[str] = []
    healthcheck: list[str] = []
    stopsignal = "SIGTERM"
    for keyword, args in final_stage(DOCKERFILE.read_text()):
        if keyword == "WORKDIR":
            workdir = args
        elif keyword == "ENV":
            for pair in shlex.split(args):
                key, _, value = pair.partition("=")
                env[key] = value
        elif keyword == "COPY" and "--from" not in args:
            src, dst = [a for a in args.split() if not a.startswith("--")]
            copies.append((src.rstrip("/"), dst))
        elif keyword == "CMD":
            cmd = json.loads(args)
        elif keyword == "HEALTHCHECK":
            healthcheck = json.loads(args[args.index("CMD ") + 4 :])
        elif keyword == "STOPSIGNAL":
            stopsignal = args
    return RuntimeStage(workdir, env, copies, cmd, healthcheck, stopsignal)


def host_replay(
    stage: RuntimeStage, root: Path, model: Path, port: int
) -> tuple[Path, dict[str, str], list[str]]:
    """The image's files under ``root`` (symlinks), its environment with paths mapped there, and
    its command with ``python`` being this interpreter (the image's /opt/venv is our venv)."""
    workdir = root / stage.workdir.lstrip("/")
    workdir.mkdir(parents=True)
    for src, dst in stage.copies:
        target = workdir / dst
        target.parent.mkdir(parents=True, exist_ok=True)
        # the baked-in default model is replaced by the tiny one: the image's layout is the point
        target.symlink_to(model if src == "model_store/default" else ROOT / src)
    env = dict(os.environ)
    for key, value in stage.env.items():
        if key == "PATH":  # the image's venv first; here the test's interpreter is that venv
            continue
        if value.startswith("/"):
            value = str(root / value.lstrip("/"))
        env[key] = value
    env.pop("SORTEDSERVE_API_KEY", None)
    # The image listens on 0.0.0.0:8000; here a free port on localhost, and a smaller latency
    # profile to measure (settings the image leaves at their defaults).
    env.update(SORTEDSERVE_HOST="127.0.0.1", SORTEDSERVE_PORT=str(port), **FAST_PROFILE)
    cmd = [sys.executable if stage.cmd[0] == "python" else stage.cmd[0], *stage.cmd[1:]]
    return workdir, env, cmd


@pytest.mark.timeout(300)
def test_the_image_command_serves_passes_its_healthcheck_and_drains_on_stop(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    stage = runtime_stage()
    assert stage.cmd[:1] == ["python"] and stage.healthcheck[:1] == ["python"]
    port = free_port()
    workdir, env, cmd = host_replay(stage, tmp_path / "image", tiny_checkpoint, port)
    assert env["SORTEDSERVE_MODEL"] == "model_store/default", "relative to WORKDIR, as in the image"
    log = tmp_path / "server.log"
    url = f"http://127.0.0.1:{port}"
    with running(cmd, log, env, cwd=workdir) as proc:
        wait_until(
            lambda: httpx.get(f"{url}/ready", timeout=2).status_code == 200,
            SERVER_START_TIMEOUT_S,
            proc,
            log,
            "the image's command: /ready",
        )
        info = httpx.get(f"{url}/info", timeout=10).json()
        assert info["num_layers"] == 4, info

        health = [sys.executable, *stage.healthcheck[1:]]
        ok = subprocess.run(health, env=env, capture_output=True, text=True, timeout=10)
        assert ok.returncode == 0, ok.stderr
        dead = {**env, "SORTEDSERVE_PORT": str(free_port())}
        down = subprocess.run(health, env=dead, capture_output=True, text=True, timeout=10)
        assert down.returncode != 0, "the healthcheck fails when nothing listens"

        # A stream open when the stop signal comes still runs to its end (the drain), then the
        # process exits 0.
        sent_at: list[int] = []

        def stop_after_first_token(received: int) -> None:
            if not sent_at:
                proc.send_signal(getattr(signal, stage.stopsignal))
                sent_at.append(received)

        body = {"prompt": PROMPTS[0], "max_new_tokens": 200, "stream": True, "seed": 0}
        final = generate(url, body, on_token=stop_after_first_token)
        assert sent_at == [1]
        assert final["finish_reason"] in ("length", "eos", "stop"), final
        assert final["usage"]["completion_tokens"] > 1, "tokens were made after the signal"
        assert proc.wait(timeout=60) == 0, tail(log)
