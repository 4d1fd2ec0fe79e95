"""Graceful shutdown of a real ``python -m app serve``: SIGTERM while streams are in flight.

- With a drain timeout longer than the streams: ``/ready`` turns 503 at once, new requests get 503
  in the error shape (``/health`` stays 200), every stream in flight runs to its ``done`` event
  (native) or ``[DONE]`` (OpenAI), a non-streaming request in flight gets its whole answer, and
  then the process exits 0.
- With a drain timeout shorter than the streams: soon after the timeout the streams end, cut
  short but cleanly (a final event with ``finish_reason`` ``cancelled``, ``abort`` on the OpenAI
  route, never a broken connection; a non-streaming request gets a 200 saying ``cancelled``), and
  the process still exits 0 promptly.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.api.launcher import ServerProcess
from tests.reliability_support import (
    PROMPT,
    assert_error_shape,
    poll,
    record_figures,
    server_env,
    sse_events,
)
from tests.tiny_checkpoint import make_tiny_checkpoint

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CONTEXT = 1024  # room for streams that last a few seconds on the tiny model


@pytest.fixture(scope="module")
def long_context_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-long") / "llama"
    return make_tiny_checkpoint(folder, max_position_embeddings=CONTEXT, exits=[1, 2, 3, 4])


@dataclass
class Stream:
    """One streaming request read in a thread: what arrived, and when it ended."""

    route: str
    max_tokens: int
    tokens: int = 0
    final: dict[str, Any] | None = None  # the native done event, or the last OpenAI chunk
    got_done_marker: bool = False  # OpenAI's ``data: [DONE]``
    error: dict[str, Any] | None = None
    failure: str | None = None  # how the connection broke, if it did
    ended_at: float | None = None
    first_token: threading.Event = field(default_factory=threading.Event)

    def run(self, url: str) -> None:
        try:
            with httpx.Client(base_url=url, timeout=60) as client:
                if self.route == "generate":
                    self._native(client)
                elif self.route == "json":
                    self._json(client)
                else:
                    self._chat(client)
        except httpx.HTTPError as exc:
            self.failure = f"{type(exc).__name__}: {exc}"
        finally:
            self.ended_at = time.monotonic()
            self.first_token.set()  # never leave the test waiting

    def _native(self, client: httpx.Client) -> None:
        body = {"prompt": PROMPT, "max_new_tokens": self.max_tokens, "ignore_eos": True}
        with client.stream("POST", "/v1/generate", json={**body, "stream": True}) as r:
            assert r.status_code == 200, r.read()
            for event, data in sse_events(r.iter_lines()):
                if event == "token":
                    self.tokens += 1
                    self.first_token.set()
                elif event == "done":
                    self.final = json.loads(data)
                elif event == "error":
                    self.error = json.loads(data)

    def _json(self, client: httpx.Client) -> None:
        """A non-streaming request (start_streams waits until the engine runs it)."""
        body = {"prompt": PROMPT, "max_new_tokens": self.max_tokens, "ignore_eos": True}
        self.first_token.set()
        r = client.post("/v1/generate", json=body)
        if r.status_code != 200:
            self.error = r.json()
            return
        self.final = r.json()
        self.tokens = self.final["usage"]["completion_tokens"]

    def _chat(self, client: httpx.Client) -> None:
        body = {
            "model": "m",
            "messages": [{"role": "user", "content": PROMPT}],
            "max_tokens": self.max_tokens,
            "ignore_eos": True,
            "stream": True,
        }
        with client.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200, r.read()
            for _, data in sse_events(r.iter_lines()):
                if data == "[DONE]":
                    self.got_done_marker = True
                    continue
                chunk = json.loads(data)
                if "error_type" in chunk:
                    self.error = chunk
                elif chunk["choices"] and chunk["choices"][0].get("finish_reason"):
                    self.final = chunk
                elif chunk["choices"]:
                    self.tokens += 1
                    self.first_token.set()


def how_it_ended(s: Stream) -> str:
    if s.failure:
        return s.failure
    if s.error:
        return f"error event: {s.error}"
    if s.final is None:
        return "closed without a final event"
    reason = s.final.get("finish_reason") or s.final["choices"][0]["finish_reason"]
    return f"{s.route}: final event, finish_reason {reason}"


def start_streams(url: str, streams: list[Stream]) -> list[threading.Thread]:
    threads = [threading.Thread(target=s.run, args=(url,), daemon=True) for s in streams]
    for t in threads:
        t.start()
    for s in streams:
        assert s.first_token.wait(60), "a stream never started"
    with httpx.Client(base_url=url, timeout=10) as client:
        running, _ = poll(lambda: client.get("/info").json()["load"]["running"] == len(streams), 60)
    assert running, "not every request reached the engine"
    for s in streams:
        assert s.failure is None and s.ended_at is None, s
    return threads


def server(checkpoint: Path, tmp: pytest.TempPathFactory, name: str, drain_s: float) -> Any:
    env = server_env(
        tmp.getbasetemp() / "profile-cache",
        max_batch_size=4,
        profile_batch_sizes="[1,2,4]",
        drain_timeout_s=drain_s,
    )
    return ServerProcess(checkpoint, tmp.mktemp(name) / "server.log", env, ["--no-access-log"])


@pytest.fixture
def draining_server(
    long_context_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    with server(long_context_checkpoint, tmp_path_factory, "drain-server", 60) as proc:
        yield proc


@pytest.fixture
def impatient_server(
    long_context_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    with server(long_context_checkpoint, tmp_path_factory, "impatient-server", 1.0) as proc:
        yield proc


def test_sigterm_drains_streams_then_exits_0(draining_server: ServerProcess) -> None:
    proc = draining_server.proc
    assert proc is not None
    streams = [
        Stream("generate", 600),
        Stream("generate", 500),
        Stream("chat", 400),
        Stream("json", 500),
    ]
    threads = start_streams(draining_server.url, streams)

    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    with httpx.Client(base_url=draining_server.url, timeout=30) as client:
        ready, ready_after_s = poll(lambda: client.get("/ready").status_code == 503, 10, 0.01)
        assert ready, "/ready did not turn 503 after SIGTERM"
        assert_error_shape(client.get("/ready"), 503)
        health = client.get("/health").status_code
        refused_generate = client.post("/v1/generate", json={"prompt": PROMPT})
        refused_chat = client.post(
            "/v1/chat/completions",
            json={"model": "m", "messages": [{"role": "user", "content": "hi"}]},
        )
        checked = time.monotonic()
    in_flight_at_checks = sum(s.ended_at is None for s in streams)

    for t in threads:
        t.join(120)
    exit_code = proc.wait(60)
    exited = time.monotonic()
    last_stream_end = max(s.ended_at or exited for s in streams)
    record_figures(
        "graceful_drain",
        {
            "drain_timeout_s": 60,
            "streams": len(streams),
            "streams_in_flight_during_checks": in_flight_at_checks,
            "ready_503_after_s": round(ready_after_s, 3),
            "new_request_status_while_draining": refused_generate.status_code,
            "streams_completed": sum(s.final is not None and s.error is None for s in streams),
            "tokens_per_stream": [s.tokens for s in streams],
            "last_stream_end_after_sigterm_s": round(last_stream_end - sent, 2),
            "exit_after_last_stream_s": round(exited - last_stream_end, 2),
            "exit_code": exit_code,
        },
    )

    assert in_flight_at_checks == len(streams), "streams ended before the checks: make them longer"
    assert health == 200
    for refused in (refused_generate, refused_chat):
        assert assert_error_shape(refused, 503)["error_type"] == "unavailable"
    for s in streams:
        assert s.failure is None and s.error is None, s
        assert s.final is not None, s
        assert s.ended_at is not None and s.ended_at > checked
    for s in (streams[0], streams[1], streams[3]):  # native stream, and JSON: all tokens
        assert s.final["finish_reason"] == "length"  # type: ignore[index]
        assert s.tokens == s.final["usage"]["completion_tokens"] == s.max_tokens  # type: ignore[index]
    assert streams[2].final["choices"][0]["finish_reason"] == "length"  # type: ignore[index]
    assert streams[2].got_done_marker
    assert exit_code == 0, draining_server.tail()
    assert exited - last_stream_end < 10, "the server lingered after its last stream"


def test_drain_timeout_ends_long_streams_and_still_exits_0(
    impatient_server: ServerProcess,
) -> None:
    proc = impatient_server.proc
    assert proc is not None
    streams = [Stream("generate", 1000), Stream("chat", 900), Stream("json", 1000)]
    threads = start_streams(impatient_server.url, streams)

    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    exit_code = proc.wait(60)
    exited = time.monotonic()
    for t in threads:
        t.join(30)
    record_figures(
        "drain_timeout",
        {
            "drain_timeout_s": 1.0,
            "streams": len(streams),
            "exit_after_sigterm_s": round(exited - sent, 2),
            "exit_code": exit_code,
            "stream_ends_after_sigterm_s": [
                None if s.ended_at is None else round(s.ended_at - sent, 2) for s in streams
            ],
            "tokens_per_stream": [s.tokens for s in streams],
            "max_tokens_per_stream": [s.max_tokens for s in streams],
            "how_streams_ended": [how_it_ended(s) for s in streams],
        },
    )

    assert exit_code == 0, impatient_server.tail()
    assert exited - sent < 1.0 + 10, "the server did not stop promptly after its drain timeout"
    for s in streams:
        assert s.ended_at is not None, "a stream outlived the server"
        assert s.tokens < s.max_tokens, "the stream was not cut: make it longer"
        # cut short, but cleanly: the final event says so, rather than a broken connection
        assert s.failure is None and s.error is None, s
        assert s.final is not None, s
    native, chat, whole = streams
    assert native.final["finish_reason"] == "cancelled"  # type: ignore[index]
    assert native.final["usage"]["completion_tokens"] == native.tokens  # type: ignore[index]
    assert chat.final["choices"][0]["finish_reason"] == "abort"  # type: ignore[index]
    assert chat.got_done_marker
    assert whole.final["finish_reason"] == "cancelled"  # type: ignore[index]
