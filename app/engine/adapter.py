"""Load an adapter checkpoint: a PEFT LoRA adapter + ``sorted.json`` naming its base.

The base (HF folder, GGUF file, or a file inside an installed package) is found and checked against
the recorded version and sha256, loaded as a Hugging Face model, and the adapter is merged into it
once with PEFT, so serving costs the same as a full checkpoint. Tokenizer, chat template and EOS
ids come from the adapter folder (what the run trained with).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from app.base_ref import BaseRef, read_json, resolve_base
from app.model_store import SORTED_FILE, ModelStoreError, check_architecture, read_sorted_meta

logger = logging.getLogger(__name__)


def adapter_base(folder: Path) -> BaseRef:
    """The base named by an adapter folder's ``sorted.json``."""
    path = folder / SORTED_FILE
    if not path.is_file():
        raise ModelStoreError(f"adapter folder {str(folder)!r} has no {SORTED_FILE}")
    training = read_json(path).get("training") or {}
    if "base" not in training:
        raise ModelStoreError(f"{path}: training.base (the adapter's base model) is missing")
    return BaseRef.from_json(training["base"], str(path))


def merge_adapter(base_model: Any, folder: Path) -> Any:
    """``base_model`` with the PEFT adapter in ``folder`` merged into its weights."""
    from peft import PeftModel

    config = read_json(folder / "adapter_config.json")
    try:
        peft_model = PeftModel.from_pretrained(base_model, str(folder))
    except Exception as exc:  # PEFT raises ValueError/RuntimeError for a mismatched adapter
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelStoreError(
            f"{folder / 'adapter_config.json'}: the adapter (rank {config.get('r')}, targets "
            f"{config.get('target_modules')}) does not fit its base: {first}"
        ) from exc
    return peft_model.merge_and_unload()


def merged_model(folder: Path, cache_dir: Path | None = None) -> tuple[Any, Path]:
    """``(model, base_folder)``: the adapter's base, checked and loaded in float32, with the
    adapter merged into it."""
    import torch
    from transformers import AutoModelForCausalLM

    from app.base_model import hf_folder

    base = adapter_base(folder)
    base_folder = hf_folder(resolve_base(base, str(folder / SORTED_FILE)), cache_dir)
    try:
        model = AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.float32)
    except Exception as exc:
        raise ModelStoreError(f"the base {base.ref} cannot be loaded: {exc}") from exc
    check_architecture(model.config.to_dict())
    model = merge_adapter(model, folder)
    logger.info("merged adapter %s into its base %s", folder, base.ref)
    return model, base_folder


def load_adapter_checkpoint(folder: Path, cache_dir: Path | None = None) -> Any:
    """A :class:`~app.engine.loader.Checkpoint` of the merged adapter."""
    from app.engine.loader import checkpoint_from_model

    model, base_folder = merged_model(folder, cache_dir)
    meta = read_sorted_meta(folder, num_layers=int(model.config.num_hidden_layers))
    return checkpoint_from_model(folder, model, meta, folder, base_folder)
