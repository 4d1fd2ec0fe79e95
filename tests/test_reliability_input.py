"""Bad input against one real ``python -m app serve`` that requires an API key.

- Fuzzing: schemathesis generates requests from the server's own OpenAPI document (every route,
  valid and invalid data) and sends them. No answer may be a 5xx; every status must be documented,
  every error must have the SPEC §3 shape with the status that matches its kind, invalid data must
  be refused (a bad request never reaches the engine) and no error may travel inside a stream.
  The number of cases is bounded and generation derandomized: a run is reproducible.
- Input limits the schema cannot express: prompts at and past the context length (in tokens),
  ``max_new_tokens`` that would overflow it, bodies that are not UTF-8 or not JSON, nested too
  deep, or over the body limit (declared or chunked), on every POST route. Each is a clear 4xx in
  the error shape; afterwards the server serves normally and holds nothing.
- The API key: every route of the app but the operations routes and the API docs (read from its
  route table, so a new route cannot slip through) refuses a missing or wrong key with 401 before
  looking at the body; those stay open; the comparison is ``hmac.compare_digest``.

tests/test_api_server.py and tests/test_openai_compat.py cover the per-field 422s and the key on
the four known routes; this file adds what they do not.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from schemathesis import BaseSchema, Case, GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)
from starlette.types import Receive, Scope, Send
from transformers import AutoTokenizer

from app.api import auth
from app.api.launcher import ServerProcess
from app.api.main import create_app
from app.settings import Settings
from tests.reliability_support import (
    ERROR_KINDS,
    PROMPT,
    assert_error_shape,
    is_idle,
    load_gauges,
    poll,
    record_figures,
    server_env,
)

pytestmark = pytest.mark.integration

KEY = "reliability-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_EXAMPLES = 60  # per route and generation mode (Hypothesis stops earlier on small schemas)
MAX_NEW_TOKENS_LIMIT = 8  # keeps every generated request short
MAX_BODY_BYTES = 65536
CONTEXT = 256  # the tiny checkpoint's max_position_embeddings

# (route, status) → answers, and error kinds, across the fuzz run (written to the figures)
STATUSES: Counter[tuple[str, int]] = Counter()
KINDS: Counter[str] = Counter()
LIMIT_ANSWERS: Counter[str] = Counter()


@pytest.fixture(scope="module")
def server(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    env = server_env(
        tmp_path_factory.getbasetemp() / "profile-cache",
        api_key=KEY,
        max_queue=64,
        max_new_tokens_limit=MAX_NEW_TOKENS_LIMIT,
        max_prompt_chars=4000,
        max_body_bytes=MAX_BODY_BYTES,
    )
    log = tmp_path_factory.mktemp("input-server") / "server.log"
    with ServerProcess(tiny_checkpoint, log, env, args=["--no-access-log"]) as proc:
        yield proc.url
        assert proc.alive(), f"the server died under bad input:\n{proc.tail()}"
    if STATUSES:  # not when only some of the other tests ran
        record_fuzz_figures()
    if LIMIT_ANSWERS:
        record_figures("input_limits", {"answers": dict(sorted(LIMIT_ANSWERS.items()))})


def record_fuzz_figures() -> None:
    by_status: Counter[int] = Counter()
    for (_, status), n in STATUSES.items():
        by_status[status] += n
    record_figures(
        "fuzz",
        {
            "max_examples_per_route_and_mode": MAX_EXAMPLES,
            "requests": sum(STATUSES.values()),
            "by_status": {str(k): v for k, v in sorted(by_status.items())},
            "by_route_and_status": {f"{r} {s}": n for (r, s), n in sorted(STATUSES.items())},
            "errors_by_kind": dict(sorted(KINDS.items())),
            "server_errors": sum(n for s, n in by_status.items() if s >= 500),
        },
    )


@pytest.fixture(scope="module")
def client(server: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server, timeout=30, headers=AUTH) as c:
        yield c


def assert_unharmed(client: httpx.Client) -> None:
    """Nothing is left admitted, and a normal request is served in full."""
    idle, _ = poll(lambda: is_idle(load_gauges(client)), 5)
    assert idle, load_gauges(client)
    body = {"prompt": PROMPT, "max_new_tokens": 4, "ignore_eos": True}
    r = client.post("/v1/generate", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 4


# -- fuzzing ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def api_schema(server: str) -> BaseSchema:
    schema = schemathesis.openapi.from_url(f"{server}/openapi.json", timeout=30)
    schema.config.update(base_url=server, headers=AUTH)
    served = {(op.method.lower(), op.path) for op in (r.ok() for r in schema.get_all_operations())}
    assert served == set(OPERATIONS), "the served OpenAPI document differs from create_app's"
    return schema


CHECKS = [
    not_a_server_error,
    status_code_conformance,  # every status answered is documented for the route
    content_type_conformance,
    response_schema_conformance,  # errors match ErrorResponse, JSON answers their models
    negative_data_rejection,  # invalid data is refused with a 4xx
]


def check_error_shape(case: Case, status: int, body: Any) -> None:
    assert isinstance(body, dict) and set(body) == {"error", "error_type"}, (case.path, body)
    kind = body["error_type"]
    assert kind in ERROR_KINDS and status in ERROR_KINDS[kind], (case.path, status, body)
    assert isinstance(body["error"], str) and body["error"].strip(), body
    KINDS[kind] += 1


def check_stream(case: Case, text: str) -> None:
    """An SSE answer: no error may travel inside it (native ``event: error`` or OpenAI chunks)."""
    for block in text.split("\n\n"):
        lines = [line for line in block.splitlines() if line]
        event = next((x[6:].strip() for x in lines if x.startswith("event:")), "message")
        data = "\n".join(x[5:].strip() for x in lines if x.startswith("data:"))
        assert event != "error", (case.path, block)
        if data and data != "[DONE]":
            payload = json.loads(data)
            assert "error_type" not in payload, (case.path, payload)


def _fuzz_cases() -> list[tuple[str, str, GenerationMode]]:
    """(method, path, mode) for every operation of the app's OpenAPI document (built without
    loading a model): valid data everywhere, invalid data where there is an input to get wrong."""
    doc = create_app(Settings(api_key=KEY)).openapi()
    cases = []
    for path, methods in doc["paths"].items():
        for method, spec in methods.items():
            cases.append((method, path, GenerationMode.POSITIVE))
            if spec.get("requestBody") or spec.get("parameters"):
                cases.append((method, path, GenerationMode.NEGATIVE))
    return cases


FUZZ_CASES = _fuzz_cases()
OPERATIONS = sorted({(method, path) for method, path, _ in FUZZ_CASES})


@pytest.mark.parametrize(
    ("method", "path", "mode"),
    FUZZ_CASES,
    ids=[f"{m.upper()} {p} {mode.value}" for m, p, mode in FUZZ_CASES],
)
def test_fuzz_route(api_schema: BaseSchema, method: str, path: str, mode: GenerationMode) -> None:
    operation = api_schema[path][method.upper()]

    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def fuzz(case: Case) -> None:
        response = case.call(timeout=30)
        STATUSES[(f"{method.upper()} {path}", response.status_code)] += 1
        case.validate_response(response, checks=CHECKS)
        content_type = response.headers.get("content-type", [""])[0]
        if response.status_code >= 400:
            check_error_shape(case, response.status_code, response.json())
        elif content_type.startswith("text/event-stream"):
            check_stream(case, response.text)

    fuzz()


@pytest.mark.parametrize(
    ("temperature", "top_p"),
    [(5e-324, 1.0), (0.25, 5e-324), (1e-40, 0.5), (1.0, 1e-30), (1e300, 1.0)],
)
def test_sampler_survives_values_that_float32_rounds_away(temperature: float, top_p: float) -> None:
    """Found by the fuzzer: the schema allows any temperature > 0 and top_p in (0, 1]; 5e-324 is
    0 in float32, which once emptied the row (an index of -1, a 500). The best token must stay."""
    import torch

    from app.engine.sampling import RowSampling, sample

    logits = torch.randn(2, 50, generator=torch.Generator().manual_seed(0))
    for u in (0.0, 0.5, 0.999999):
        token = sample(logits, [(1, RowSampling(temperature, 0, top_p, u))])[1].item()
        assert 0 <= token < 50
        if temperature < 1e-30 or top_p < 1e-30:  # effectively greedy
            assert token == logits[1].argmax().item()


# -- input limits ----------------------------------------------------------------------------------

POST_ROUTES = ["/v1/generate", "/v1/completions", "/v1/chat/completions"]


@pytest.fixture(scope="module")
def prompt_of(tiny_checkpoint: Path) -> Any:
    """A prompt of exactly ``n`` tokens as the server counts them (BOS included)."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)

    def make(n: int) -> str:
        text = "0" * (n - 1)
        assert len(tokenizer(text).input_ids) == n
        return text

    return make


