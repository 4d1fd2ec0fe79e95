"""Greedy answers of one checkpoint at every exit, for a few fixed prompts.

People would rather read the ladder than its numbers: ``bench quality`` puts these next to the
held-out loss. The answers come through the serving engine (greedy, EOS honoured), so for a
chat-trained model they are what ``/v1/chat/completions`` returns at that ``exit_layer`` with
``temperature: 0``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

logger = logging.getLogger(__name__)

PROMPTS: tuple[str, ...] = (
    "Give three tips for staying healthy.",
    "What is the capital of France?",
    "Write a short poem about the sea.",
)


def greedy_answers(
    model_ref: str,
    exits: Sequence[int],
    prompts: Sequence[str] = PROMPTS,
    max_new_tokens: int = 48,
    max_seq_len: int = 512,
    chat: bool = True,
) -> dict[str, dict[str, str]]:
    """``{prompt: {exit: answer}}`` for ``model_ref`` (a model-store folder, GGUF or pkg: ref).

    Prompts are rendered as the model was trained: the chat template with ``chat``, else the
    Alpaca prompt."""
    from app.engine import Engine, EngineConfig, GenerationRequest, SamplingParams
    from app.training.prompting import alpaca_prompt

    engine = Engine.from_pretrained(
        model_ref, EngineConfig(device="cpu", max_slots=1, max_seq_len=max_seq_len)
    )
    engine.start()
    try:
        answers: dict[str, dict[str, str]] = {}
        for i, prompt in enumerate(prompts):
            if chat:
                ids = engine.encode_chat([{"role": "user", "content": prompt}])
            else:
                ids = engine.encode(alpaca_prompt(prompt))
            answers[prompt] = {}
            for k in exits:
                request = GenerationRequest(
                    request_id=f"answer-{i}-{k}",
                    prompt_ids=ids,
                    exit_layer=k,
                    sampling=SamplingParams(max_new_tokens=max_new_tokens),
                )
                answers[prompt][str(k)] = asyncio.run(_final_text(engine, request))
                logger.info("%s exit %d: %r", model_ref, k, answers[prompt][str(k)][:60])
        return answers
    finally:
        engine.shutdown()


async def _final_text(engine: Any, request: Any) -> str:
    final = None
    async for event in engine.generate(request):
        final = event
    if final is None or final.finish_reason == "error":
        raise RuntimeError(getattr(final, "error", None) or "the engine returned nothing")
    return final.text
