"""In-process tests of the app around a scripted fake engine: the paths a healthy real engine never
takes (loading, load failure, engine errors inside a stream, draining) and the profile cache."""

from __future__ import annotations

import asyncio
import inspect
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.api.main import create_app
from app.engine import EngineClosedError
from app.engine.types import (
    EngineProtocol,
    EngineStats,
    FinalEvent,
    GenerationRequest,
    ModelInfo,
    ProfilePoint,
    RowState,
    StepReport,
    TokenEvent,
)
from app.settings import Settings

EXITS = (2, 4)


class FakeEngine:
    """Echoes the prompt's words as tokens; a prompt of "fail" or "raise" makes it misbehave."""

    def __init__(self, step_hook: Any, gate: threading.Event | None = None) -> None:
        self.step_hook = step_hook
        self.gate = gate
        self.profiled = 0
        self.profile_args: tuple[int, float] | None = None
        self.cancelled: list[str] = []
        self.info = ModelInfo(
            model_id="fake",
            model_type="llama",
            num_layers=4,
            exits=EXITS,
            max_seq_len=512,
            vocab_size=100,
            eos_token_ids=(0,),
            device="cpu",
            dtype="float32",
            soft_tuned=True,
            quality={"2": 3.0, "4": 2.5},
            metric="loss",
        )
        self._words: dict[int, str] = {}

    def encode(self, text: str) -> list[int]:
        ids = []
        for word in text.split():
            token = 1 + hash(word) % 99
            self._words[token] = word
            ids.append(token)
        return ids

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        return self.encode(" ".join(m["content"] for m in messages))

    def measure_profile(
        self, batch_sizes: list[int], *, depths: int = 0, max_seconds: float = 0, **_: Any
    ) -> list[ProfilePoint]:
        self.profile_args = (depths, max_seconds)
        if self.gate is not None:
            self.gate.wait(10)
        self.profiled += 1
        return [ProfilePoint(k, 0.01 * k, {b: 0.5 * k * b for b in batch_sizes}) for k in EXITS]

    def stats(self) -> EngineStats:
        return EngineStats(running=0, waiting=0, free_slots=2, max_slots=2)

    def start(self) -> None:
        pass

    def shutdown(self, timeout_s: float = 0) -> None:
        pass

    def cancel(self, request_id: str) -> None:
        self.cancelled.append(request_id)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Any]:
        words = [self._words.get(t, "?") for t in request.prompt_ids]
        if words == ["closed"]:
            raise EngineClosedError("the engine is shutting down")
        if words == ["raise"]:
            yield TokenEvent(0, "a", 1, request.exit_layer)
            raise RuntimeError("the fake engine broke")
        n = min(request.sampling.max_new_tokens, 3)
        for i in range(n):
            await asyncio.sleep(0)
            row = RowState(request.request_id, request.exit_layer, i + 1, n, 1, 0.0)
            report = StepReport(
                now=time.perf_counter(),
                step_seconds=0.001,
                exits=(request.exit_layer,),
                rows=(row,) if i + 1 < n else (),
                finished=(row,) if i + 1 == n else (),
                waiting=0,
            )
            self.step_hook(report)
            yield TokenEvent(i, f"{words[i % len(words)]} ", 7, request.exit_layer)
        reason = "error" if words == ["fail"] else "length"
        yield FinalEvent(
            request_id=request.request_id,
            text="".join(f"{words[i % len(words)]} " for i in range(n)),
            finish_reason=reason,
            exit_layer=request.exit_layer,
            initial_exit_layer=request.exit_layer,
            downgrades=(),
            prompt_tokens=len(request.prompt_ids),
            completion_tokens=n,
            queue_ms=0.1,
            ttft_ms=0.5,
            total_ms=1.0,
            ms_per_token=0.25,
            error="scripted failure" if reason == "error" else None,
        )


