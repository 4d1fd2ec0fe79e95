"""``python -m app eval-exits``: held-out loss and perplexity at every exit of a checkpoint."""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path

logger = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default="model_store/default",
        help="checkpoint: HF folder, adapter folder, .gguf file or pkg:<distribution>/<file>",
    )
    p.add_argument("--data", type=Path, required=True, help="Alpaca-format JSON/JSONL to score")
    p.add_argument(
        "--exits", help="comma-separated exits (default: sorted.json's exits, or every layer)"
    )
    p.add_argument("--max-len", type=int, default=512, help="truncate examples to N tokens")
    p.add_argument("--batch-size", type=int, default=8, help="examples per forward pass")
    p.add_argument("--json", type=Path, help="also write the result as JSON to this file")
    p.add_argument(
        "--chat",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="render examples with the chat template (default: as the checkpoint was trained)",
    )


def run(args: argparse.Namespace) -> int:
    from app.model_store import ModelStoreError
    from app.training.data import DataError

    try:
        result = evaluate_checkpoint(
            args.model,
            args.data,
            args.exits,
            max_len=args.max_len,
            batch_size=args.batch_size,
            chat=args.chat,
        )
    except (DataError, ModelStoreError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    from app.training.evaluate import format_table

    by_exit = {int(k): v for k, v in result["by_exit"].items()}
    print(format_table(by_exit, result["num_layers"]))
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


def evaluate_checkpoint(
    model_ref: str | Path,
    data: Path,
    exits_spec: str | None = None,
    max_len: int = 512,
    batch_size: int = 8,
    chat: bool | None = None,
) -> dict:
    """Held-out loss per exit of one checkpoint (exits: the spec, else sorted.json's, else every
    layer). ``chat=None`` renders prompts as the checkpoint was trained (sorted.json's
    ``training.chat_template``), else with the chat template when the tokenizer has one."""
    from app.base_model import load_hf
    from app.base_ref import resolve
    from app.model_store import SORTED_FILE, read_sorted_meta
    from app.training.data import encode_records, load_alpaca
    from app.training.evaluate import evaluate_exits
    from app.training.soft import parse_exits

    path = resolve(model_ref)
    model, tokenizer = load_hf(path)
    num_layers = int(model.config.num_hidden_layers)
    meta = None
    if path.is_dir() and (path / SORTED_FILE).is_file():
        meta = read_sorted_meta(path, num_layers)
    if exits_spec:
        exits = parse_exits(exits_spec, None, num_layers)
    elif meta is not None:
        exits = sorted({*meta.exits, *(int(k) for k in meta.eval.get("by_exit", {}))})
    else:
        exits = list(range(1, num_layers + 1))
    if chat is None:
        trained = (meta.training or {}).get("chat_template") if meta is not None else None
        chat = bool(tokenizer.chat_template) if trained is None else bool(trained)
    examples = encode_records(tokenizer, load_alpaca(data), max_len, chat)
    if not examples:
        raise ValueError(f"{data} yields no examples")
    by_exit = evaluate_exits(model, examples, exits, tokenizer.pad_token_id, batch_size)
    return {
        "model": str(model_ref),
        "data": str(data),
        "examples": len(examples),
        "chat_template": chat,
        "num_layers": num_layers,
        "metric": "loss",
        "by_exit": {str(k): round(v, 4) for k, v in by_exit.items()},
        "perplexity_by_exit": {str(k): round(math.exp(v), 2) for k, v in by_exit.items()},
    }
