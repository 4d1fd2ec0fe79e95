"""Request bodies of the OpenAI-compatible routes (``/v1/completions``, ``/v1/chat/completions``).

Follows OpenAI's field names and defaults (``max_tokens`` 16 for completions, ``temperature`` 1),
ignores fields that clients send by habit (``user``, ``logit_bias`` when empty, ...), refuses with
422 the options that would silently change the meaning (``n`` > 1, chat ``logprobs``, tools,
penalties), and takes SortedServe's extensions ``budget_ms``, ``exit_layer`` and ``top_k``
(``extra_body`` in the official client). Completions take ``logprobs`` (top-N, at most
:data:`MAX_LOGPROBS`) and ``echo`` with OpenAI's legacy meaning, and a prompt of token ids.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from app.api.schemas import (
    EXIT_OR_BUDGET,
    FalseOnly,
    NonNegativeInt,
    One,
    PositiveInt,
    Seed,
    StopString,
)

MAX_LOGPROBS = 5  # as OpenAI's legacy completions: the most alternatives per token
TokenIds = Annotated[list[NonNegativeInt], Field(min_length=1)]


class OpenAIModel(BaseModel):
    # unknown fields are ignored: OpenAI clients and SDKs add their own
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


class StreamOptions(OpenAIModel):
    include_usage: bool = False


class _Common(OpenAIModel):
    model_config = ConfigDict(json_schema_extra=EXIT_OR_BUDGET)

    model: str | None = Field(None, description="any name is accepted; the served model answers")
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: One = Field(1, description="only 1 is supported")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: StopString | Annotated[list[StopString], Field(max_length=4)] | None = None
    seed: Seed | None = None
    presence_penalty: float = Field(0.0, ge=0, le=0, description="not supported: must be 0")
    frequency_penalty: float = Field(0.0, ge=0, le=0, description="not supported: must be 0")
    user: str | None = None
    # SortedServe extensions
    budget_ms: float | None = Field(None, gt=0, description="SortedServe: latency budget")
    exit_layer: PositiveInt | None = Field(None, description="SortedServe: force a trained exit")
    top_k: NonNegativeInt = Field(0, description="SortedServe: top-k sampling, 0 is off")
    ignore_eos: bool = Field(False, description="SortedServe: keep generating past EOS")

    @model_validator(mode="after")
    def _exit_or_budget(self) -> _Common:
        if self.exit_layer is not None and self.budget_ms is not None:
            raise ValueError("exit_layer cannot be combined with budget_ms (the budget chooses)")
        return self


class CompletionRequest(_Common):
    prompt: (
        str
        | Annotated[list[str], Field(min_length=1, max_length=1)]
        | TokenIds
        | Annotated[list[TokenIds], Field(min_length=1, max_length=1)]
    ) = Field(description="one prompt: a string, or token ids (either also as a list holding one)")
    # (echo before max_tokens: max_tokens' check reads it)
    echo: bool = Field(False, description="the text and, with logprobs, the scores of the prompt")
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = Field(
        None,
        description=f"log-probabilities of each token and of its N most likely alternatives "
        f"(N at most {MAX_LOGPROBS}), under the exit the request runs at",
    )
    max_tokens: NonNegativeInt | None = Field(16, description="0 only with echo: score the prompt")
    best_of: One | None = None
    suffix: str | None = Field(None, max_length=0, description="not supported")

    @field_validator("max_tokens")
    @classmethod
    def _zero_only_with_echo(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value == 0 and not info.data.get("echo"):
            raise ValueError("0 is accepted only with echo: true (to score the prompt)")
        return value

    @property
    def prompt_text(self) -> str | None:
        """The prompt as text (None when it is token ids)."""
        prompt = self._one_prompt()
        return prompt if isinstance(prompt, str) else None

    @property
    def prompt_ids(self) -> list[int] | None:
        """The prompt as token ids (None when it is text)."""
        prompt = self._one_prompt()
        return None if isinstance(prompt, str) else prompt

    def _one_prompt(self) -> str | list[int]:
        p = self.prompt
        if isinstance(p, list) and isinstance(p[0], str | list):
            return p[0]  # type: ignore[return-value]
        return p  # type: ignore[return-value]


class ResponseFormat(OpenAIModel):
    type: Literal["text"] = Field(description="only plain text is supported")


class TextPart(OpenAIModel):
    type: Literal["text"]
    text: str


class ChatMessage(OpenAIModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def as_template_message(self) -> dict[str, str]:
        if isinstance(self.content, list):
            text = "".join(part.text for part in self.content)
        else:
            text = self.content or ""
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": text}


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: PositiveInt | None = Field(None, description="deprecated by OpenAI; accepted")
    max_completion_tokens: PositiveInt | None = None
    logprobs: FalseOnly | None = Field(None, description="not supported: false or null")
    tools: list[Any] | None = Field(None, max_length=0, description="not supported")
    response_format: ResponseFormat | None = None

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens else self.max_tokens
