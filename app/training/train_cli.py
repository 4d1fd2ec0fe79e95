"""``python -m app train``: Sorted Fine-Tuning (or the SFT baseline) of a checkpoint.

The base is an HF folder, a GGUF file, or ``pkg:<distribution>/<file>`` (a file inside an installed
Python package). With ``--lora-rank`` the run trains LoRA adapters (PEFT) plus the norms and writes
an adapter checkpoint that names its base; without it, every weight trains and a full checkpoint is
written. Intermediate state goes to ``--work`` every ``--save-steps`` steps; ``--resume`` continues
a run with the same settings."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

logger = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        required=True,
        help="base: an HF checkpoint folder, a .gguf file, or pkg:<distribution>/<file>",
    )
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
        "--lora-rank", type=int, help="train LoRA adapters of this rank (PEFT) and the norms"
    )
    p.add_argument("--lora-alpha", type=float, help="LoRA alpha (default: 2 x rank)")
    p.add_argument(
        "--chat",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="render examples with the tokenizer's chat template (default: when it has one)",
    )
    p.add_argument(
        "--exit-sample",
        type=int,
        default=0,
        help="each step, the last exit and N others drawn at random, scaled so that the loss "
        "is the mean over exits in expectation (default 0: every exit every step)",
    )
    p.add_argument(
        "--last-weight",
        type=float,
        help="the full-depth exit's share of the loss, 0..1, the other exits' mean taking the "
        "rest (default: an equal share for every exit, as in the paper)",
    )
    p.add_argument(
        "--distill",
        type=float,
        default=0.0,
        help="add W x KL(frozen base at full depth || exit) to each exit's loss (LoRA only)",
    )
    p.add_argument("--warmup", type=float, default=0.03, help="warm-up fraction of the steps")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument(
        "--work", type=Path, help="folder for resumable trainer state (default: <out>.work)"
    )
    p.add_argument(
        "--save-steps", type=int, default=25, help="save resumable state every N steps (0: never)"
    )
    p.add_argument(
        "--resume", action="store_true", help="continue the run in --work (same settings only)"
    )
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
        return 1


def _run(args: argparse.Namespace) -> int:
    import torch

    from app.base_model import load_hf
    from app.base_ref import ref_for, resolve
    from app.training.data import encode_records, load_alpaca, split_held_out
    from app.training.evaluate import format_table
    from app.training.model_card import write_trained_card
    from app.training.run_record import check_resume, run_settings, training_record
    from app.training.soft import parse_exits
    from app.training.train import TrainOptions, run_trainer, save_checkpoint, train_exits

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.last_weight is not None and not 0.0 <= args.last_weight <= 1.0:
        raise ValueError(f"--last-weight must be between 0 and 1, got {args.last_weight}")
    if args.distill and not args.lora_rank:
        raise ValueError("--distill needs --lora-rank (the teacher is the base without adapter)")
    base = ref_for(args.model)
    model, tokenizer = load_hf(resolve(args.model))
    num_layers = int(model.config.num_hidden_layers)
    exits = parse_exits(args.exits, args.exit_every, num_layers)
    chat = bool(tokenizer.chat_template) if args.chat is None else args.chat
    if chat and not tokenizer.chat_template:
        raise ValueError(f"--chat: the tokenizer of {args.model} has no chat template")
    records = [r for path in args.data for r in load_alpaca(path)]
    # the hash split always keeps the held-out instructions out of training
    train_records, held = split_held_out(records, args.held_out)
    if args.eval_data:
        held = load_alpaca(args.eval_data)
        scored = {r.instruction.strip().lower() for r in held}
        train_records = [r for r in train_records if r.instruction.strip().lower() not in scored]
    logger.info("%d training records, %d held out", len(train_records), len(held))
    train_examples = encode_records(tokenizer, train_records, args.max_len, chat)
    eval_examples = encode_records(tokenizer, held, args.max_len, chat)
    if not train_examples:
        raise ValueError("no training examples left after tokenisation")
    work = args.work or args.out.with_name(args.out.name + ".work")
    check_resume(work, run_settings(args, chat), args.resume)
    if args.lora_rank:
        from app.training.lora import wrap_lora

        model = wrap_lora(model, args.lora_rank, args.lora_alpha)
    opts = TrainOptions(
        method=args.method,
        epochs=args.epochs,
        max_steps=args.max_steps,
        lr=args.lr,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        warmup_ratio=args.warmup,
        seed=args.seed,
        exit_sample=args.exit_sample,
        distill=args.distill,
        last_weight=args.last_weight,
        save_steps=args.save_steps,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    trained = train_exits(args.method, exits, num_layers)
    t0 = time.perf_counter()
    run_trainer(
        model,
        tokenizer,
        train_examples,
        trained,
        opts,
        log_path=args.out / "train_log.json",
        work_dir=work,
        resume=args.resume,
    )
    wall = time.perf_counter() - t0
    meta = save_checkpoint(
        model,
        tokenizer,
        args.out,
        exits=trained,
        method=args.method,
        eval_examples=eval_examples,
        eval_name=str(args.eval_data or f"held-out {args.held_out:.0%} of {len(records)} records"),
        training=training_record(args, base.to_json(), chat, wall, torch.get_num_threads()),
        dtype=args.save_dtype,
        eval_exits=exits,
    )
    write_trained_card(args.out, meta)
    if meta.eval:
        by_exit = {int(k): v for k, v in meta.eval["by_exit"].items()}
        logger.info("held-out loss per exit:\n%s", format_table(by_exit, num_layers))
    logger.info("wrote %s", args.out)
    return 0
