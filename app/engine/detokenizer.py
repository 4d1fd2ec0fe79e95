"""Incremental detokenisation and stop strings: token ids in, safe-to-send text out.

:class:`IncrementalDecoder` uses the prefix-offset / read-offset method (as TGI and vLLM do): the
new text is the decode of a short window of recent ids minus the decode of the same window without
the newest ones. Text that ends in U+FFFD is an incomplete UTF-8 character and is held back until a
later token completes it, so a streamed chunk never splits a character.

:class:`StopMatcher` cuts the output at the first stop string and holds back any tail that could
still grow into one, so a partial match never leaks to the client.

Pure Python; the tokenizer is reached only through the ``decode`` callable.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

Decode = Callable[[Sequence[int]], str]

_REPLACEMENT = "\ufffd"
_CONTEXT = 5  # prompt ids kept as left context (SentencePiece drops a leading space otherwise)


class IncrementalDecoder:
    def __init__(self, decode: Decode, prompt_ids: Sequence[int]) -> None:
        self._decode = decode
        self._ids = list(prompt_ids[-_CONTEXT:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._start = len(self._ids)

    def add(self, token_id: int) -> str:
        """The text that ``token_id`` completes (``""`` while a character is still incomplete)."""
        self._ids.append(token_id)
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        text = self._decode(self._ids[self._prefix_offset :])
        if len(text) > len(prefix) and not text.endswith(_REPLACEMENT):
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            return text[len(prefix) :]
        return ""

    def peek(self, token_ids: Sequence[int]) -> list[str]:
        """The text each of ``token_ids`` would add next, held-back text included (for scoring
        alternatives; nothing is consumed). May end in U+FFFD where a character is incomplete."""
        if not token_ids:
            return []
        window = self._ids[self._prefix_offset :]
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        return [self._decode([*window, t])[len(prefix) :] for t in token_ids]

    def flush(self) -> str:
        """Whatever is still held back (an invalid byte sequence shows as U+FFFD)."""
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        text = self._decode(self._ids[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self._ids)
        return text[len(prefix) :] if text.startswith(prefix) else ""


class StopMatcher:
    """Accumulates output text; reports what may be sent and whether a stop string was hit."""

    def __init__(self, stop: Sequence[str]) -> None:
        self._stop = [s for s in stop if s]
        self._longest = max((len(s) for s in self._stop), default=0)
        self.text = ""  # all text so far (cut at the stop string once one is found)
        self._sent = 0
        self.stopped = False

    def push(self, chunk: str) -> str:
        """Add ``chunk``; return the text now safe to send."""
        if self.stopped or not chunk:
            return ""
        if not self._stop:
            self.text += chunk
            self._sent = len(self.text)
            return chunk
        search_from = max(0, len(self.text) - self._longest + 1)
        self.text += chunk
        cut = min(
            (i for i in (self.text.find(s, search_from) for s in self._stop) if i >= 0),
            default=-1,
        )
        if cut >= 0:
            self.stopped = True
            self.text = self.text[:cut]
            return self._release(cut)
        return self._release(len(self.text) - self._partial_tail())

    def flush(self) -> str:
        """At the end of generation: send what was held back as a possible stop prefix."""
        return self._release(len(self.text))

    def _partial_tail(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string."""
        best = 0
        for s in self._stop:
            for n in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:n]):
                    best = n
                    break
        return best

    def _release(self, end: int) -> str:
        if end <= self._sent:
            return ""
        out = self.text[self._sent : end]
        self._sent = end
        return out
