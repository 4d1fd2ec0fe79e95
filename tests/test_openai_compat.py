"""The OpenAI-compatible routes through the official ``openai`` client, against a real server that
requires an API key (so the key check is tested here too, on every protected route)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from torch import Tensor
from transformers import AutoModelForCausalLM, AutoTokenizer

from app.api.launcher import ServerProcess
from tests.test_logprobs import reference_logprobs

pytestmark = pytest.mark.integration

KEY = "test-key-0123456789"


@pytest.fixture(scope="module")
def server(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    env = {
        "SORTEDSERVE_PROFILE_CACHE_DIR": str(tmp_path_factory.getbasetemp() / "profile-cache"),
        "SORTEDSERVE_MAX_BATCH_SIZE": "2",
        "SORTEDSERVE_PROFILE_BATCH_SIZES": "[1,2]",
        "SORTEDSERVE_TORCH_THREADS": "1",
        "SORTEDSERVE_DEVICE": "cpu",
        "SORTEDSERVE_API_KEY": KEY,
    }
    log = tmp_path_factory.mktemp("openai-server") / "server.log"
    with ServerProcess(tiny_checkpoint, log, env, args=["--no-access-log"]) as proc:
        yield proc.url
        assert proc.alive(), f"the server died during the tests:\n{proc.tail()}"


@pytest.fixture(scope="module")
def client(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=30)


def test_models_lists_the_served_model(client: openai.OpenAI) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == ["llama"]
    assert models[0].model_extra["sortedserve"]["exits"] == [1, 2, 3, 4]


def test_completion(client: openai.OpenAI) -> None:
    out = client.completions.create(
        model="llama", prompt="Once upon a time", max_tokens=6, temperature=0
    )
    assert out.object == "text_completion" and out.id.startswith("cmpl-")
    assert out.choices[0].finish_reason in ("length", "stop")
    assert isinstance(out.choices[0].text, str)
    assert out.usage.completion_tokens <= 6 and out.usage.total_tokens == (
        out.usage.prompt_tokens + out.usage.completion_tokens
    )
    info = out.model_extra["sortedserve"]
    assert info["exit_layer"] == 4 and info["num_layers"] == 4 and info["budget"]["met"] is None


def test_completion_with_extension_fields(client: openai.OpenAI) -> None:
    forced = client.completions.create(
        model="llama", prompt="Hello", max_tokens=4, temperature=0, extra_body={"exit_layer": 2}
    )
    assert forced.model_extra["sortedserve"]["exit_layer"] == 2
    hopeless = client.completions.create(
        model="llama", prompt="Hello", max_tokens=4, extra_body={"budget_ms": 0.001}
    )
    info = hopeless.model_extra["sortedserve"]
    assert info["exit_layer"] == 1 and info["budget"]["budget_ms"] == 0.001
    assert info["budget"]["met"] is False and info["budget"]["feasible"] is False


def test_completion_stream_with_usage(client: openai.OpenAI) -> None:
    stream = client.completions.create(
        model="llama",
        prompt="Once upon a time",
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"exit_layer": 3},
    )
    chunks = list(stream)
    text_chunks = [c for c in chunks if c.choices]
    assert text_chunks[-1].choices[0].finish_reason in ("length", "stop")
    assert all(c.model_extra["sortedserve"]["exit_layer"] == 3 for c in text_chunks)
    usage = chunks[-1]
    assert usage.choices == [] and usage.usage.completion_tokens >= 1
    whole = client.completions.create(
        model="llama", prompt="Once upon a time", max_tokens=8, temperature=0,
        extra_body={"exit_layer": 3},
    )  # fmt: skip
    assert "".join(c.choices[0].text for c in text_chunks) == whole.choices[0].text


def test_chat_completion(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(
        model="llama",
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        max_tokens=6,
        temperature=0,
    )
    assert out.object == "chat.completion" and out.id.startswith("chatcmpl-")
    assert out.choices[0].message.role == "assistant"
    assert isinstance(out.choices[0].message.content, str)
    assert out.model_extra["sortedserve"]["exit_layer"] == 4


def test_chat_completion_stream(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="llama",
        messages=[{"role": "user", "content": "Say hello."}],
        max_completion_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"budget_ms": 60_000},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    with_choices = [c for c in chunks if c.choices]
    last = with_choices[-1]
    assert last.choices[0].finish_reason in ("length", "stop")
    assert last.model_extra["sortedserve"]["budget"]["budget_ms"] == 60_000
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1
    streamed = "".join(c.choices[0].delta.content or "" for c in with_choices)
    whole = client.chat.completions.create(
        model="llama", messages=[{"role": "user", "content": "Say hello."}],
        max_completion_tokens=8, temperature=0, extra_body={"budget_ms": 60_000},
    )  # fmt: skip
    assert streamed == whole.choices[0].message.content


def test_openai_errors(client: openai.OpenAI) -> None:
    with pytest.raises(openai.UnprocessableEntityError) as exc:
        client.completions.create(model="llama", prompt="Hi", max_tokens=0)  # (no echo)
    assert "max_tokens" in exc.value.response.json()["error"]
    with pytest.raises(openai.UnprocessableEntityError) as exc:
        client.chat.completions.create(model="llama", messages=[], max_tokens=4)
    assert "messages" in exc.value.response.json()["error"]
    with pytest.raises(openai.UnprocessableEntityError) as exc:
        client.completions.create(model="llama", prompt="Hi", n=2)
    assert "n" in exc.value.response.json()["error"]
    with pytest.raises(openai.UnprocessableEntityError) as exc:
        client.completions.create(
            model="llama", prompt="Hi", extra_body={"exit_layer": 2, "budget_ms": 50}
        )
    assert "exit_layer" in exc.value.response.json()["error"]
    for field, value in [("logprobs", 6), ("logprobs", -1), ("best_of", 3), ("seed", -1)]:
        with pytest.raises(openai.UnprocessableEntityError) as exc:
            client.completions.create(model="llama", prompt="Hi", extra_body={field: value})
        assert field in exc.value.response.json()["error"]
    with pytest.raises(openai.UnprocessableEntityError) as exc:
        client.chat.completions.create(
            model="llama", messages=[{"role": "user", "content": "Hi"}], logprobs=True
        )
    assert "logprobs" in exc.value.response.json()["error"]
    with pytest.raises(openai.UnprocessableEntityError) as exc:
        client.completions.create(model="llama", prompt=[5, 10**9], max_tokens=2)
    assert "prompt" in exc.value.response.json()["error"]


# -- logprobs and echo (legacy completions) ------------------------------------------------------


@pytest.fixture(scope="module")
def hf(tiny_checkpoint: Path):
    return AutoModelForCausalLM.from_pretrained(tiny_checkpoint).eval()


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint: Path):
    return AutoTokenizer.from_pretrained(tiny_checkpoint)


PROMPT_IDS = [61, 57, 300, 12, 199, 45, 7]


def greedy_reference(hf, prompt: list[int], n: int, exit_layer: int) -> tuple[list[int], Tensor]:
    """The ``n`` greedy tokens after ``prompt`` at ``exit_layer`` and the reference
    log-probabilities ``[len(prompt) + n, vocab]`` over the whole sequence."""
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(reference_logprobs(hf, ids, exit_layer)[-1].argmax()))
    return ids[len(prompt) :], reference_logprobs(hf, ids, exit_layer)


def test_completion_logprobs_match_the_reference(client: openai.OpenAI, hf, tokenizer) -> None:
    out = client.completions.create(
        model="llama", prompt=PROMPT_IDS, max_tokens=4, temperature=0, logprobs=2,
        extra_body={"exit_layer": 2, "ignore_eos": True},
    )  # fmt: skip
    generated, ref = greedy_reference(hf, PROMPT_IDS, 4, 2)
    lp = out.choices[0].logprobs
    assert lp.tokens == [tokenizer.decode([t]) for t in generated]
    assert "".join(lp.tokens) == out.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(4)]
    for j, token in enumerate(generated):
        row = ref[len(PROMPT_IDS) + j - 1]
        assert lp.token_logprobs[j] == pytest.approx(float(row[token]), abs=1e-4)
        values, ids = row.topk(2)
        # the two best, and the chosen one (greedy: the best itself), by text
        want = {tokenizer.decode([int(i)]): float(v) for i, v in zip(ids, values, strict=True)}
        assert lp.top_logprobs[j] == pytest.approx(want, abs=1e-4)


def test_echo_with_logprobs_scores_the_prompt(client: openai.OpenAI, hf, tokenizer) -> None:
    out = client.completions.create(
        model="llama", prompt=[PROMPT_IDS], max_tokens=3, temperature=0, echo=True, logprobs=0,
        extra_body={"exit_layer": 3, "ignore_eos": True},
    )  # fmt: skip
    generated, ref = greedy_reference(hf, PROMPT_IDS, 3, 3)
    lp = out.choices[0].logprobs
    everything = PROMPT_IDS + generated
    assert lp.tokens == [tokenizer.decode([t]) for t in everything]
    assert out.choices[0].text == "".join(lp.tokens)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for i in range(1, len(everything)):
        assert lp.token_logprobs[i] == pytest.approx(float(ref[i - 1, everything[i]]), abs=1e-4)
        assert lp.top_logprobs[i] == pytest.approx({lp.tokens[i]: lp.token_logprobs[i]})
    assert out.usage.prompt_tokens == len(PROMPT_IDS) and out.usage.completion_tokens == 3


def test_echo_without_generating_scores_a_text_prompt(client: openai.OpenAI, hf) -> None:
    prompt = "Once upon a time there was"
    out = client.completions.create(
        model="llama", prompt=prompt, max_tokens=0, echo=True, logprobs=1,
        extra_body={"exit_layer": 4},
    )  # fmt: skip
    choice = out.choices[0]
    assert choice.text == prompt and choice.finish_reason == "length"
    assert out.usage.completion_tokens == 0
    lp = choice.logprobs
    assert len(lp.tokens) == out.usage.prompt_tokens and lp.token_logprobs[0] is None
    assert all(x is not None and x <= 0 for x in lp.token_logprobs[1:])
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    plain = client.completions.create(
        model="llama", prompt=prompt, max_tokens=2, temperature=0, echo=True,
        extra_body={"exit_layer": 4},
    )  # fmt: skip
    assert plain.choices[0].text.startswith(prompt) and plain.choices[0].logprobs is None


def test_streamed_logprobs_equal_the_whole(client: openai.OpenAI) -> None:
    args = {
        "model": "llama", "prompt": PROMPT_IDS, "max_tokens": 5, "temperature": 0,
        "echo": True, "logprobs": 2, "extra_body": {"exit_layer": 2, "ignore_eos": True},
    }  # fmt: skip
    whole = client.completions.create(**args).choices[0]
    chunks = [c for c in client.completions.create(**args, stream=True) if c.choices]
    assert "".join(c.choices[0].text for c in chunks) == whole.text
    parts = [c.choices[0].logprobs for c in chunks if c.choices[0].logprobs is not None]
    assert len(parts) == 5  # one chunk per token, the first one with the echoed prompt
    for field in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        assert [x for p in parts for x in getattr(p, field)] == getattr(whole.logprobs, field)


# -- the API key ---------------------------------------------------------------------------------

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
PROTECTED = [
    ("POST", "/v1/generate", {"prompt": "hi", "max_new_tokens": 2}),
    ("POST", "/v1/completions", {"model": "m", "prompt": "hi", "max_tokens": 2}),
    ("POST", "/v1/chat/completions", CHAT),
    ("GET", "/v1/models", None),
]


@pytest.mark.parametrize(("method", "path", "body"), PROTECTED, ids=[p for _, p, _ in PROTECTED])
@pytest.mark.parametrize("auth", [None, "Bearer wrong-key", "Bearer", KEY, f"Basic {KEY}"])
def test_protected_routes_refuse_missing_or_wrong_key(
    server: str, method: str, path: str, body: dict | None, auth: str | None
) -> None:
    headers = {"Authorization": auth} if auth is not None else {}
    r = httpx.request(method, server + path, json=body, headers=headers, timeout=30)
    assert r.status_code == 401, r.text
    assert r.json()["error_type"] == "auth" and r.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize(("method", "path", "body"), PROTECTED, ids=[p for _, p, _ in PROTECTED])
def test_protected_routes_accept_the_key(
    server: str, method: str, path: str, body: dict | None
) -> None:
    headers = {"Authorization": f"Bearer {KEY}"}
    r = httpx.request(method, server + path, json=body, headers=headers, timeout=30)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("path", ["/health", "/ready", "/info", "/metrics"])
def test_operations_routes_stay_open(server: str, path: str) -> None:
    assert httpx.get(server + path, timeout=30).status_code == 200
