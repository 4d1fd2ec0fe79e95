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
    p.add_argument("--model", type=Path, default=Path("model_store/default"), help="checkpoint")
    p.add_argument("--data", type=Path, required=True, help="Alpaca-format JSON/JSONL to score")
    p.add_argument(
        "--exits", help="comma-separated exits (default: sorted.json's exits, or every layer)"
    )
    p.add_argument("--max-len", type=int, default=512, help="truncate examples to N tokens")
    p.add_argument("--batch-size", type=int, default=8, help="examples per forward pass")
    p.add_argument("--json", type=Path, help="also write the result as JSON to this file")


def run(args: argparse.Namespace) -> int:
    from app.model_store import ModelStoreError
    from app.training.data import DataError

    try:
        result = evaluate_checkpoint(
            args.model, args.data, args.exits, max_len=args.max_len, batch_size=args.batch_size
        )
    except (DataError, ModelStoreError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from app.training.evaluate import format_table

    by_exit = {int(k): v for k, v in result["by_exit"].items()}
    print(format_table(by_exit, result["num_layers"]))
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


def evaluate_checkpoint(
    model_dir: Path,
    data: Path,
    exits_spec: str | None = None,
    max_len: int = 512,
    batch_size: int = 8,
) -> dict:
    """Held-out loss per exit of one checkpoint (exits: the spec, else sorted.json's)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from app.model_store import read_config, read_sorted_meta
    from app.training.data import encode_records, load_alpaca
    from app.training.evaluate import evaluate_exits
    from app.training.soft import parse_exits

    num_layers = int(read_config(model_dir)["num_hidden_layers"])
    if exits_spec:
        exits = parse_exits(exits_spec, None, num_layers)
    else:
        meta = read_sorted_meta(model_dir, num_layers)
        exits = sorted({*meta.exits, *(int(k) for k in meta.eval.get("by_exit", {}))})
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    examples = encode_records(tokenizer, load_alpaca(data), max_len)
    if not examples:
        raise ValueError(f"{data} yields no examples")
    by_exit = evaluate_exits(model, examples, exits, tokenizer.pad_token_id, batch_size)
    return {
        "model": str(model_dir),
        "data": str(data),
        "examples": len(examples),
        "num_layers": num_layers,
        "metric": "loss",
        "by_exit": {str(k): round(v, 4) for k, v in by_exit.items()},
        "perplexity_by_exit": {str(k): round(math.exp(v), 2) for k, v in by_exit.items()},
    }
