"""Plain-data types that cross the engine boundary, and the engine's interface (no torch here).

The API layer and the scheduler see only these: a request goes in as :class:`GenerationRequest`,
and comes back as a stream of :class:`TokenEvent` ending with one :class:`FinalEvent`. After every
decode step the engine reports a :class:`StepReport` to an optional hook, which may answer with
lowered exits for running requests. :class:`EngineProtocol` is what the API needs of an engine;
``app.engine.Engine`` and the tests' fake engine both satisfy it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, NamedTuple, Protocol, runtime_checkable

FinishReason = Literal["length", "stop", "eos", "cancelled", "error"]


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means off
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # keep generating past EOS (benchmarks); EOS is then an ordinary token
    # Log-probabilities under the request's exit, of the model's raw distribution (before
    # temperature / top-k / top-p): ``logprobs`` for each generated token, ``prompt_logprobs``
    # for each prompt token after the first (the prefill then keeps every position's logits).
    # The number is how many most likely alternatives to report besides the token (0: none);
    # None asks for nothing. ``max_new_tokens`` may be 0 when ``prompt_logprobs`` is set: the
    # prompt is scored and nothing is generated.
    logprobs: int | None = None
    prompt_logprobs: int | None = None


@dataclass
class GenerationRequest:
    request_id: str
    prompt_ids: list[int]
    exit_layer: int  # a trained exit: the number of layers this request runs through
    sampling: SamplingParams = field(default_factory=SamplingParams)
    arrival_time: float | None = None  # time.perf_counter() at arrival; set by the engine if None


class Alternative(NamedTuple):
    """One of the most likely tokens at a position."""

    token_id: int
    text: str  # what it would add to the text there
    logprob: float


@dataclass(frozen=True)
class TokenLogprob:
    """One token's log-probability under the exit it was scored at, and the best alternatives.

    ``text`` is what the token adds to the decoded text in its context (``""`` while a UTF-8
    character is incomplete: the token that completes it carries the character), so the texts of
    consecutive tokens concatenate to the decoded text.
    """

    token_id: int
    text: str
    logprob: float | None  # None for the first prompt token: nothing predicts it
    top: tuple[Alternative, ...] = ()  # the most likely tokens, best first


@dataclass(frozen=True)
class TokenEvent:
    index: int  # 0-based position among the generated tokens
    text: str  # newly decodable text ("" while a UTF-8 character is incomplete)
    token_id: int
    exit_layer: int
    logprobs: TokenLogprob | None = None  # when ``SamplingParams.logprobs`` is set
    # when ``SamplingParams.prompt_logprobs`` is set: on the first event only (and the final one)
    prompt_logprobs: tuple[TokenLogprob, ...] | None = None


@dataclass(frozen=True)
class Downgrade:
    at_token: int
    from_exit: int
    to_exit: int


@dataclass(frozen=True)
class FinalEvent:
    request_id: str
    text: str
    finish_reason: FinishReason
    exit_layer: int  # the exit the request ended at
    initial_exit_layer: int
    downgrades: tuple[Downgrade, ...]
    prompt_tokens: int
    completion_tokens: int
    queue_ms: float  # arrival → prefill start
    ttft_ms: float  # arrival → first token
    total_ms: float  # arrival → last token
    ms_per_token: float  # mean decode time per token after the first
    error: str | None = None
    logprobs: tuple[TokenLogprob, ...] | None = None  # every generated token's, when asked
    prompt_logprobs: tuple[TokenLogprob, ...] | None = None  # every prompt token's, when asked


@dataclass(frozen=True)
class RowState:
    """One running request as the step hook sees it."""

    request_id: str
    exit_layer: int
    generated: int  # tokens generated so far
    max_new_tokens: int
    prompt_tokens: int
    arrival_time: float  # perf_counter clock


@dataclass(frozen=True)
class StepReport:
    """One decode step: the exit of every row in it, the rows still running after it, and the rows
    that left the batch since the last report (finished in this step, at their prefill, or
    cancelled or failed between steps)."""

    now: float  # perf_counter at the end of the step
    step_seconds: float
    exits: tuple[int, ...]  # row order: deepest first
    rows: tuple[RowState, ...]
    finished: tuple[RowState, ...]
    waiting: int  # requests queued for prefill

    @property
    def batch_size(self) -> int:
        return len(self.exits)

    @property
    def deepest_exit(self) -> int:
        return max(self.exits, default=0)


# Called in the engine thread after each decode step; returns {request_id: new (lower) exit}.
StepHook = Callable[[StepReport], Mapping[str, int] | None]


@dataclass(frozen=True)
class EngineStats:
    running: int
    waiting: int
    free_slots: int
    max_slots: int


@dataclass(frozen=True)
class ProfilePoint:
    """Measured latency of one exit: prefill per prompt token, decode step per batch size."""

    exit_layer: int
    prefill_ms_per_token: float
    decode_ms_by_batch: dict[int, float]


Event = TokenEvent | FinalEvent


@dataclass(frozen=True)
class ModelInfo:
    model_id: str
    model_type: str
    num_layers: int
    exits: tuple[int, ...]
    max_seq_len: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    device: str
    dtype: str
    soft_tuned: bool
    quality: dict[str, float]  # sorted.json eval.by_exit, keys are exits as strings
    metric: str  # the quality metric's name, e.g. "loss"
    weights: str = ""  # the linear weights' format (float32, bfloat16, int8, int4); "" unknown
    weight_kernel: str = ""  # the op that reads them, as app.engine.kernels chose it


class EngineClosedError(RuntimeError):
    """The engine is shutting down and accepts no new requests."""


@runtime_checkable
class EngineProtocol(Protocol):
    """What the API layer needs of an engine (``app.engine.Engine``, or a test double)."""

    info: ModelInfo

    def encode(self, text: str) -> list[int]: ...

    def encode_chat(self, messages: Sequence[dict[str, str]]) -> list[int]: ...

    def measure_profile(
        self, batch_sizes: Sequence[int], *, depths: int = 0, max_seconds: float = float("inf")
    ) -> list[ProfilePoint]: ...

    def start(self) -> None: ...

    def generate(self, request: GenerationRequest) -> AsyncIterator[Event]: ...

    def cancel(self, request_id: str) -> None: ...

    def stats(self) -> EngineStats: ...

    def shutdown(self, timeout_s: float = 30.0) -> None: ...
