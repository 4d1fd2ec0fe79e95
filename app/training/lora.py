"""LoRA SoFT with PEFT: low-rank adapters on all attention and MLP projections; norms train in full.

The final norm is shared by every exit, so it must be free to move; the per-layer norms are cheap
and are trained too. PEFT stores them as ``modules_to_save`` beside the LoRA matrices, so the
adapter folder holds all that SoFT changed.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
NORM_MODULES = ["input_layernorm", "post_attention_layernorm", "norm"]


def wrap_lora(model: Any, rank: int, alpha: float | None = None, dropout: float = 0.0) -> Any:
    """``model`` as a PEFT model with LoRA of ``rank`` (alpha defaults to 2 × rank)."""
    from peft import LoraConfig, get_peft_model

    if rank < 1:
        raise ValueError(f"--lora-rank must be at least 1, got {rank}")
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha if alpha is not None else 2 * rank,
        lora_dropout=dropout,
        target_modules=TARGET_MODULES,
        modules_to_save=NORM_MODULES,
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in peft_model.parameters())
    logger.info("LoRA rank %d: %.2fM of %.1fM parameters train", rank, trainable / 1e6, total / 1e6)
    return peft_model


def save_adapter(peft_model: Any, out_dir: Path, base_name: str | None = None) -> None:
    """``adapter_config.json`` and ``adapter_model.safetensors`` (float32), as PEFT writes them.

    ``base_name`` replaces the base's local path in the config (and PEFT's card), which would
    name a folder of this machine; ``sorted.json`` holds the base's full reference."""
    if base_name is not None:
        for config in peft_model.peft_config.values():
            config.base_model_name_or_path = base_name
    peft_model.save_pretrained(out_dir)


def merged(peft_model: Any) -> Any:
    """The plain model with the adapter folded into its weights (the PEFT model is used up)."""
    return peft_model.merge_and_unload()
