"""The OpenAI-shaped payloads of one request: completion or chat, whole or as stream chunks.

The chosen exit (and the budget report) travels in a ``sortedserve`` object on every response
and stream chunk; streams end with ``data: [DONE]``.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from app.api.errors import ApiError, error_body
from app.api.generation import GenerationService, Job
from app.api.respond import SseEvent
from app.api.sse import sse_event
from app.engine.types import FinalEvent, TokenEvent

Kind = Literal["completion", "chat"]
FINISH = {"length": "length", "stop": "stop", "eos": "stop", "cancelled": "abort"}


class OpenAIShape:
    def __init__(
        self, service: GenerationService, job: Job, kind: Kind, include_usage: bool = False
    ) -> None:
        self.service = service
        self.job = job
        self.kind = kind
        self.include_usage = include_usage
        self.created = int(time.time())
        self.model = service.state.model_id
        self._usage_field: dict[str, Any] = {"usage": None} if include_usage else {}

    # -- whole ---------------------------------------------------------------------------------
    def whole(self, final: FinalEvent) -> dict[str, Any]:
        return {
            **self._envelope(chunk=False),
            "choices": [self._choice(final.text, FINISH[final.finish_reason], chunk=False)],
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
        if not event.text:
            return None
        chunk = {
            **self._envelope(True),
            "choices": [self._choice(event.text, None, True)],
            "sortedserve": {"exit_layer": event.exit_layer},
        }
        return sse_event(None, {**chunk, **self._usage_field})

    def done(self, final: FinalEvent) -> list[SseEvent]:
        last = {
            **self._envelope(True),
            "choices": [self._choice(None, FINISH[final.finish_reason], True)],
            "sortedserve": self._sortedserve(final),
        }
        events = [sse_event(None, {**last, **self._usage_field})]
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

    def _choice(
        self, text: str | None, finish: str | None, chunk: bool, role: bool = False
    ) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0}
        if self.kind == "completion":
            choice.update(text=text or "", logprobs=None)
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
        return {
            "exit_layer": final.exit_layer,
            "initial_exit_layer": final.initial_exit_layer,
            "num_layers": self.service.engine.info.num_layers,
            "budget": self.service.budget_report(self.job, final),
        }


def _usage(final: FinalEvent) -> dict[str, int]:
    return {
        "prompt_tokens": final.prompt_tokens,
        "completion_tokens": final.completion_tokens,
        "total_tokens": final.prompt_tokens + final.completion_tokens,
    }
