"""The Sorted Fine-Tuning loss and a Hugging Face ``Trainer`` that optimises it.

SoFT (arXiv 2309.08968): the loss is the mean, over the trained exits k, of the cross-entropy of
``lm_head(final_norm(h_k))`` with the model's own final norm and shared head. ``method="sft"`` is
the same code with the last layer as the only exit, which is ordinary supervised fine-tuning.

Memory: each exit's head projection runs under activation checkpointing, one exit at a time, so the
logits of only one exit are ever alive (in the forward and again in the backward), and only the
positions that carry a label are projected at all.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers import Trainer

from app.training.data import IGNORE_INDEX

logger = logging.getLogger(__name__)


class ExitError(ValueError):
    """Exits that do not fit the model."""


def parse_exits(spec: str | None, every: int | None, num_layers: int) -> list[int]:
    """Exits from ``--exits 3,6,9,12`` or ``--exit-every N``; the last layer is always an exit."""
    if spec and every:
        raise ExitError("give --exits or --exit-every, not both")
    if spec:
        try:
            exits = {int(x) for x in spec.split(",") if x.strip()}
        except ValueError as exc:
            raise ExitError(f"--exits must be comma-separated layer counts, got {spec!r}") from exc
    elif every:
        if every < 1:
            raise ExitError("--exit-every must be at least 1")
        exits = set(range(every, num_layers + 1, every))
    else:
        exits = set()
    bad = sorted(k for k in exits if not 1 <= k <= num_layers)
    if bad:
        raise ExitError(f"exits {bad} are outside the model's layers 1..{num_layers}")
    exits.add(num_layers)
    return sorted(exits)


def _decoder(model: Any) -> Any:
    # LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, or a PEFT model wrapping one
    return model.get_decoder()


def _exit_loss_sum(
    h: torch.Tensor,
    target: torch.Tensor,
    norm: Any,
    head: Any,
    apply_norm: bool,
    teacher: torch.Tensor | None = None,
    distill: float = 0.0,
) -> torch.Tensor:
    x = norm(h) if apply_norm else h
    logits = head(x).float()
    total = F.cross_entropy(logits, target, reduction="sum")
    if teacher is not None and distill > 0:
        # KL(teacher || exit), summed over positions; teacher holds log-probabilities
        logp = F.log_softmax(logits, dim=-1)
        kl = F.kl_div(logp, teacher, log_target=True, reduction="sum")
        total = total + distill * kl
    return total


def exit_losses(
    model: Any,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    exits: Sequence[int],
    attention_mask: torch.Tensor | None = None,
    forward_model: Any | None = None,
    teacher: torch.Tensor | None = None,
    distill: float = 0.0,
) -> dict[int, torch.Tensor]:
    """Mean next-token cross-entropy at each exit over the labelled positions.

    ``forward_model`` is the (possibly DDP-wrapped) model to call; ``model`` the unwrapped one
    whose final norm and head are reused at every exit. With ``teacher`` (log-probabilities at
    the labelled positions, see :func:`teacher_logprobs`) each exit's loss adds ``distill`` times
    its KL divergence from the teacher."""
    runner = forward_model if forward_model is not None else model
    out = runner(
        input_ids=input_ids,
        attention_mask=attention_mask,
        output_hidden_states=True,
        logits_to_keep=1,
        use_cache=False,
    )
    hidden = out.hidden_states  # embeddings, then each layer; HF applies the final norm to the last
    num_layers = len(hidden) - 1
    target = labels[:, 1:]
    keep = target != IGNORE_INDEX
    count = keep.sum().clamp(min=1)
    target = target[keep]
    norm, head = _decoder(model).norm, model.get_output_embeddings()
    losses = {}
    for k in exits:
        h = hidden[k][:, :-1][keep]
        apply_norm = k != num_layers
        if torch.is_grad_enabled():
            total = checkpoint(
                _exit_loss_sum,
                h,
                target,
                norm,
                head,
                apply_norm,
                teacher,
                distill,
                use_reentrant=False,
            )
        else:
            total = _exit_loss_sum(h, target, norm, head, apply_norm, teacher, distill)
        losses[k] = total / count
    return losses


@torch.no_grad()
def teacher_logprobs(
    model: Any, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: Any
) -> torch.Tensor:
    """The frozen base's full-depth log-probabilities at the labelled positions (a PEFT model
    with its adapter disabled)."""
    with model.disable_adapter():
        out = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            output_hidden_states=True,
            logits_to_keep=1,
            use_cache=False,
        )
        keep = labels[:, 1:] != IGNORE_INDEX
        h = out.hidden_states[-1][:, :-1][keep]  # HF has applied the final norm
        return F.log_softmax(model.get_output_embeddings()(h).float(), dim=-1)


def sample_exits(exits: Sequence[int], sample: int, seed: int, step: int) -> list[int]:
    """The last exit and ``sample`` of the others, drawn afresh each step (all when 0)."""
    *inner, last = sorted(exits)
    if sample <= 0 or sample >= len(inner):
        return [*inner, last]
    rng = random.Random(seed * 1_000_003 + step)
    return [*sorted(rng.sample(inner, sample)), last]


def sorted_loss(
    losses: dict[int, torch.Tensor],
    num_exits: int | None = None,
    last_weight: float | None = None,
) -> torch.Tensor:
    """The mean over the exits. When ``losses`` holds the last exit and a uniform sample of the
    other ``num_exits - 1``, the sample is scaled so that the expectation is that mean.

    ``last_weight`` (0..1) gives the last exit that share of the loss and the mean of the others
    the rest, instead of the paper's equal ``1 / num_exits`` for every exit."""
    values = list(losses.values())
    if last_weight is None and (num_exits is None or len(values) == num_exits):
        return torch.stack(values).mean()
    *inner, last = (losses[k] for k in sorted(losses))
    if not inner:
        return last
    if last_weight is not None:
        return last_weight * last + (1.0 - last_weight) * torch.stack(inner).mean()
    scale = (num_exits - 1) / max(1, len(inner))
    return (last + scale * torch.stack(inner).sum()) / num_exits


class SortedTrainer(Trainer):
    """``Trainer`` whose loss is the mean of the exits' losses (SoFT) or the last exit's (SFT)."""

    def __init__(
        self,
        *args: Any,
        exits: Sequence[int],
        exit_sample: int = 0,
        distill: float = 0.0,
        last_weight: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.exits = list(exits)
        self.exit_sample = exit_sample
        self.distill = distill
        self.last_weight = last_weight

    def compute_loss(
        self,
        model: Any,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        unwrapped = self.accelerator.unwrap_model(model)
        teacher = None
        if self.distill > 0 and model.training:
            teacher = teacher_logprobs(
                unwrapped, inputs["input_ids"], inputs["labels"], inputs.get("attention_mask")
            )
        step = self.state.global_step
        exits = sample_exits(self.exits, self.exit_sample, self.args.seed, step)
        losses = exit_losses(
            unwrapped,
            inputs["input_ids"],
            inputs["labels"],
            exits,
            attention_mask=inputs.get("attention_mask"),
            forward_model=model,
            teacher=teacher,
            distill=self.distill,
        )
        loss = sorted_loss(losses, len(self.exits), self.last_weight)
        if self.state.global_step % max(1, self.args.logging_steps) == 0 and model.training:
            self._last_exit_losses = {k: round(v.item(), 4) for k, v in losses.items()}
        return (loss, None) if return_outputs else loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        last = getattr(self, "_last_exit_losses", None)
        if last and "loss" in logs:
            logs = {**logs, **{f"loss_exit_{k}": v for k, v in last.items()}}
        super().log(logs, *args, **kwargs)
