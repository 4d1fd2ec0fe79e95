"""``python -m app train``: Sorted Fine-Tuning (or the SFT baseline) of an HF checkpoint."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

logger = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, type=Path, help="base HF checkpoint folder")
    p.add_argument(
        "--data",
        required=True,
        type=Path,
        nargs="+",
        help="Alpaca-format JSON/JSONL file(s) with instruction, input, output",
    )
    p.add_argument("--out", required=True, type=Path, help="folder to write the checkpoint to")
    p.add_argument(
        "--method",
        choices=["soft", "sft"],
        default="soft",
        help="soft: mean loss over every exit (default); sft: the last layer only (baseline)",
    )
    p.add_argument("--exits", help="comma-separated exits, e.g. 3,6,9,12 (last layer always added)")
    p.add_argument(
        "--exit-every", type=int, help="an exit every N layers (last layer always added)"
    )
    p.add_argument(
        "--eval-data", type=Path, help="held-out Alpaca file (default: split off --held-out)"
    )
    p.add_argument(
        "--held-out", type=float, default=0.05, help="fraction held out when no --eval-data"
    )
    p.add_argument("--epochs", type=float, default=2.0, help="training epochs (default 2)")
    p.add_argument(
        "--max-steps", type=int, default=-1, help="stop after N steps (overrides epochs)"
    )
    p.add_argument("--lr", type=float, default=2e-5, help="peak learning rate (default 2e-5)")
    p.add_argument("--batch-size", type=int, default=8, help="per-device batch size")
    p.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    p.add_argument("--max-len", type=int, default=512, help="truncate examples to N tokens")
    p.add_argument("--seed", type=int, default=42, help="random seed")
    p.add_argument(
        "--save-dtype",
        choices=["float32", "bfloat16", "float16"],
        default="float32",
        help="dtype of the saved weights",
    )


def run(args: argparse.Namespace) -> int:
    from app.model_store import ModelStoreError
    from app.training.data import DataError

    try:
        return _run(args)
    except (DataError, ModelStoreError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from app.model_store import read_config
    from app.training.data import encode_records, load_alpaca, split_held_out
    from app.training.evaluate import format_table
    from app.training.soft import parse_exits
    from app.training.train import TrainOptions, run_trainer, save_checkpoint, train_exits

    config = read_config(args.model)
    num_layers = int(config["num_hidden_layers"])
    exits = parse_exits(args.exits, args.exit_every, num_layers)
    records = [r for path in args.data for r in load_alpaca(path)]
    if args.eval_data:
        train_records, held = records, load_alpaca(args.eval_data)
    else:
        train_records, held = split_held_out(records, args.held_out)
    logger.info("%d training records, %d held out", len(train_records), len(held))
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    train_examples = encode_records(tokenizer, train_records, args.max_len)
    eval_examples = encode_records(tokenizer, held, args.max_len)
    if not train_examples:
        raise ValueError("no training examples left after tokenisation")
    opts = TrainOptions(
        method=args.method,
        epochs=args.epochs,
        max_steps=args.max_steps,
        lr=args.lr,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        seed=args.seed,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    trained = train_exits(args.method, exits, num_layers)
    run_trainer(
        model, tokenizer, train_examples, trained, opts, log_path=args.out / "train_log.json"
    )
    meta = save_checkpoint(
        model,
        tokenizer,
        args.out,
        exits=trained,
        method=args.method,
        eval_examples=eval_examples,
        eval_name=str(args.eval_data or f"held-out {args.held_out:.0%} of {len(records)} records"),
        training={
            "base": str(args.model),
            "data": [str(p) for p in args.data],
            "epochs": args.epochs,
            "max_steps": args.max_steps,
            "lr": args.lr,
            "batch_size": args.batch_size * args.grad_accum,
            "seed": args.seed,
        },
        dtype=args.save_dtype,
        eval_exits=exits,
    )
    if meta.eval:
        by_exit = {int(k): v for k, v in meta.eval["by_exit"].items()}
        logger.info("held-out loss per exit:\n%s", format_table(by_exit, num_layers))
    logger.info("wrote %s", args.out)
    return 0