def test_the_api_layer_imports_no_torch() -> None:
    # A fresh interpreter sees the API's own imports (the engine's types and config included).
    code = "import sys, app.api.main, app.scheduler; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_the_real_and_the_fake_engine_satisfy_the_engine_protocol(tiny_checkpoint: Path) -> None:
    from app.engine import Engine, EngineConfig

    real = Engine.from_pretrained(tiny_checkpoint, EngineConfig(max_slots=1, max_seq_len=32))
    methods = [
        name
        for name in dir(EngineProtocol)
        if not name.startswith("_") and callable(getattr(EngineProtocol, name))
    ]
    assert set(methods) >= {"encode", "generate", "cancel", "stats", "shutdown", "start"}
    for engine in (real, FakeEngine(step_hook=None)):
        assert isinstance(engine, EngineProtocol)
        for name in methods:
            wanted = inspect.signature(getattr(EngineProtocol, name)).parameters
            have = inspect.signature(getattr(engine, name)).parameters
            assert list(wanted)[1 : len(have) + 1] == list(have)[: len(wanted) - 1], name
    real.shutdown(0)


def make_settings(tmp_path: Path, **overrides: Any) -> Settings:
    return Settings(model=tmp_path, profile_cache_dir=tmp_path / "cache", **overrides)


def wait_ready(client: TestClient) -> None:
    deadline = time.monotonic() + 10
    while client.get("/ready").status_code != 200:
        assert time.monotonic() < deadline, client.get("/ready").json()
        time.sleep(0.01)


@pytest.fixture
def engines() -> list[FakeEngine]:
    return []


@pytest.fixture
def client(tmp_path: Path, engines: list[FakeEngine]) -> Iterator[TestClient]:
    def loader(settings: Settings, hook: Any) -> FakeEngine:
        engines.append(FakeEngine(hook))
        return engines[-1]

    app = create_app(make_settings(tmp_path), loader)
    with TestClient(app, raise_server_exceptions=False) as c:  # a 500 is an answer here
        wait_ready(c)
        yield c