def body_for(route: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    if route == "/v1/generate":
        return {"prompt": prompt, "max_new_tokens": max_tokens, "ignore_eos": True}
    if route == "/v1/completions":
        return {"model": "m", "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True}
    messages = [{"role": "user", "content": prompt}]
    return {"model": "m", "messages": messages, "max_tokens": max_tokens, "ignore_eos": True}


def refused(name: str, r: httpx.Response, status: int = 422) -> str:
    LIMIT_ANSWERS[f"{name} {r.status_code}"] += 1
    body = assert_error_shape(r, status)
    assert body["error_type"] == "validation"
    return body["error"]


@pytest.mark.parametrize("route", ["/v1/generate", "/v1/completions"])
def test_context_length_boundaries(client: httpx.Client, prompt_of: Any, route: str) -> None:
    new_field = "max_new_tokens" if route == "/v1/generate" else "max_tokens"
    # a prompt that fills the context, or passes it (under the character limit)
    for n in (CONTEXT, CONTEXT + 40):
        r = client.post(route, json=body_for(route, prompt_of(n), 1))
        message = refused("prompt over the context", r)
        assert "prompt" in message and f"context length is {CONTEXT}" in message, message
    # prompt + new tokens past the context: the message says how many would fit
    prompt = prompt_of(CONTEXT - 5)
    r = client.post(route, json=body_for(route, prompt, 6))
    message = refused("max_new_tokens over the context", r)
    assert new_field in message and "at most 5" in message, message
    # exactly filling the context is served in full: the last KV-cache position is usable
    r = client.post(route, json=body_for(route, prompt, 5))
    LIMIT_ANSWERS[f"exactly the context {r.status_code}"] += 1
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    assert usage["prompt_tokens"] == CONTEXT - 5 and usage["completion_tokens"] == 5
    assert_unharmed(client)


def test_chat_past_the_context_is_refused(client: httpx.Client, prompt_of: Any) -> None:
    route = "/v1/chat/completions"
    r = client.post(route, json=body_for(route, prompt_of(CONTEXT), 1))
    message = refused("chat prompt over the context", r)
    assert "context length" in message, message
    assert_unharmed(client)


BAD_BODIES = {
    "not-utf8": (b'{"prompt": "\xff\xfe\xfa", "model": "m"}', "application/json"),
    "latin1-declared": ('{"prompt": "café"}'.encode("latin-1"), "application/json"),
    "invalid-json": (b'{"prompt": "hi",}', "application/json"),
    "truncated-json": (b'{"prompt": "hi', "application/json"),
    "not-an-object": (b'"hi"', "application/json"),
    "nested-arrays": (b"[" * 20_000 + b"]" * 20_000, "application/json"),
    "nested-in-a-field": (
        b'{"prompt": "hi", "stop": ' + b"[" * 20_000 + b"]" * 20_000 + b"}",
        "application/json",
    ),
    "nested-objects": (b'{"a":' * 6_000 + b"1" + b"}" * 6_000, "application/json"),
    "nan": (b'{"prompt": "hi", "model": "m", "temperature": NaN}', "application/json"),
    "infinity": (b'{"prompt": "hi", "model": "m", "budget_ms": Infinity}', "application/json"),
    "empty": (b"", "application/json"),
    "not-json-content-type": (b'{"prompt": "hi"}', "text/plain"),
}


@pytest.mark.parametrize("route", POST_ROUTES)
@pytest.mark.parametrize("name", list(BAD_BODIES))
def test_bad_body_is_a_clear_422(client: httpx.Client, route: str, name: str) -> None:
    content, content_type = BAD_BODIES[name]
    assert len(content) < MAX_BODY_BYTES
    r = client.post(route, content=content, headers={"Content-Type": content_type})
    refused(name, r)


@pytest.mark.parametrize("route", POST_ROUTES)
def test_body_over_the_limit_is_413(client: httpx.Client, route: str) -> None:
    huge = json.dumps({"prompt": "x" * (MAX_BODY_BYTES + 10), "model": "m"}).encode()
    r = client.post(route, content=huge, headers={"Content-Type": "application/json"})
    assert str(MAX_BODY_BYTES) in refused("body over the limit", r, 413)

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit must count what arrives
        for i in range(0, len(huge), 8192):
            yield huge[i : i + 8192]

    r = client.post(route, content=chunks(), headers={"Content-Type": "application/json"})
    assert r.request.headers.get("transfer-encoding") == "chunked"
    assert str(MAX_BODY_BYTES) in refused("chunked body over the limit", r, 413)
    assert_unharmed(client)


def test_server_is_unharmed_after_bad_input(client: httpx.Client) -> None:
    """After everything above (ordered last among the limit tests): idle, and serving."""
    assert_unharmed(client)
    r = client.post(
        "/v1/chat/completions",
        json={"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3},
    )
    assert r.status_code == 200, r.text


# -- the API key -----------------------------------------------------------------------------------


# Operations routes and the API docs: open even with a key (SPEC §3, docs/api.md)
OPEN_PATHS = {
    "/health",
    "/ready",
    "/metrics",
    "/info",
    "/openapi.json",
    "/docs",
    "/docs/oauth2-redirect",
    "/redoc",
}


def _key_routes() -> list[tuple[str, str]]:
    """Every (method, path) of the app but the open ones, from its route table: a new route
    anywhere is an inference route that needs the key unless it is added to OPEN_PATHS."""
    app = create_app(Settings(api_key=KEY))
    try:  # FastAPI ≥ 0.16x includes routers lazily: app.routes holds the routers, not routes
        from fastapi.routing import iter_route_contexts

        table: list[Any] = list(iter_route_contexts(app.routes))
    except ImportError:
        table = list(app.routes)
    routes = []
    for route in table:
        path = getattr(route, "path", "")
        for method in sorted(getattr(route, "methods", None) or ()):
            if path not in OPEN_PATHS and method != "HEAD":
                routes.append((method, path))
    return routes


KEY_ROUTES = _key_routes()
WRONG = {
    "missing": None,
    "wrong": f"Bearer {KEY}x",
    "prefix": f"Bearer {KEY[:-1]}",
    "bearer-without-key": "Bearer",
    "no-scheme": KEY,
    "basic": f"Basic {KEY}",
}


def test_every_inference_route_is_protected() -> None:
    assert {p for _, p in KEY_ROUTES} >= {
        "/v1/generate",
        "/v1/completions",
        "/v1/chat/completions",
        "/v1/models",
    }


@pytest.mark.parametrize(("method", "path"), KEY_ROUTES, ids=[f"{m} {p}" for m, p in KEY_ROUTES])
@pytest.mark.parametrize("auth_header", list(WRONG.values()), ids=list(WRONG))
def test_missing_or_wrong_key_is_401_before_the_body_is_read(
    server: str, method: str, path: str, auth_header: str | None
) -> None:
    headers = {} if auth_header is None else {"Authorization": auth_header}
    # an invalid body, and one over the limit: a caller without the key learns nothing about them
    for content in (b"{not json", b"x" * (MAX_BODY_BYTES + 1)):
        r = httpx.request(method, server + path, content=content, headers=headers, timeout=30)
        assert assert_error_shape(r, 401)["error_type"] == "auth"
        assert r.headers["www-authenticate"] == "Bearer"


def test_unknown_v1_path_needs_the_key_too(server: str) -> None:
    assert httpx.get(f"{server}/v1/nope", timeout=30).status_code == 401
    assert_error_shape(httpx.get(f"{server}/v1/nope", headers=AUTH, timeout=30), 404)


@pytest.mark.parametrize("path", sorted(OPEN_PATHS - {"/docs/oauth2-redirect"}))
def test_operations_routes_stay_open(server: str, path: str) -> None:
    assert httpx.get(server + path, timeout=30).status_code == 200


def test_key_comparison_is_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """The decision is hmac.compare_digest's, for a right, wrong, partial or missing key."""
    calls: list[tuple[bytes, bytes]] = []
    verdict = {"value": False}

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return verdict["value"]

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)

    async def ok(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    c = TestClient(auth.ApiKeyMiddleware(ok, api_key=KEY))  # no lifespan: a bare ASGI app
    for header in (f"Bearer {KEY}", f"Bearer {KEY[:5]}", None):
        calls.clear()
        headers = {} if header is None else {"Authorization": header}
        assert c.get("/v1/models", headers=headers).status_code == 401  # spy says no
        assert calls == [(("" if header is None else header[7:]).encode(), KEY.encode())]
    verdict["value"] = True  # the spy alone decides: even a wrong key passes now
    assert c.get("/v1/models", headers={"Authorization": "Bearer nope"}).status_code == 204


def test_sse_payloads_stay_on_one_line_for_splitlines_clients() -> None:
    """Found by the disconnect storm: a token of U+2028 (or U+0085, U+2029), legal raw in JSON,
    split an OpenAI chunk in two for httpx's iter_lines (str.splitlines), so the client read half
    a JSON object. Payloads escape them now; they decode to the same text."""
    from app.api.sse import sse_event

    data = {"text": "a\u2028b\x85c\u2029d\x1ce\x0bf\r\ng", "é": "日本"}
    payload = sse_event("token", data)["data"]
    assert payload.splitlines() == [payload]
    assert json.loads(payload) == data
    assert "日本" in payload  # still UTF-8, not ASCII escapes


@pytest.mark.parametrize("attempt", range(4))
def test_a_client_still_sending_a_huge_body_reads_the_413(server: str, attempt: int) -> None:
    """A plain ``urllib`` client sending 3 MB against the 64 KB limit gets the 413, never a
    broken pipe or a reset (the server reads the refused body to its end before answering)."""
    import urllib.error
    import urllib.request

    body = json.dumps({"prompt": "x" * 3_000_000}).encode()
    req = urllib.request.Request(
        f"{server}/v1/generate",
        data=body,
        headers={**AUTH, "Content-Type": "application/json"},
        method="POST",
    )
    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(req, timeout=30)
    assert exc.value.code == 413
    assert str(MAX_BODY_BYTES) in json.loads(exc.value.read())["error"]
