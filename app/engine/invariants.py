"""The invariants a request must hold before the engine takes it (the cache and the model rely
on them). The API validates its requests with field names before they get here; this guards
direct callers (benchmarks, tests) with one clear ``ValueError``."""

from __future__ import annotations

from app.engine.types import GenerationRequest, ModelInfo


def check_request(request: GenerationRequest, info: ModelInfo) -> None:
    """Raise ``ValueError`` naming the first invariant ``request`` breaks for this model."""
    n, p = len(request.prompt_ids), request.sampling
    problems = [
        (n == 0, "the prompt is empty"),
        (
            n >= info.max_seq_len,
            f"the prompt has {n} tokens; the context holds {info.max_seq_len} "
            "(prompt plus at least one new token)",
        ),
        (
            not 1 <= request.exit_layer <= info.num_layers,
            f"exit_layer {request.exit_layer} is outside 1..{info.num_layers}",
        ),
        (
            any(not 0 <= t < info.vocab_size for t in request.prompt_ids),
            f"the prompt has token ids outside 0..{info.vocab_size - 1}",
        ),
        (
            p.max_new_tokens < (0 if p.prompt_logprobs is not None else 1),
            "max_new_tokens must be at least 1 (0 only with prompt_logprobs)",
        ),
        (
            any(
                n is not None and not 0 <= n <= info.vocab_size
                for n in (p.logprobs, p.prompt_logprobs)
            ),
            f"logprobs and prompt_logprobs must be in 0..{info.vocab_size}",
        ),
        (
            p.temperature < 0 or not 0 < p.top_p <= 1 or p.top_k < 0,
            "temperature must be >= 0, top_p in (0, 1] and top_k >= 0",
        ),
    ]
    for bad, message in problems:
        if bad:
            raise ValueError(message)
