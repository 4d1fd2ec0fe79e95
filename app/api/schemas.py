"""Request and response bodies of the native API (``POST /v1/generate``, SPEC §3).

Validation happens here, at the edge: strict types (no ``"5"`` for 5, no ``true`` for 1), finite
numbers, unknown fields refused so that a typo such as ``budget`` is not silently ignored. Limits
that depend on the served model or the settings (prompt length, context, trained exits) are
checked by ``app.api.generation``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_validator

SEED_MAX = 2**53 - 1  # the largest integer every JSON client (JavaScript too) holds exactly


def _whole_number(value: Any) -> Any:
    # JSON Schema counts 2.0 as an integer; strict pydantic would not
    return int(value) if isinstance(value, float) and value.is_integer() else value


PositiveInt = Annotated[int, Field(ge=1), BeforeValidator(_whole_number)]
NonNegativeInt = Annotated[int, Field(ge=0), BeforeValidator(_whole_number)]
Seed = Annotated[int, Field(ge=0, le=SEED_MAX), BeforeValidator(_whole_number)]
One = Annotated[int, Field(ge=1, le=1), BeforeValidator(_whole_number)]


def _must_be_false(value: bool) -> bool:
    if value:
        raise ValueError("is not supported; only false is accepted")
    return value


FalseOnly = Annotated[
    bool, Field(json_schema_extra={"const": False}), AfterValidator(_must_be_false)
]
StopString = Annotated[str, Field(min_length=1, max_length=256)]

# JSON Schema for "not both exit_layer and budget_ms" (null counts as absent)
EXIT_OR_BUDGET = {
    "not": {
        "required": ["exit_layer", "budget_ms"],
        "properties": {"exit_layer": {"type": "integer"}, "budget_ms": {"type": "number"}},
    }
}


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class GenerateRequest(StrictModel):
    model_config = ConfigDict(json_schema_extra=EXIT_OR_BUDGET)

    prompt: str = Field(min_length=1, description="raw text, tokenized as the checkpoint does")
    budget_ms: float | None = Field(
        None, gt=0, description="end-to-end latency budget (arrival → last token), server side"
    )
    max_new_tokens: PositiveInt | None = Field(
        None, description="tokens to generate at most (default 128, capped by the server)"
    )
    temperature: float = Field(0.0, ge=0, le=100, description="0 is greedy")
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: NonNegativeInt = Field(0, description="0 is off")
    seed: Seed | None = Field(None, description="same seed ⇒ same output")
    stop: list[StopString] = Field(default_factory=list, max_length=4)
    exit_layer: PositiveInt | None = Field(
        None, description="force a trained exit (not together with budget_ms)"
    )
    stream: bool = Field(False, description="server-sent events instead of one JSON object")
    ignore_eos: bool = Field(
        False, description="extension (as in vLLM): keep generating past EOS, for benchmarks"
    )

    @model_validator(mode="after")
    def _exit_or_budget(self) -> GenerateRequest:
        if self.exit_layer is not None and self.budget_ms is not None:
            raise ValueError("exit_layer cannot be combined with budget_ms (the budget chooses)")
        return self


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int


class DowngradeOut(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    at_token: int
    from_: int = Field(alias="from")
    to: int


class BudgetOut(BaseModel):
    budget_ms: float | None
    predicted_ms: float
    elapsed_ms: float
    met: bool | None = Field(description="null without a budget")
    feasible: bool = Field(description="the prediction at arrival fitted the budget")
    initial_exit_layer: int
    downgrades: list[DowngradeOut]


class Timings(BaseModel):
    queue_ms: float
    ttft_ms: float
    total_ms: float
    ms_per_token: float


class GenerateResponse(BaseModel):
    id: str
    text: str
    finish_reason: Literal["length", "stop", "eos", "cancelled"]
    exit_layer: int
    num_layers: int
    usage: Usage
    budget: BudgetOut
    timings: Timings


class TokenEventOut(BaseModel):
    """Data of one SSE ``token`` event."""

    index: int
    text: str
    token_id: int
    exit_layer: int
