"""The OpenAI-shaped payloads of one request: completion or chat, whole or as stream chunks.

The chosen exit (and the budget report) travels in a ``sortedserve`` object on every response
and stream chunk; streams end with ``data: [DONE]``. Completions may echo the prompt and carry
log-probabilities in OpenAI's legacy shape (:func:`legacy_logprobs`); a stream then sends one chunk
per token (the first one with the echoed prompt), even where a token adds no text yet.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Literal

from app.api.errors import ApiError, error_body
from app.api.generation import GenerationService, Job
from app.api.respond import SseEvent
from app.api.sse import sse_event
from app.engine.types import FinalEvent, TokenEvent, TokenLogprob

Kind = Literal["completion", "chat"]
FINISH = {"length": "length", "stop": "stop", "eos": "stop", "cancelled": "abort"}
MIN_LOGPROB = -9999.0  # as vLLM: JSON has no -inf

Parts = list[tuple[int, Sequence[TokenLogprob]]]  # (text offset of the first, records)


class OpenAIShape:
    def __init__(
        self,
        service: GenerationService,
        job: Job,
        kind: Kind,
        include_usage: bool = False,
        echo: bool = False,
        prompt_text: str | None = None,
    ) -> None:
        """``echo``: completions begin with the prompt, ``prompt_text`` or (for a prompt of
        token ids) the decoded prompt; log-probabilities come with the job's ``logprobs``."""
        self.service = service
        self.job = job
        self.kind = kind
        self.include_usage = include_usage
        self.echo = echo
        self.prompt_text = prompt_text
        self.logprobs = job.request.sampling.logprobs is not None
        self.created = int(time.time())
        self.model = service.state.model_id
        self._usage_field: dict[str, Any] = {"usage": None} if include_usage else {}
        self._echoed = False  # streams: the prompt went out
        self._offset = 0  # streams: where the next token's text begins

    # -- whole ---------------------------------------------------------------------------------
    def whole(self, final: FinalEvent) -> dict[str, Any]:
        text, parts = final.text, []
        if self.echo:
            prefix = self._prefix(final.prompt_logprobs)
            text = prefix + text
            parts.append((0, final.prompt_logprobs or ()))
            self._offset = len(prefix)
        parts.append((self._offset, final.logprobs or ()))
        logprobs = legacy_logprobs(parts) if self.logprobs else None
        choice = self._choice(text, FINISH[final.finish_reason], chunk=False, logprobs=logprobs)
        return {
            **self._envelope(chunk=False),
            "choices": [choice],
            "usage": _usage(final),
            "sortedserve": self._sortedserve(final),
        }

    # -- stream ----------------------------------------------------------------------------------
    def opening(self) -> list[SseEvent]:
        if self.kind != "chat":
            return []
        first = {**self._envelope(True), "choices": [self._choice("", None, True, role=True)]}
        return [sse_event(None, {**first, **self._usage_field})]

    def token(self, event: TokenEvent) -> SseEvent | None:
        text, parts = event.text, self._echo_parts(event.prompt_logprobs)
        if parts is not None:
            text = self._prefix(event.prompt_logprobs) + text
        if event.logprobs is not None:
            parts = [*(parts or []), (self._offset, [event.logprobs])]
            self._offset += len(event.logprobs.text)
        if not text and not (self.logprobs and parts):
            return None
        logprobs = legacy_logprobs(parts or []) if self.logprobs else None
        chunk = {
            **self._envelope(True),
            "choices": [self._choice(text, None, True, logprobs=logprobs)],
            "sortedserve": {"exit_layer": event.exit_layer},
        }
        return sse_event(None, {**chunk, **self._usage_field})

    def done(self, final: FinalEvent) -> list[SseEvent]:
        events = []
        parts = self._echo_parts(final.prompt_logprobs)  # nothing was generated (max_tokens 0)
        if parts is not None:
            logprobs = legacy_logprobs(parts) if self.logprobs else None
            text = self._prefix(final.prompt_logprobs)
            echo = {**self._envelope(True), "choices": [self._choice(text, None, True, logprobs)]}
            events.append(sse_event(None, {**echo, **self._usage_field}))
        last = {
            **self._envelope(True),
            "choices": [self._choice(None, FINISH[final.finish_reason], True)],
            "sortedserve": self._sortedserve(final),
        }
        events.append(sse_event(None, {**last, **self._usage_field}))
        if self.include_usage:
            usage = {**self._envelope(True), "choices": [], "usage": _usage(final)}
            events.append(sse_event(None, usage))
        return events

    def error(self, err: ApiError) -> SseEvent:
        return sse_event(None, error_body(err.error_type, err.message))

    def closing(self) -> list[SseEvent]:
        return [sse_event(None, "[DONE]")]

    # -- parts -----------------------------------------------------------------------------------
    def _envelope(self, chunk: bool) -> dict[str, Any]:
        if self.kind == "chat":
            obj = "chat.completion.chunk" if chunk else "chat.completion"
        else:
            obj = "text_completion"
        return {
            "id": self.job.request_id,
            "object": obj,
            "created": self.created,
            "model": self.model,
        }

    def _prefix(self, prompt: Sequence[TokenLogprob] | None) -> str:
        """The echoed prompt: as sent, or decoded when it came as token ids."""
        if self.prompt_text is not None:
            return self.prompt_text
        return "".join(r.text for r in prompt or ())

    def _echo_parts(self, prompt: Sequence[TokenLogprob] | None) -> Parts | None:
        """Streams: the prompt's records, the first time only (None when there is no echo)."""
        if not self.echo or self._echoed:
            return None
        self._echoed = True
        self._offset = len(self._prefix(prompt))
        return [(0, prompt or ())]

    def _choice(
        self,
        text: str | None,
        finish: str | None,
        chunk: bool,
        logprobs: dict[str, list[Any]] | None = None,
        role: bool = False,
    ) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0}
        if self.kind == "completion":
            choice.update(text=text or "", logprobs=logprobs)
        elif chunk:
            delta: dict[str, Any] = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            choice.update(delta=delta, logprobs=None)
        else:
            choice.update(message={"role": "assistant", "content": text}, logprobs=None)
        choice["finish_reason"] = finish
        return choice

    def _sortedserve(self, final: FinalEvent) -> dict[str, Any]:
        out = {
            "exit_layer": final.exit_layer,
            "initial_exit_layer": final.initial_exit_layer,
            "num_layers": self.service.engine.info.num_layers,
            "budget": self.service.budget_report(self.job, final),
        }
        if self.service.state.replica is not None:
            out["replica"] = self.service.state.replica
        return out


