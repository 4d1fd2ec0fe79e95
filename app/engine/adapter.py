"""Load an adapter checkpoint: a PEFT LoRA adapter + ``sorted.json`` naming its base.

The base (HF folder, GGUF file, or a file inside an installed package) is found and checked against
the recorded version and sha256, loaded as a Hugging Face model, and the adapter is merged into it
once with PEFT, so serving costs the same as a full checkpoint. Tokenizer, chat template and EOS
ids come from the adapter folder (what the run trained with).

For the integer weight formats the loader also keeps the base's own linear weights and the LoRA
factors (:class:`~app.engine.side_path.AdapterFactors`): those formats quantize the base and run
the update beside it, in float.
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


def merge_adapter(base_model: Any, folder: Path, keep_factors: bool = False) -> tuple[Any, Any]:
    """``(model, factors)``: ``base_model`` with the PEFT adapter in ``folder`` merged into its
    weights, and (with ``keep_factors``) the adapter's :class:`AdapterFactors` taken before the
    merge (None for an adapter that is not plain LoRA on linear layers)."""
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
    factors = lora_factors(peft_model) if keep_factors else None
    return peft_model.merge_and_unload(), factors


def lora_factors(peft_model: Any) -> Any:
    """The base weights and LoRA factors of every adapted linear of ``peft_model`` (unmerged),
    by Hugging Face weight name; None where an adapted layer is not plain LoRA on a linear (DoRA,
    a LoRA bias, an embedding...), which the side path does not compute."""
    import torch
    from peft.tuners.lora import LoraLayer

    from app.engine.side_path import AdapterFactors

    factors = AdapterFactors()
    prefix = "base_model.model."
    for name, module in peft_model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        active = [a for a in module.active_adapters if a in module.lora_A]
        plain = (
            isinstance(module.base_layer, torch.nn.Linear)
            and len(active) == 1
            and not module.use_dora.get(active[0], False)
            and module.lora_B[active[0]].bias is None
            and not module.fan_in_fan_out
        )
        if not plain:
            logger.warning(
                "%s is not plain LoRA on a linear: int8/int4 quantize the merged weights, which "
                "may round the adapter's update away",
                name,
            )
            return None
        adapter = active[0]
        key = name.removeprefix(prefix) + ".weight"
        with torch.no_grad():
            factors.base[key] = module.base_layer.weight.detach().float().clone()
            factors.a[key] = module.lora_A[adapter].weight.detach().float().clone()
            scale = float(module.scaling[adapter])
            factors.b[key] = module.lora_B[adapter].weight.detach().float() * scale
    return factors


def merged_model(
    folder: Path, cache_dir: Path | None = None, keep_factors: bool = False
) -> tuple[Any, Path, Any]:
    """``(model, base_folder, factors)``: the adapter's base, checked and loaded in float32, with
    the adapter merged into it, and its factors (see :func:`merge_adapter`)."""
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
    model, factors = merge_adapter(model, folder, keep_factors)
    logger.info("merged adapter %s into its base %s", folder, base.ref)
    return model, base_folder, factors


def load_adapter_checkpoint(
    folder: Path, cache_dir: Path | None = None, keep_factors: bool = False
) -> Any:
    """A :class:`~app.engine.loader.Checkpoint` of the merged adapter (with its factors in
    ``adapter`` when ``keep_factors``)."""
    from app.engine.loader import checkpoint_from_model

    model, base_folder, factors = merged_model(folder, cache_dir, keep_factors)
    meta = read_sorted_meta(folder, num_layers=int(model.config.num_hidden_layers))
    ckpt = checkpoint_from_model(folder, model, meta, folder, base_folder)
    ckpt.adapter = factors
    return ckpt
