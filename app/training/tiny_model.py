"""``python -m app build-tiny``: the recipe that makes the 3.4 M-parameter test fixtures
``model_store/tiny`` (SoFT) and ``model_store/tiny-sft`` (SFT) from ``../shared/data``, end to end,
on CPU or GPU, with nothing pretrained. (The served default, Sorted SmolLM2-135M-Instruct, is
made by ``make default-model`` with ``python -m app train``.)

1. split the instruction sets (held-out by instruction hash, excluded from every later step);
2. train a byte-level BPE tokenizer on the plain text and the training responses;
3. pretrain a small LLaMA-architecture model with the plain LM loss on that text;
4. from the same base, with the same data, steps and seed: SoFT (every exit) and SFT (last layer);
5. evaluate both on the held-out split at every exit and write checkpoints and model cards.
"""

from __future__ import annotations

import argparse
import logging
import platform
import sys
from pathlib import Path

logger = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", type=Path, default=Path("../shared/data"), help="shared data folder")
    p.add_argument("--out", type=Path, default=Path("model_store"), help="model store folder")
    p.add_argument("--work", type=Path, default=Path("runs/tiny"), help="scratch folder")
    p.add_argument(
        "--heldout-out",
        type=Path,
        default=Path("bench/data/heldout.json"),
        help="where to write the held-out instructions",
    )
    p.add_argument("--held-out", type=float, default=0.05, help="held-out fraction")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=384)
    p.add_argument("--context", type=int, default=512, help="max_position_embeddings")
    p.add_argument(
        "--tie-embeddings",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="share the input embedding with the LM head (default: untied, as in LLaMA)",
    )
    p.add_argument("--block-size", type=int, default=256, help="pretraining sequence length")
    p.add_argument("--pretrain-steps", type=int, default=600)
    p.add_argument("--pretrain-lr", type=float, default=1.5e-3)
    p.add_argument("--pretrain-batch", type=int, default=16)
    p.add_argument("--finetune-steps", type=int, default=150)
    p.add_argument("--finetune-lr", type=float, default=5e-4)
    p.add_argument("--finetune-batch", type=int, default=16)
    p.add_argument("--max-len", type=int, default=384, help="fine-tuning truncation")
    p.add_argument("--exits", default="3,6,9,12", help="SoFT exits")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument(
        "--threads",
        type=int,
        help="torch CPU threads (1 is fastest on a 2-core machine that is doing other work)",
    )
    p.add_argument("--save-dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument(
        "--methods",
        default="soft,sft",
        help="which fine-tunes to run from the base: soft, sft or both (default soft,sft); "
        "two processes with one method each may run side by side",
    )
    p.add_argument(
        "--stage",
        choices=["all", "pretrain", "finetune"],
        default="all",
        help="run everything, or only pretraining, or only fine-tuning from --work's base",
    )


def run(args: argparse.Namespace) -> int:
    from app.training.data import DataError

    try:
        return build(args)
    except (DataError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def build(args: argparse.Namespace) -> int:
    """Split the data, then run the stages of ``--stage`` (tiny_stages.py)."""
    import torch

    from app.training.data import save_alpaca, split_held_out
    from app.training.tiny_stages import finetune, pretrain, read_records, read_texts, write_cards

    if args.threads:
        torch.set_num_threads(args.threads)
    machine = f"{platform.machine()}, {torch.get_num_threads()} torch threads, " + (
        f"CUDA {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "CPU"
    )
    records = read_records(args.data)
    train_records, held = split_held_out(records, args.held_out)
    args.heldout_out.parent.mkdir(parents=True, exist_ok=True)
    save_alpaca(held, args.heldout_out)
    logger.info(
        "%d training records, %d held out -> %s", len(train_records), len(held), args.heldout_out
    )
    base_dir = args.work / "base"
    if args.stage in ("all", "pretrain"):
        # the tokenizer and the base also see the training responses, never the held-out ones
        pretrain(args, read_texts(args.data) + [r.output for r in train_records], base_dir)
    if args.stage == "pretrain":
        return 0
    finetune(args, train_records, held, base_dir, machine)
    write_cards(args, held=len(held), trained=len(train_records))
    return 0
