"""``python -m app serve-ray`` on a real local Ray cluster: two engine replicas of a tiny model made
in the test, spoken to over real HTTP through Ray Serve's proxy and our ingress.

Checks: ``/ready`` waits for both replicas; every route answers as on one machine and names its
replica (``sortedserve.replica``); errors keep their JSON shape; the router spreads unbudgeted load
and sends a budgeted request away from the busy replica; ``/metrics`` carries every replica's
series with a ``replica`` label; killing a replica mid-stream ends that stream with an error event,
the other replica keeps serving and Ray brings a new replica into ``/ready``; SIGTERM stops the
application and the cluster. Skipped without the ``[ray]`` extra.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

pytest.importorskip("ray.serve")

from prometheus_client.parser import text_string_to_metric_families

from app.ray_serve.launcher import RayServerProcess
from tests.ray_support import tiny_ray_server, tokens_by_replica

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]

LONG = 180  # tokens of a "long" request on the tiny model (context 256)


@pytest.fixture(scope="module")
def cluster(
    tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RayServerProcess]:
    work = tmp_path_factory.mktemp("ray")
    server = tiny_ray_server(
        tiny_checkpoint, work, 2,
        *("--max-batch-size", "4", "--health-check-period", "1", "--stats-period", "0.1"),
    )  # fmt: skip
    server.start(timeout_s=300)
    try:
        yield server
    finally:
        server.stop()


def generate(server: RayServerProcess, **body: Any) -> httpx.Response:
    body.setdefault("prompt", "Once upon a time")
    return httpx.post(f"{server.url}/v1/generate", json=body, timeout=120)


def ready_replicas(server: RayServerProcess) -> dict[str, int]:
    r = httpx.get(f"{server.url}/ready", timeout=30)
    if r.status_code != 200:
        return {}
    return {d["replica"]: d["pid"] for d in r.json()["details"]}


def test_ready_waits_for_both_replicas_and_health_answers(cluster: RayServerProcess) -> None:
    replicas = ready_replicas(cluster)
    assert len(replicas) == 2
    assert len(set(replicas.values())) == 2  # two processes, each with its own engine
    assert httpx.get(f"{cluster.url}/health", timeout=10).json() == {"status": "ok"}


def test_every_route_names_its_replica(cluster: RayServerProcess) -> None:
    replicas = set(ready_replicas(cluster))
    r = generate(cluster, max_new_tokens=8, budget_ms=5000)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["sortedserve"]["replica"] in replicas
    assert r.headers["x-sortedserve-replica"] == body["sortedserve"]["replica"]
    assert body["usage"]["completion_tokens"] == 8
    assert body["budget"]["met"] is True

    for path, payload in [
        ("/v1/completions", {"model": "m", "prompt": "Once", "max_tokens": 4}),
        (
            "/v1/chat/completions",
            {"model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
        ),
    ]:
        out = httpx.post(f"{cluster.url}{path}", json=payload, timeout=60)
        assert out.status_code == 200, out.text
        assert out.json()["sortedserve"]["replica"] in replicas

    models = httpx.get(f"{cluster.url}/v1/models", timeout=30)
    assert models.status_code == 200 and models.json()["data"]
    info = httpx.get(f"{cluster.url}/info", timeout=30).json()
    assert info["exits"] == [1, 2, 3, 4]


def test_streams_token_events_then_done_with_the_replica(cluster: RayServerProcess) -> None:
    events = list(stream_events(cluster, {"max_new_tokens": 6, "stream": True}))
    kinds = [e for e, _ in events]
    assert kinds == ["token"] * 6 + ["done"]
    done = events[-1][1]
    assert done["text"] == "".join(d["text"] for e, d in events if e == "token")
    assert done["sortedserve"]["replica"] in ready_replicas(cluster)


def test_errors_keep_their_json_shape_across_the_ingress(cluster: RayServerProcess) -> None:
    empty = generate(cluster, prompt="")
    assert empty.status_code == 422
    assert empty.json()["error_type"] == "validation"
    both = generate(cluster, budget_ms=100, exit_layer=2)
    assert both.status_code == 422 and "exit_layer" in both.json()["error"]
    broken = httpx.post(
        f"{cluster.url}/v1/generate",
        content=b"{not json",
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert broken.status_code == 422 and broken.json()["error_type"] == "validation"
    missing = httpx.get(f"{cluster.url}/v2/nothing", timeout=30)
    assert missing.status_code == 404 and missing.json()["error_type"] == "not_found"


def test_unbudgeted_load_spreads_and_a_budget_avoids_the_busy_replica(
    cluster: RayServerProcess,
) -> None:
    # two long requests at once: the router sends the second to the other replica
    results: dict[int, httpx.Response] = {}

    def long(i: int, n: int) -> None:
        results[i] = generate(cluster, max_new_tokens=n, ignore_eos=True)

    threads = [threading.Thread(target=long, args=(i, LONG)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    served = {results[i].json()["sortedserve"]["replica"] for i in range(2)}
    assert len(served) == 2, "two concurrent unbudgeted requests went to one replica"

    # one replica busy with a long stream; the budgeted request goes to the other one
    with httpx.stream(
        "POST",
        f"{cluster.url}/v1/generate",
        json={"prompt": "Once", "max_new_tokens": LONG, "ignore_eos": True, "stream": True},
        timeout=120,
    ) as busy:
        busy_replica = busy.headers["x-sortedserve-replica"]
        lines = busy.iter_lines()
        next(line for line in lines if line.startswith("data:"))  # it is decoding
        time.sleep(0.5)  # a few routing-stats periods: the router sees it
        for _ in range(3):
            tight = generate(cluster, max_new_tokens=16, budget_ms=300, ignore_eos=True).json()
            assert tight["sortedserve"]["replica"] != busy_replica
            assert tight["budget"]["initial_exit_layer"] == 4  # full depth on the idle one
        for _ in lines:
            pass


def test_metrics_carry_every_replica_with_a_replica_label(cluster: RayServerProcess) -> None:
    for _ in range(4):
        generate(cluster, max_new_tokens=2)
    text = httpx.get(f"{cluster.url}/metrics", timeout=30).text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in (
        "sortedserve_requests",
        "sortedserve_request_duration_seconds",
        "sortedserve_generated_tokens",
        "sortedserve_budget_requests",
        "sortedserve_batch_size",
        "sortedserve_requests_running",
        "sortedserve_requests_waiting",
    ):
        samples = families[name].samples
        assert samples and all("replica" in s.labels for s in samples), name
        assert {s.labels["replica"] for s in samples} == set(ready_replicas(cluster)), name
    served = [
        s.value
        for s in families["sortedserve_requests"].samples
        if s.name == "sortedserve_requests_total" and s.labels["status"] == "200"
    ]
    assert sum(served) >= 4


def stream_events(
    server: RayServerProcess, body: dict[str, Any], timeout: float = 60
) -> Iterator[tuple[str, Any]]:
    body.setdefault("prompt", "Once upon a time")
    with httpx.stream("POST", f"{server.url}/v1/generate", json=body, timeout=timeout) as r:
        yield from parse_sse(r.iter_lines())


def parse_sse(lines: Iterator[str]) -> Iterator[tuple[str, Any]]:
    event = "message"
    for line in lines:
        if line.startswith("event:"):
            event = line.split(":", 1)[1].strip()
        elif line.startswith("data:"):
            yield event, json.loads(line.split(":", 1)[1])
            event = "message"


def test_a_client_that_leaves_cancels_its_request_on_the_replica(
    cluster: RayServerProcess,
) -> None:
    def inflight() -> dict[str, int]:
        r = httpx.get(f"{cluster.url}/ready", timeout=30).json()
        return {d["replica"]: d["inflight"] for d in r["details"]}

    before = tokens_by_replica(cluster.url)
    with httpx.stream(
        "POST",
        f"{cluster.url}/v1/generate",
        json={"prompt": "Once", "max_new_tokens": LONG, "ignore_eos": True, "stream": True},
        timeout=60,
    ) as r:
        replica = r.headers["x-sortedserve-replica"]
        lines = r.iter_lines()
        next(line for line in lines if line.startswith("data:"))
    # the connection is closed after the first token
    left = time.monotonic()
    while time.monotonic() - left < 10 and inflight()[replica] != 0:
        time.sleep(0.1)
    assert inflight()[replica] == 0
    made = tokens_by_replica(cluster.url)[replica] - before.get(replica, 0.0)
    print(f"{made:.0f} of {LONG} tokens made before the cancel reached the engine")
    assert made < LONG / 2  # cancelled, not run to its end


def test_a_killed_replica_ends_its_stream_and_is_replaced(cluster: RayServerProcess) -> None:
    before = ready_replicas(cluster)
    assert len(before) == 2
    events: list[tuple[str, Any]] = []
    with httpx.stream(
        "POST",
        f"{cluster.url}/v1/generate",
        json={"prompt": "Once", "max_new_tokens": LONG, "ignore_eos": True, "stream": True},
        timeout=httpx.Timeout(30.0),  # a hung stream fails the test here
    ) as r:
        victim = r.headers["x-sortedserve-replica"]
        lines = parse_sse(r.iter_lines())
        events.append(next(lines))
        os.kill(before[victim], signal.SIGKILL)
        killed_at = time.monotonic()
        try:
            events.extend(lines)
        except httpx.HTTPError as exc:  # a cut connection is a clear end too, never a hang
            events.append(("cut", str(exc)))
    ended_s = time.monotonic() - killed_at
    kinds = [e for e, _ in events]
    assert "done" not in kinds
    assert kinds[-1] in ("error", "cut"), kinds[-3:]
    if kinds[-1] == "error":
        assert events[-1][1]["error_type"] == "unavailable"
    assert ended_s < 20

    # the other replica keeps serving meanwhile
    survivor = next(r for r in before if r != victim)
    for _ in range(3):
        ok = generate(cluster, max_new_tokens=4)
        assert ok.status_code == 200, ok.text
        assert ok.json()["sortedserve"]["replica"] == survivor or len(ready_replicas(cluster)) == 2

    # Ray starts a new replica; it joins /ready (and routing) once its model is loaded
    deadline = time.monotonic() + 180
    after: dict[str, int] = {}
    while time.monotonic() < deadline:
        after = ready_replicas(cluster)
        if len(after) == 2 and victim not in after:
            break
        time.sleep(1)
    recovered_s = time.monotonic() - killed_at
    assert len(after) == 2 and victim not in after, after
    print(f"stream ended ({kinds[-1]}: {events[-1][1]}) {ended_s:.1f} s after the kill")
    print(f"recovered in {recovered_s:.1f} s")
    newcomer = next(r for r in after if r != survivor)
    # it rejoins routing: two long requests at once use both replicas (within a few tries:
    # the router first needs the newcomer's load picture, published every 0.1 s)
    served: list[str] = []

    def long() -> None:
        r = generate(cluster, max_new_tokens=LONG, ignore_eos=True)
        served.append(r.json()["sortedserve"]["replica"])

    for _ in range(5):
        threads = [threading.Thread(target=long) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if newcomer in served:
            break
        time.sleep(1)
    assert newcomer in served, (served, after)


def test_a_request_whose_replica_dies_before_answering_is_retried(
    cluster: RayServerProcess,
) -> None:
    deadline = time.monotonic() + 120
    while len(ready_replicas(cluster)) < 2 and time.monotonic() < deadline:
        time.sleep(1)
    answers: list[httpx.Response] = []

    def long() -> None:
        answers.append(generate(cluster, max_new_tokens=LONG, ignore_eos=True))

    threads = [threading.Thread(target=long) for _ in range(2)]
    for t in threads:
        t.start()
    busy: list[dict[str, Any]] = []
    while not busy and any(t.is_alive() for t in threads):
        details = httpx.get(f"{cluster.url}/ready", timeout=30).json().get("details", [])
        busy = [d for d in details if d["inflight"] > 0]
    assert busy, "the requests ended before one could be interrupted"
    victim = busy[0]
    os.kill(victim["pid"], signal.SIGKILL)
    for t in threads:
        t.join()
    # a JSON answer is sent whole at its end: the interrupted one ran again elsewhere
    assert [a.status_code for a in answers] == [200, 200], [a.text for a in answers]
    served = {a.json()["sortedserve"]["replica"] for a in answers}
    assert victim["replica"] not in served
    assert all(a.json()["usage"]["completion_tokens"] == LONG for a in answers)


def test_sigterm_stops_the_application_and_the_cluster(cluster: RayServerProcess) -> None:
    """Last in this module: the SIGTERM stop of the fixture's own server."""
    assert cluster.proc is not None
    ray_tmp = cluster.env["RAY_TMPDIR"]
    t0 = time.monotonic()
    assert cluster.stop() == 0, cluster.tail()
    print(f"stopped in {time.monotonic() - t0:.1f} s")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and processes_mentioning(ray_tmp):
        time.sleep(1)
    assert not processes_mentioning(ray_tmp), "Ray processes outlived serve-ray"


def processes_mentioning(text: str) -> list[int]:
    """Live processes whose command line mentions ``text`` (this cluster's own temp dir)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().split()[2]
        except OSError:
            continue
        if text in cmdline and state != "Z":
            pids.append(int(entry.name))
    return pids
