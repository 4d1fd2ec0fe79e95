"""The router's view of a request, read at the ingress from its JSON body (no validation: the
replica's app validates and answers 422; a body that cannot be read is routed by load alone)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from app.ray_serve.ranking import RequestShape

logger = logging.getLogger(__name__)

GENERATION_PATHS = frozenset({"/v1/generate", "/v1/completions", "/v1/chat/completions"})
_CHARS_PER_TOKEN = 4.0  # when the checkpoint's tokenizer.json is not at hand
_CHAT_TOKENS_PER_MESSAGE = 6  # role markers of a chat template, roughly
_COMPLETIONS_DEFAULT_TOKENS = 16  # app/api/openai_schemas.py, as OpenAI


class TokenCounter:
    """Prompt tokens by the checkpoint's own ``tokenizer.json`` when the model folder has one,
    else by length (``chars / 4``)."""

    def __init__(self, model: str | Path | None) -> None:
        self._tokenizer: Any = None
        path = Path(model) / "tokenizer.json" if model else None
        if path is not None and path.is_file():
            try:
                from tokenizers import Tokenizer

                self._tokenizer = Tokenizer.from_file(str(path))
            except Exception as exc:  # a tokenizer the library cannot read: estimate
                logger.warning("cannot read %s (%s); estimating prompt tokens", path, exc)

    def count(self, text: str) -> int:
        if self._tokenizer is not None:
            return len(self._tokenizer.encode(text).ids)
        return int(len(text) / _CHARS_PER_TOKEN) + 1


def read_shape(
    path: str, body: bytes, counter: TokenCounter, default_max_new_tokens: int = 128
) -> RequestShape | None:
    if path not in GENERATION_PATHS:
        return None
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(data, dict):
        return None
    try:
        tokens = _prompt_tokens(data, counter)
        if path == "/v1/generate":
            new = data.get("max_new_tokens", default_max_new_tokens)
        elif path == "/v1/completions":  # OpenAI's default there is 16
            new = data.get("max_tokens", _COMPLETIONS_DEFAULT_TOKENS)
            new = default_max_new_tokens if new is None else new
        else:
            new = data.get("max_completion_tokens") or data.get("max_tokens")
            new = default_max_new_tokens if new is None else new
        budget = data.get("budget_ms")
        exit_layer = data.get("exit_layer")
        return RequestShape(
            prompt_tokens=tokens,
            max_new_tokens=max(int(new), 0),
            budget_ms=None if budget is None else float(budget),
            exit_layer=None if exit_layer is None else int(exit_layer),
        )
    except (TypeError, ValueError):
        return None


def _prompt_tokens(data: dict[str, Any], counter: TokenCounter) -> int:
    messages = data.get("messages")
    if isinstance(messages, list):
        text = "".join(str(m.get("content", "")) for m in messages if isinstance(m, dict))
        return counter.count(text) + _CHAT_TOKENS_PER_MESSAGE * len(messages)
    prompt = data.get("prompt", "")
    if isinstance(prompt, list):  # OpenAI: a list of token ids, or one string in a list
        if all(isinstance(t, int) for t in prompt):
            return len(prompt)
        prompt = "".join(str(p) for p in prompt)
    return counter.count(str(prompt))
