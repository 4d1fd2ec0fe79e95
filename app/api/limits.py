"""The limits a request is checked against once, in ``GenerationService.prepare``: the ones that
depend on the served model or on the settings (the body's own types and ranges are pydantic's)."""

from __future__ import annotations

import math

from app.api.errors import ApiError, validation_error
from app.api.state import AppState
from app.settings import Settings


def take_place(state: AppState) -> None:
    """Take one of the places (batch slots plus the bounded queue); 429 when none is left."""
    if state.inflight >= state.capacity:
        scheduler = state.scheduler
        wait_s = scheduler.expected_wait_ms() / 1000 if scheduler is not None else 1.0
        retry = str(min(max(math.ceil(wait_s), 1), 60))
        raise ApiError(
            429,
            "overloaded",
            f"the server is at capacity ({state.capacity} requests in flight); retry later",
            headers={"Retry-After": retry},
        )
    state.inflight += 1


def check_chars(settings: Settings, text: str, field: str) -> None:
    limit = settings.max_prompt_chars
    if len(text) > limit:
        raise validation_error(field, f"has {len(text)} characters; the limit is {limit}")


def max_new_tokens(settings: Settings, value: int | None, field: str) -> int:
    """The request's ``max_new_tokens`` (the server's default when absent), within the limit."""
    limit = settings.max_new_tokens_limit
    n = min(settings.default_max_new_tokens, limit) if value is None else value
    if n > limit:
        raise validation_error(field, f"is {n}; this server allows at most {limit}")
    return n


def check_token_ids(state: AppState, ids: list[int], field: str) -> None:
    assert state.engine is not None
    vocab = state.engine.info.vocab_size
    bad = next((t for t in ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise validation_error(field, f"has token id {bad}; ids must be in 0..{vocab - 1}")


def context_length(state: AppState) -> int:
    assert state.engine is not None
    limit = state.engine.info.max_seq_len
    if state.settings.max_seq_len is not None:
        limit = min(limit, state.settings.max_seq_len)
    return limit


def check_context(
    state: AppState, prompt: int, new: int, prompt_field: str, max_field: str
) -> None:
    context = context_length(state)
    if prompt == 0:
        raise validation_error(prompt_field, "has no tokens")
    if prompt >= context:
        raise validation_error(prompt_field, f"is {prompt} tokens; the context length is {context}")
    if prompt + new > context:
        raise validation_error(
            max_field,
            f"{new} plus the prompt's {prompt} tokens exceeds the context "
            f"length {context}; ask for at most {context - prompt}",
        )
