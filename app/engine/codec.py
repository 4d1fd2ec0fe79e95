"""Text in and out of the engine: prompt encoding, chat templates, fast id-to-text decoding."""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable, Sequence
from typing import Any


class TextCodec:
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        # Rust tokenizers refuse concurrent use when one call reconfigures them ("Already
        # borrowed"); the API encodes from a thread pool, so encoding is serialised, and the
        # engine thread decodes with its own copy.
        self._lock = threading.Lock()
        self.decode = _text_decoder(copy.deepcopy(tokenizer))

    def encode(self, text: str) -> list[int]:
        """``tokenizer(text).input_ids``: BOS where the tokenizer is configured to add one."""
        with self._lock:
            return list(self.tokenizer(text).input_ids)

    def encode_chat(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """The tokenizer's chat template with the generation prompt."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("this model's tokenizer has no chat template")
        with self._lock:
            out = self.tokenizer.apply_chat_template(
                list(messages), add_generation_prompt=True, tokenize=True
            )
        if not isinstance(out, list):
            out = out["input_ids"]
        return [int(t) for t in out]


def _text_decoder(tokenizer: Any) -> Callable[[Sequence[int]], str]:
    """The fastest faithful ``ids -> text`` for this tokenizer, skipping special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return lambda ids: backend.decode(list(ids), skip_special_tokens=True)
    return lambda ids: tokenizer.decode(list(ids), skip_special_tokens=True)
