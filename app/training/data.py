"""Training data: Alpaca-format records, the prompt mask, the held-out split, packed LM text.

Everything here works on plain Python lists of token ids; the trainer turns batches into tensors.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.training.prompting import alpaca_prompt

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100


class DataError(ValueError):
    """Input data that cannot be used; the message names the file and the record."""


@dataclass(frozen=True)
class Record:
    instruction: str
    input: str
    output: str

    @property
    def prompt(self) -> str:
        return alpaca_prompt(self.instruction, self.input)


def _parse_records(raw: Any, source: str) -> list[Record]:
    if not isinstance(raw, list):
        raise DataError(f"{source}: expected a JSON list of Alpaca records")
    records = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            raise DataError(f"{source}: record {i} is not an object")
        for key in ("instruction", "output"):
            if not isinstance(item.get(key), str) or not item[key].strip():
                raise DataError(f"{source}: record {i} has no non-empty string {key!r}")
        inp = item.get("input") or ""
        if not isinstance(inp, str):
            raise DataError(f"{source}: record {i} has a non-string 'input'")
        records.append(Record(item["instruction"], inp, item["output"]))
    return records


def load_alpaca(path: str | Path) -> list[Record]:
    """Read Alpaca-format records (``instruction``, ``input``, ``output``) from JSON or JSONL."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {str(path)!r} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        raw = json.loads(text)
    except json.JSONDecodeError:
        try:
            raw = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: neither JSON nor JSON lines ({exc})") from exc
    return _parse_records(raw, str(path))


def save_alpaca(records: Iterable[Record], path: str | Path) -> None:
    data = [{"instruction": r.instruction, "input": r.input, "output": r.output} for r in records]
    Path(path).write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def _fraction_of(key: str) -> float:
    digest = hashlib.sha256(key.strip().lower().encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_held_out(records: Sequence[Record], fraction: float) -> tuple[list[Record], list[Record]]:
    """Split by a hash of the instruction: stable across runs and data sets, and a duplicate
    instruction always lands on the same side, so nothing held out leaks into training."""
    train, held = [], []
    for r in records:
        (held if _fraction_of(r.instruction) < fraction else train).append(r)
    return train, held


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]


def chat_prompt(tokenizer: Any, record: Record) -> str:
    """The record as one user turn in the tokenizer's own chat template, ready for the answer."""
    content = record.instruction
    if record.input.strip():
        content = f"{content}\n\n{record.input}"
    messages = [{"role": "user", "content": content}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode_record(
    tokenizer: Any, record: Record, max_len: int, chat: bool = False
) -> Example | None:
    """Tokenise prompt + response + EOS; only response tokens (and EOS) carry labels.

    ``chat``: the prompt is the tokenizer's chat template (as ``/v1/chat/completions`` renders
    it), else the Alpaca prompt. Returns None when the prompt leaves no room for a response."""
    if chat:
        prompt_ids = tokenizer(chat_prompt(tokenizer, record), add_special_tokens=False).input_ids
    else:
        prompt_ids = tokenizer(record.prompt).input_ids
    response_ids = tokenizer(record.output, add_special_tokens=False).input_ids
    response_ids = [*response_ids, tokenizer.eos_token_id]
    if len(prompt_ids) >= max_len:
        return None
    ids = (prompt_ids + response_ids)[:max_len]
    labels = [IGNORE_INDEX] * len(prompt_ids) + ids[len(prompt_ids) :]
    return Example(ids, labels)


def encode_records(
    tokenizer: Any, records: Iterable[Record], max_len: int, chat: bool = False
) -> list[Example]:
    out, skipped = [], 0
    for r in records:
        ex = encode_record(tokenizer, r, max_len, chat)
        if ex is None:
            skipped += 1
        else:
            out.append(ex)
    if skipped:
        logger.warning("skipped %d records whose prompt fills max_len=%d", skipped, max_len)
    return out


def pack_text(tokenizer: Any, texts: Iterable[str], block_size: int) -> list[Example]:
    """Concatenate documents (each with BOS … EOS) and cut fixed-size blocks for plain LM loss."""
    stream: list[int] = []
    for t in texts:
        stream.extend(tokenizer(t).input_ids)
        stream.append(tokenizer.eos_token_id)
    blocks = []
    for start in range(0, len(stream) - block_size + 1, block_size):
        ids = stream[start : start + block_size]
        blocks.append(Example(ids, list(ids)))
    return blocks


class ExampleDataset:
    """A list of examples in the ``{"input_ids", "labels"}`` form HF ``Trainer`` expects."""

    def __init__(self, examples: Sequence[Example]) -> None:
        self.examples = list(examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        ex = self.examples[i]
        return {"input_ids": ex.input_ids, "labels": ex.labels}


def pad_batch(features: Sequence[dict[str, list[int]]], pad_id: int) -> dict[str, Any]:
    """Right-pad a batch; labels are padded with IGNORE_INDEX and masked positions get 0 mask."""
    import torch

    width = max(len(f["input_ids"]) for f in features)
    ids = torch.full((len(features), width), pad_id, dtype=torch.long)
    labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(features), width), dtype=torch.long)
    for i, f in enumerate(features):
        n = len(f["input_ids"])
        ids[i, :n] = torch.tensor(f["input_ids"])
        labels[i, :n] = torch.tensor(f["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}
