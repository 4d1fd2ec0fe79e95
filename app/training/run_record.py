"""What a ``python -m app train`` run records about itself.

Two records, kept apart from the training itself because they are the run's contract with the
future: ``run_settings.json`` in the work folder, which a ``--resume`` must match (continuing a run
with another learning rate or other data would silently make a checkpoint that no command
describes), and the ``training`` block of ``sorted.json``, from which the model card is written.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

SETTINGS_FILE = "run_settings.json"
# What a resumed run must share with the run it continues.
RESUME_KEYS = (
    "model", "data", "method", "exits", "exit_every", "eval_data", "held_out", "epochs",
    "max_steps", "lr", "batch_size", "grad_accum", "max_len", "seed", "lora_rank", "lora_alpha",
    "chat", "exit_sample", "last_weight", "distill", "warmup",
)  # fmt: skip


def run_settings(args: argparse.Namespace, chat: bool) -> dict[str, Any]:
    """The resume-relevant flags as JSON values (paths as strings), with ``chat`` resolved."""
    settings = {k: getattr(args, k) for k in RESUME_KEYS}
    return json.loads(json.dumps(settings, default=str)) | {"chat": chat}


def check_resume(work: Path, settings: dict, resume: bool) -> None:
    """Record the run's settings in ``work``; refuse a ``--resume`` whose settings differ."""
    path = work / SETTINGS_FILE
    if resume and path.is_file():
        old = json.loads(path.read_text())
        diff = sorted(k for k in RESUME_KEYS if old.get(k) != settings.get(k))
        if diff:
            changes = ", ".join(f"{k}: {old.get(k)!r} -> {settings.get(k)!r}" for k in diff)
            raise ValueError(f"--resume: {path} was made with other settings ({changes})")
    work.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings, indent=1) + "\n")


def training_record(
    args: argparse.Namespace, base: dict[str, Any], chat: bool, wall_s: float, threads: int
) -> dict[str, Any]:
    """The ``training`` block of ``sorted.json``: the base, the data, the recipe, the exact
    command and the wall time."""
    return {
        "base": base,
        "data": [str(p) for p in args.data],
        "chat_template": chat,
        "lora": (
            {"rank": args.lora_rank, "alpha": args.lora_alpha or 2 * args.lora_rank}
            if args.lora_rank
            else None
        ),
        "epochs": args.epochs,
        "max_steps": args.max_steps,
        "lr": args.lr,
        "batch_size": args.batch_size * args.grad_accum,
        "max_len": args.max_len,
        "exit_sample": args.exit_sample,
        "distill": args.distill,
        "last_weight": args.last_weight,
        "seed": args.seed,
        "train_wall_s": round(wall_s),
        "threads": threads,
        "command": "python -m app train " + shlex.join(sys.argv[2:]),
    }
