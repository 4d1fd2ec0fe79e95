"""Run the SoFT/SFT ``Trainer`` on encoded examples and write the checkpoint folder."""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from transformers import TrainingArguments

from app.model_store import SortedMeta, write_sorted_meta
from app.training.data import Example, ExampleDataset, pad_batch
from app.training.evaluate import evaluate_exits
from app.training.soft import SortedTrainer

logger = logging.getLogger(__name__)


@dataclass
class TrainOptions:
    method: str = "soft"  # "soft": every exit; "sft": the last layer only
    epochs: float = 1.0
    max_steps: int = -1
    lr: float = 2e-5
    batch_size: int = 8
    grad_accum: int = 1
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    scheduler: str = "cosine"
    seed: int = 42
    logging_steps: int = 10
    group_by_length: bool = True
    exit_sample: int = 0  # 0: every exit each step; N: the last and N others drawn each step
    last_weight: float | None = None  # the last exit's share of the loss (None: 1 / exits)
    distill: float = 0.0  # weight of KL(frozen base at full depth || exit), PEFT models only
    save_steps: int = 0  # 0: no intermediate checkpoints; N: one every N steps in the work dir
    extra: dict[str, Any] = field(default_factory=dict)


def train_exits(method: str, exits: Sequence[int], num_layers: int) -> list[int]:
    if method == "sft":
        return [num_layers]
    if method == "soft":
        return list(exits)
    raise ValueError(f"unknown method {method!r}; use soft or sft")


def run_trainer(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    exits: Sequence[int],
    opts: TrainOptions,
    log_path: Path | None = None,
    work_dir: Path | None = None,
    resume: bool = False,
) -> list[dict[str, Any]]:
    """Train ``model`` in place with the mean loss over ``exits``; returns the loss log.

    With ``opts.save_steps`` the trainer state is saved to ``work_dir`` every N steps, and
    ``resume`` continues from the last one there."""
    work = str(work_dir) if work_dir is not None else tempfile.mkdtemp(prefix="sortedserve-train-")
    args = TrainingArguments(
        output_dir=work,
        num_train_epochs=opts.epochs,
        max_steps=opts.max_steps,
        learning_rate=opts.lr,
        per_device_train_batch_size=opts.batch_size,
        gradient_accumulation_steps=opts.grad_accum,
        warmup_steps=opts.warmup_ratio,
        weight_decay=opts.weight_decay,
        lr_scheduler_type=opts.scheduler,
        logging_steps=opts.logging_steps,
        save_strategy="steps" if opts.save_steps else "no",
        save_steps=opts.save_steps or 500,
        save_total_limit=1,
        report_to=[],
        seed=opts.seed,
        data_seed=opts.seed,
        remove_unused_columns=False,
        train_sampling_strategy="group_by_length" if opts.group_by_length else "random",
        dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available(),
        bf16=torch.cuda.is_available(),
        disable_tqdm=False,
    )
    dataset = ExampleDataset(examples)
    trainer = SortedTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=partial(pad_batch, pad_id=tokenizer.pad_token_id),
        exits=exits,
        exit_sample=opts.exit_sample,
        distill=opts.distill,
        last_weight=opts.last_weight,
    )
    t0 = time.perf_counter()
    trainer.train(resume_from_checkpoint=_last_checkpoint(work) if resume else None)
    history = list(trainer.state.log_history)
    logger.info("trained %d steps in %.0f s", trainer.state.global_step, time.perf_counter() - t0)
    if log_path is not None:
        log_path.write_text(json.dumps(history, indent=1) + "\n")
    return history


def _last_checkpoint(work: str) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    last = get_last_checkpoint(work) if Path(work).is_dir() else None
    if last is None:
        logger.warning("--resume: no checkpoint in %s yet; starting from step 0", work)
    else:
        logger.info("resuming from %s", last)
    return last


def save_checkpoint(
    model: Any,
    tokenizer: Any,
    out_dir: Path,
    exits: Sequence[int],
    method: str,
    eval_examples: Sequence[Example],
    eval_name: str,
    training: dict[str, Any],
    dtype: str = "float32",
    eval_exits: Sequence[int] | None = None,
) -> SortedMeta:
    """Save weights (in ``dtype``), tokenizer and ``sorted.json`` with held-out loss per exit.

    A PEFT model is saved as its adapter (float32), then merged to be evaluated. The held-out
    loss is measured on the weights as saved (cast back to float32). The model card is the
    command's to write: ``train`` and ``build-tiny`` describe their checkpoints differently."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "merge_and_unload"):
        from app.training.lora import merged, save_adapter

        base = (training.get("base") or {}) if isinstance(training, dict) else {}
        name = f"pkg:{base['package']}/{base['file']}" if base.get("package") else base.get("path")
        save_adapter(model, out_dir, name)
        model = merged(model)
    else:
        model = model.to(getattr(torch, dtype))
        model.save_pretrained(out_dir)
    num_layers = model.config.num_hidden_layers
    tokenizer.save_pretrained(out_dir)
    eval_block: dict[str, Any] = {}
    if eval_examples:
        by_exit = evaluate_exits(
            model.float(), eval_examples, eval_exits or exits, pad_id=tokenizer.pad_token_id
        )
        eval_block = {
            "dataset": eval_name,
            "metric": "loss",
            "tokens": sum(1 for e in eval_examples for t in e.labels[1:] if t != -100),
            "by_exit": {str(k): round(v, 4) for k, v in by_exit.items()},
            "perplexity_by_exit": {str(k): round(math.exp(v), 2) for k, v in by_exit.items()},
        }
    meta = SortedMeta(
        num_layers=num_layers,
        exits=list(exits),
        method=method,
        eval=eval_block,
        training=training,
    )
    write_sorted_meta(out_dir, meta)
    return meta