def test_generate_through_the_fake_engine(client: TestClient) -> None:
    r = client.post("/v1/generate", json={"prompt": "hello world", "max_new_tokens": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["text"] == "hello world hello " and body["exit_layer"] == 4
    assert client.get("/info").json()["quality"]["by_exit"] == {"2": 3.0, "4": 2.5}


def test_engine_failure_is_a_500_in_json(client: TestClient) -> None:
    r = client.post("/v1/generate", json={"prompt": "fail"})
    assert r.status_code == 500
    assert r.json() == {"error": "generation failed: scripted failure", "error_type": "internal"}
    r = client.post("/v1/generate", json={"prompt": "raise"})  # an exception, not a final event
    assert r.status_code == 500 and r.json()["error_type"] == "internal"
    assert client.get("/info").json()["load"]["inflight"] == 0


@pytest.mark.parametrize("prompt", ["fail", "raise"])
def test_failure_inside_a_stream_is_an_error_event(client: TestClient, prompt: str) -> None:
    r = client.post("/v1/generate", json={"prompt": prompt, "stream": True})
    assert r.status_code == 200
    blocks = [b for b in r.text.replace("\r\n", "\n").split("\n\n") if b.strip()]
    assert blocks[-1].startswith("event: error\ndata: ")
    assert '"error_type": "internal"' in blocks[-1]
    assert client.get("/info").json()["load"]["inflight"] == 0


def test_a_closed_engine_answers_503(client: TestClient) -> None:
    r = client.post("/v1/generate", json={"prompt": "closed"})
    assert r.status_code == 503 and r.json()["error_type"] == "unavailable"
    r = client.post("/v1/generate", json={"prompt": "closed", "stream": True})
    assert '"error_type": "unavailable"' in r.text.split("event: error")[-1]
    assert client.get("/info").json()["load"]["inflight"] == 0


def test_failure_inside_an_openai_stream_then_done(client: TestClient) -> None:
    body = {"model": "x", "prompt": "raise", "stream": True}
    r = client.post("/v1/completions", json=body)
    lines = [x for x in r.text.splitlines() if x.startswith("data: ")]
    assert '"error_type": "internal"' in lines[-2] and lines[-1] == "data: [DONE]"


def test_loading_then_ready(tmp_path: Path) -> None:
    gate = threading.Event()

    def loader(settings: Settings, hook: Any) -> FakeEngine:
        return FakeEngine(hook, gate)

    with TestClient(create_app(make_settings(tmp_path), loader)) as c:
        assert c.get("/health").status_code == 200
        r = c.get("/ready")
        assert r.status_code == 503 and r.json()["error_type"] == "unavailable"
        r = c.post("/v1/generate", json={"prompt": "hi"})
        assert r.status_code == 503 and r.headers["retry-after"] == "5"
        assert "loading" in r.json()["error"]
        gate.set()
        wait_ready(c)
        assert c.post("/v1/generate", json={"prompt": "hi"}).status_code == 200


def test_load_failure_is_reported_once_and_clearly(tmp_path: Path) -> None:
    fatal: list[str] = []

    def loader(settings: Settings, hook: Any) -> FakeEngine:
        raise ValueError("model.safetensors is corrupt\nwith a second line")

    app = create_app(make_settings(tmp_path), loader)
    app.state.core.on_fatal = fatal.append
    with TestClient(app) as c:
        deadline = time.monotonic() + 5
        while not fatal and time.monotonic() < deadline:
            time.sleep(0.01)
        assert fatal == ["model.safetensors is corrupt"]
        r = c.get("/ready")
        assert r.status_code == 503 and "corrupt" in r.json()["error"]


def test_draining_refuses_new_work(client: TestClient) -> None:
    client.app.state.core.draining = True  # type: ignore[attr-defined]
    assert client.get("/ready").status_code == 503
    r = client.post("/v1/generate", json={"prompt": "hi"})
    assert r.status_code == 503 and r.json()["error_type"] == "unavailable"
    assert client.get("/health").status_code == 200


def test_profile_is_cached_between_starts(tmp_path: Path, engines: list[FakeEngine]) -> None:
    def loader(settings: Settings, hook: Any) -> FakeEngine:
        engines.append(FakeEngine(hook))
        return engines[-1]

    sources = []
    for _ in range(2):
        with TestClient(create_app(make_settings(tmp_path), loader)) as c:
            wait_ready(c)
            sources.append(c.get("/info").json()["latency_profile"]["source"])
    assert sources == ["measured", "cache"]
    assert [e.profiled for e in engines] == [1, 0]
    assert engines[0].profile_args == (3, 15.0)  # the settings' defaults reach the engine
    with TestClient(create_app(make_settings(tmp_path, reprofile=True), loader)) as c:
        wait_ready(c)
        assert c.get("/info").json()["latency_profile"]["source"] == "measured"


def test_step_hook_feeds_metrics_and_scheduler(client: TestClient) -> None:
    client.post("/v1/generate", json={"prompt": "a b c", "max_new_tokens": 3, "exit_layer": 2})
    text = client.get("/metrics").text
    assert 'sortedserve_decode_step_seconds_count{exit_layer="2"} 3.0' in text
    assert client.get("/info").json()["latency_profile"]["steps_seen"] == 3


def test_serve_flags_win_over_environment_over_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    from app.api import serve_cli

    monkeypatch.setenv("SORTEDSERVE_PORT", "9001")
    monkeypatch.setenv("SORTEDSERVE_MAX_QUEUE", "5")
    parser = argparse.ArgumentParser()
    serve_cli.add_arguments(parser)
    settings = serve_cli.settings_from_args(parser.parse_args(["--port", "9002", "--threads", "1"]))
    assert settings.port == 9002 and settings.torch_threads == 1  # flags
    assert settings.max_queue == 5  # environment
    assert settings.host == "0.0.0.0" and settings.max_batch_size == 16  # defaults
