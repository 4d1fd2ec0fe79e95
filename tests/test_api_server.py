"""Black-box tests of the native API: a real ``python -m app serve`` on a tiny checkpoint.

One server for the module (2 slots, a queue of 2), so that the whole file runs in seconds.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from app.api.launcher import ServerProcess
from tests.reliability_support import sse_events

pytestmark = pytest.mark.integration

PROMPT = "Once upon a time there was"
SPEC_METRICS = {
    "sortedserve_requests_total",
    "sortedserve_request_duration_seconds",
    "sortedserve_time_to_first_token_seconds",
    "sortedserve_inter_token_latency_seconds",
    "sortedserve_queue_duration_seconds",
    "sortedserve_decode_step_seconds",
    "sortedserve_generated_tokens_total",
    "sortedserve_prompt_tokens_total",
    "sortedserve_budget_requests_total",
    "sortedserve_budget_overrun_seconds",
    "sortedserve_depth_downgrades_total",
    "sortedserve_prediction_error_ratio",
    "sortedserve_batch_size",
    "sortedserve_requests_running",
    "sortedserve_requests_waiting",
}


@pytest.fixture(scope="module")
def server(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    env = {
        "SORTEDSERVE_PROFILE_CACHE_DIR": str(tmp_path_factory.getbasetemp() / "profile-cache"),
        "SORTEDSERVE_MAX_BATCH_SIZE": "2",
        "SORTEDSERVE_MAX_QUEUE": "2",
        "SORTEDSERVE_PROFILE_BATCH_SIZES": "[1,2]",
        "SORTEDSERVE_TORCH_THREADS": "1",
        "SORTEDSERVE_DEVICE": "cpu",
        "SORTEDSERVE_MAX_PROMPT_CHARS": "2000",
        "SORTEDSERVE_MAX_NEW_TOKENS_LIMIT": "250",
        "SORTEDSERVE_MAX_BODY_BYTES": "65536",
        "SORTEDSERVE_API_KEY": "",
    }
    log = tmp_path_factory.mktemp("api-server") / "server.log"
    with ServerProcess(tiny_checkpoint, log, env, args=["--no-access-log"]) as proc:
        yield proc.url
        assert proc.alive(), f"the server died during the tests:\n{proc.tail()}"


@pytest.fixture(scope="module")
def client(server: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server, timeout=30) as c:
        yield c


def generate(client: httpx.Client, **body: Any) -> dict[str, Any]:
    r = client.post("/v1/generate", json={"prompt": PROMPT, "max_new_tokens": 8, **body})
    assert r.status_code == 200, r.text
    return r.json()


def metric_samples(client: httpx.Client) -> dict[tuple[str, frozenset], float]:
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def metric(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


# -- operations ----------------------------------------------------------------------------------


def test_health_ready_info(client: httpx.Client) -> None:
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/ready").status_code == 200
    info = client.get("/info").json()
    assert info["num_layers"] == 4 and info["exits"] == [1, 2, 3, 4]
    assert info["model_type"] == "llama" and info["quality"]["metric"] == "loss"
    assert info["weights"] == "float32" and info["weight_kernel"]  # chosen at start-up
    profile = info["latency_profile"]
    assert [p["exit_layer"] for p in profile["exits"]] == [1, 2, 3, 4]
    for point in profile["exits"]:
        assert point["prefill_ms_per_token"] > 0
        assert set(point["decode_ms_by_batch"]) == {"1", "2"}
    assert info["limits"]["max_batch_size"] == 2 and info["limits"]["max_queue"] == 2
    assert info["limits"]["max_new_tokens"] == 250 and info["limits"]["max_seq_len"] == 256


# -- POST /v1/generate (JSON) --------------------------------------------------------------------


def test_generate_json_response(client: httpx.Client) -> None:
    body = generate(client)
    assert body["id"].startswith("gen-")
    assert isinstance(body["text"], str)
    assert body["finish_reason"] in ("length", "eos")
    assert body["exit_layer"] == 4 and body["num_layers"] == 4  # no budget: deepest exit
    assert body["usage"]["prompt_tokens"] > 0 and 1 <= body["usage"]["completion_tokens"] <= 8
    budget = body["budget"]
    assert budget["budget_ms"] is None and budget["met"] is None
    assert budget["initial_exit_layer"] == 4 and budget["downgrades"] == []
    assert budget["predicted_ms"] > 0 and budget["elapsed_ms"] == body["timings"]["total_ms"]
    t = body["timings"]
    assert 0 <= t["queue_ms"] <= t["ttft_ms"] <= t["total_ms"]
    assert generate(client)["text"] == body["text"]  # greedy is deterministic


def test_exit_layer_is_honoured(client: httpx.Client) -> None:
    body = generate(client, exit_layer=2.0, max_new_tokens=3.0)  # JSON's 2.0 is an integer too
    assert body["exit_layer"] == 2 and body["budget"]["initial_exit_layer"] == 2
    assert body["usage"]["completion_tokens"] <= 3


def test_budget_chooses_the_exit(client: httpx.Client) -> None:
    roomy = generate(client, budget_ms=60_000)
    assert roomy["exit_layer"] == 4 and roomy["budget"]["met"] is True
    assert roomy["budget"]["feasible"] is True and roomy["budget"]["budget_ms"] == 60_000
    hopeless = generate(client, budget_ms=0.001)
    assert hopeless["exit_layer"] == 1 and hopeless["budget"]["initial_exit_layer"] == 1
    assert hopeless["budget"]["feasible"] is False and hopeless["budget"]["met"] is False
    assert hopeless["budget"]["predicted_ms"] > 0.001


def test_seeded_sampling_is_reproducible(client: httpx.Client) -> None:
    a = generate(client, temperature=1.0, top_p=0.9, top_k=50, seed=7, max_new_tokens=12)
    b = generate(client, temperature=1.0, top_p=0.9, top_k=50, seed=7, max_new_tokens=12)
    assert a["text"] == b["text"]


# -- SSE -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["stream_field", "accept_header"])
def test_generate_streams_tokens_then_done(client: httpx.Client, how: str) -> None:
    body: dict[str, Any] = {"prompt": PROMPT, "max_new_tokens": 10, "exit_layer": 3}
    headers = {}
    if how == "stream_field":
        body["stream"] = True
    else:
        headers["Accept"] = "text/event-stream"
    with client.stream("POST", "/v1/generate", json=body, headers=headers) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = list(sse_events(r.iter_lines()))
    names = [name for name, _ in events]
    assert names[-1] == "done" and set(names[:-1]) == {"token"}
    tokens = [json.loads(data) for _, data in events[:-1]]
    done = json.loads(events[-1][1])
    assert [t["index"] for t in tokens] == list(range(len(tokens)))
    assert all(set(t) == {"index", "text", "token_id", "exit_layer"} for t in tokens)
    assert all(t["exit_layer"] == 3 for t in tokens)
    assert len(tokens) == done["usage"]["completion_tokens"]
    assert "".join(t["text"] for t in tokens) == done["text"]
    assert done["exit_layer"] == 3 and done["id"].startswith("gen-")
    assert set(done) >= {"finish_reason", "usage", "budget", "timings", "num_layers"}


def test_stream_validation_errors_are_plain_json(client: httpx.Client) -> None:
    r = client.post("/v1/generate", json={"prompt": "", "stream": True})
    assert r.status_code == 422 and r.headers["content-type"].startswith("application/json")


def test_disconnect_mid_stream_cancels_the_request(server: str, client: httpx.Client) -> None:
    steps_before = metric(metric_samples(client), "sortedserve_batch_size_count")
    body = {"prompt": PROMPT, "max_new_tokens": 240, "exit_layer": 4, "stream": True}
    with httpx.Client(base_url=server, timeout=30) as own:  # its own connection, closed below
        with own.stream("POST", "/v1/generate", json=body) as r:
            seen = 0
            for name, _ in sse_events(r.iter_lines()):
                seen += name == "token"
                if seen == 3:
                    break
        assert seen == 3
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        samples = metric_samples(client)
        inflight = client.get("/info").json()["load"]["inflight"]
        if metric(samples, "sortedserve_requests_running") == 0 and inflight == 0:
            break
        time.sleep(0.02)
    assert metric(samples, "sortedserve_requests_running") == 0
    assert metric(samples, "sortedserve_requests_waiting") == 0 and inflight == 0
    # the request left the batch early: far fewer decode steps than its 240 tokens
    steps = metric(samples, "sortedserve_batch_size_count") - steps_before
    assert 2 <= steps < 120, steps
    assert generate(client)["usage"]["completion_tokens"] >= 1  # still serving


def test_full_queue_answers_429_with_retry_after(server: str) -> None:
    # capacity = 2 slots + a queue of 2: of 8 simultaneous long requests, some must be refused
    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server, timeout=60) as c:
            body = {"prompt": PROMPT, "max_new_tokens": 240, "exit_layer": 4}
            return await asyncio.gather(*(c.post("/v1/generate", json=body) for _ in range(8)))

    responses = asyncio.run(burst())
    codes = sorted(r.status_code for r in responses)
    assert set(codes) == {200, 429} and codes.count(200) >= 4, codes
    refused = [r for r in responses if r.status_code == 429]
    for r in refused:
        assert r.json()["error_type"] == "overloaded"
        assert int(r.headers["retry-after"]) >= 1


# -- bad input: 422 naming the field -------------------------------------------------------------

LONG = "x" * 2001

BAD_BODIES = [
    ({}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": LONG}, "prompt"),
    ({"prompt": PROMPT, "budget_ms": 0}, "budget_ms"),
    ({"prompt": PROMPT, "budget_ms": -5}, "budget_ms"),
    ({"prompt": PROMPT, "budget_ms": "fast"}, "budget_ms"),
    ({"prompt": PROMPT, "max_new_tokens": 0}, "max_new_tokens"),
    ({"prompt": PROMPT, "max_new_tokens": 2.5}, "max_new_tokens"),
    ({"prompt": PROMPT, "max_new_tokens": "3"}, "max_new_tokens"),
    ({"prompt": PROMPT, "max_new_tokens": True}, "max_new_tokens"),
    ({"prompt": PROMPT, "max_new_tokens": 251}, "max_new_tokens"),
    ({"prompt": "word " * 20, "max_new_tokens": 250}, "max_new_tokens"),  # past the context
    ({"prompt": PROMPT, "temperature": -0.1}, "temperature"),
    ({"prompt": PROMPT, "temperature": "hot"}, "temperature"),
    ({"prompt": PROMPT, "top_p": 0}, "top_p"),
    ({"prompt": PROMPT, "top_p": 1.5}, "top_p"),
    ({"prompt": PROMPT, "top_k": -1}, "top_k"),
    ({"prompt": PROMPT, "top_k": 2.5}, "top_k"),
    ({"prompt": PROMPT, "seed": -1}, "seed"),
    ({"prompt": PROMPT, "seed": 2**64}, "seed"),
    ({"prompt": PROMPT, "seed": "abc"}, "seed"),
    ({"prompt": PROMPT, "stop": "x"}, "stop"),
    ({"prompt": PROMPT, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"prompt": PROMPT, "stop": [""]}, "stop"),
    ({"prompt": PROMPT, "stop": [1]}, "stop"),
    ({"prompt": PROMPT, "exit_layer": 0}, "exit_layer"),
    ({"prompt": PROMPT, "exit_layer": 7}, "exit_layer"),
    ({"prompt": PROMPT, "exit_layer": 2, "budget_ms": 100}, "exit_layer"),
    ({"prompt": PROMPT, "stream": "yes"}, "stream"),
    ({"prompt": PROMPT, "budget": 100}, "budget"),  # a typo is refused, not ignored
]


@pytest.mark.parametrize(
    ("body", "field"), BAD_BODIES, ids=[f"{f}-{i}" for i, (_, f) in enumerate(BAD_BODIES)]
)
def test_bad_field_gets_422_naming_it(client: httpx.Client, body: dict, field: str) -> None:
    r = client.post("/v1/generate", json=body)
    assert r.status_code == 422, r.text
    err = r.json()
    assert set(err) == {"error", "error_type"} and err["error_type"] == "validation"
    assert field in err["error"], err


@pytest.mark.parametrize(
    ("content", "content_type"),
    [
        (b'{"prompt": "hi"', "application/json"),
        (b"[1, 2]", "application/json"),
        (b'{"prompt": "\xff\xfe"}', "application/json"),
        (b"prompt=hi", "application/x-www-form-urlencoded"),
        (b"", "application/json"),
        (b"[" * 60_000, "application/json"),
    ],
    ids=["truncated", "array", "not-utf8", "form", "empty", "deeply-nested"],
)
def test_bad_body_gets_422(client: httpx.Client, content: bytes, content_type: str) -> None:
    r = client.post("/v1/generate", content=content, headers={"Content-Type": content_type})
    assert r.status_code == 422, r.text
    err = r.json()
    assert err["error_type"] == "validation" and err["error"]


def test_framework_errors_have_the_error_shape(client: httpx.Client) -> None:
    r = client.get("/nope")
    assert r.status_code == 404 and r.json()["error_type"] == "not_found"
    assert "/nope" in r.json()["error"]
    r = client.get("/v1/generate")
    assert r.status_code == 405 and r.json()["error_type"] == "not_found"
    r = client.post("/v1/generate", content=b"x" * 70_000, headers={"Content-Type": "text/plain"})
    assert r.status_code == 413 and r.json()["error_type"] == "validation"
    assert "65536" in r.json()["error"]


# -- metrics -------------------------------------------------------------------------------------


def test_metrics_after_traffic(client: httpx.Client) -> None:
    generate(client, exit_layer=2)
    generate(client, budget_ms=60_000)
    generate(client, budget_ms=0.001)
    samples = metric_samples(client)
    names = {name for name, _ in samples}
    for name in SPEC_METRICS:
        assert name in names or f"{name}_count" in names or f"{name}_bucket" in names, name
    ok = metric(samples, "sortedserve_requests_total", route="/v1/generate", status="200")
    assert ok >= 3
    assert metric(samples, "sortedserve_requests_total", route="/v1/generate", status="422") >= 1
    assert metric(samples, "sortedserve_generated_tokens_total", exit_layer="2") >= 1
    assert metric(samples, "sortedserve_generated_tokens_total", exit_layer="4") >= 1
    assert metric(samples, "sortedserve_budget_requests_total", outcome="met") >= 1
    assert metric(samples, "sortedserve_budget_requests_total", outcome="missed") >= 1
    assert metric(samples, "sortedserve_budget_requests_total", outcome="none") >= 1
    assert metric(samples, "sortedserve_budget_overrun_seconds_count") >= 1
    assert metric(samples, "sortedserve_request_duration_seconds_count", exit_layer="2") >= 1
    assert metric(samples, "sortedserve_time_to_first_token_seconds_count", exit_layer="2") >= 1
    assert metric(samples, "sortedserve_inter_token_latency_seconds_count", exit_layer="2") >= 1
    assert metric(samples, "sortedserve_decode_step_seconds_count", exit_layer="2") >= 1
    assert metric(samples, "sortedserve_queue_duration_seconds_count") >= 3
    assert metric(samples, "sortedserve_prediction_error_ratio_count") >= 3
    assert metric(samples, "sortedserve_batch_size_count") >= 1
    assert metric(samples, "sortedserve_prompt_tokens_total") > 0