def _usage(final: FinalEvent) -> dict[str, int]:
    return {
        "prompt_tokens": final.prompt_tokens,
        "completion_tokens": final.completion_tokens,
        "total_tokens": final.prompt_tokens + final.completion_tokens,
    }


def legacy_logprobs(parts: Parts) -> dict[str, list[Any]]:
    """OpenAI's legacy ``logprobs`` object: ``tokens``, ``token_logprobs`` (null for the first
    prompt token), ``top_logprobs`` (the N best and the token itself, by text) and
    ``text_offset`` (where each token's text begins in the returned text)."""
    out: dict[str, list[Any]] = {
        "tokens": [],
        "token_logprobs": [],
        "top_logprobs": [],
        "text_offset": [],
    }
    for offset, records in parts:
        for r in records:
            out["tokens"].append(r.text)
            out["text_offset"].append(offset)
            offset += len(r.text)
            if r.logprob is None:
                out["token_logprobs"].append(None)
                out["top_logprobs"].append(None)
                continue
            top: dict[str, float] = {}
            for alt in r.top:  # best first: a text shared by two tokens keeps the better one
                top.setdefault(alt.text, max(alt.logprob, MIN_LOGPROB))
            top.setdefault(r.text, max(r.logprob, MIN_LOGPROB))
            out["token_logprobs"].append(max(r.logprob, MIN_LOGPROB))
            out["top_logprobs"].append(top)
    return out
