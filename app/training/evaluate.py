"""Held-out loss and perplexity at every exit."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from app.training.data import IGNORE_INDEX, Example, pad_batch
from app.training.soft import exit_losses


@torch.inference_mode()
def evaluate_exits(
    model: Any,
    examples: Sequence[Example],
    exits: Sequence[int],
    pad_id: int,
    batch_size: int = 8,
) -> dict[int, float]:
    """Token-weighted mean cross-entropy (nats) at each exit over the labelled tokens."""
    model.eval()
    device = next(model.parameters()).device
    sums = dict.fromkeys(exits, 0.0)
    tokens = 0
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    for start in range(0, len(order), batch_size):
        chunk = [examples[i] for i in order[start : start + batch_size]]
        batch = pad_batch([{"input_ids": e.input_ids, "labels": e.labels} for e in chunk], pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        if n == 0:
            continue
        losses = exit_losses(
            model, batch["input_ids"], batch["labels"], exits, batch["attention_mask"]
        )
        for k, v in losses.items():
            sums[k] += float(v) * n
        tokens += n
    if tokens == 0:
        raise ValueError("no labelled tokens to evaluate")
    return {k: sums[k] / tokens for k in exits}


def format_table(by_exit: dict[int, float], num_layers: int) -> str:
    lines = ["exit  layers   loss    ppl", "----  ------  ------  --------"]
    for k in sorted(by_exit):
        loss = by_exit[k]
        lines.append(f"{k:>4}  {k / num_layers:>6.0%}  {loss:6.3f}  {math.exp(loss):8.2f}")
    return "\n".join(lines)
