"""Read a model-store folder: config, ``sorted.json``, safetensors weights, tokenizer, EOS ids.

Everything that can be wrong with a folder surfaces here as one :class:`ModelStoreError` sentence
(the CLI prints it as is). The weights come back as plain tensors under their Hugging Face names;
:mod:`app.engine.model` decides what to do with them.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from app.engine.rope import check_rope, rope_type
from app.engine.side_path import AdapterFactors
from app.model_store import (
    ModelStoreError,
    SortedMeta,
    check_architecture,
    read_config,
    read_sorted_meta,
)

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"


@dataclass
class Checkpoint:
    folder: Path
    model_type: str
    hf_config: Any  # transformers.PretrainedConfig, rope parameters standardised
    meta: SortedMeta
    tensors: dict[str, torch.Tensor]
    tokenizer: Any  # a transformers tokenizer
    eos_token_ids: tuple[int, ...]
    max_context: int  # the longest context the reference forward computes identically
    # an adapter's base weights and LoRA factors, kept for the integer formats' side path
    adapter: AdapterFactors | None = None


def load_checkpoint(
    model: str | Path, cache_dir: Path | None = None, keep_adapter: bool = False
) -> Checkpoint:
    """Load ``model``: an HF folder, a GGUF file (or a folder holding one), an adapter folder
    (merged once into its base; with ``keep_adapter`` its base weights and factors are kept too,
    for the integer formats' side path), or ``pkg:<distribution>/<file>``. GGUF weights are
    dequantized (cached under ``cache_dir``, see :mod:`app.base_model`)."""
    from app.base_model import hf_folder
    from app.base_ref import is_adapter, resolve

    path = resolve(model)
    if is_adapter(path):
        from app.engine.adapter import load_adapter_checkpoint

        return load_adapter_checkpoint(path, cache_dir, keep_adapter)
    folder = hf_folder(path, cache_dir)
    ckpt = _load_folder(folder)
    if folder != path:
        # a GGUF model: its own sorted.json (if a folder holds one) is the only metadata
        ckpt.folder = path
        meta_dir = path if path.is_dir() else path.parent
        if (meta_dir / "sorted.json").is_file():
            ckpt.meta = read_sorted_meta(meta_dir, num_layers=ckpt.meta.num_layers)
    return ckpt


def _load_folder(folder: Path) -> Checkpoint:
    raw = read_config(folder)
    model_type = check_architecture(raw)
    hf_config = _hf_config(folder)
    check_rope(hf_config)
    if getattr(hf_config, "hidden_act", "silu") != "silu":
        raise ModelStoreError(f"hidden_act {hf_config.hidden_act!r} is not supported (only silu)")
    meta = read_sorted_meta(folder, num_layers=int(hf_config.num_hidden_layers))
    return Checkpoint(
        folder=folder,
        model_type=model_type,
        hf_config=hf_config,
        meta=meta,
        tensors=read_weights(folder),
        tokenizer=_tokenizer(folder),
        eos_token_ids=_eos_ids(folder, raw),
        max_context=_max_context(model_type, hf_config),
    )


def checkpoint_from_model(
    folder: Path, model: Any, meta: SortedMeta, tokenizer_folder: Path, base_folder: Path
) -> Checkpoint:
    """A checkpoint from an HF model in memory (a merged adapter): its tensors and config, the
    tokenizer of ``tokenizer_folder``, EOS ids of the config and of either folder."""
    hf_config = model.config
    raw = hf_config.to_dict()
    model_type = check_architecture(raw)
    check_rope(hf_config)
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if getattr(hf_config, "tie_word_embeddings", False):
        tensors.pop("lm_head.weight", None)
    eos = set(_eos_ids(tokenizer_folder, raw)) | set(_eos_ids(base_folder, raw))
    return Checkpoint(
        folder=folder,
        model_type=model_type,
        hf_config=hf_config,
        meta=meta,
        tensors=tensors,
        tokenizer=_tokenizer(tokenizer_folder),
        eos_token_ids=tuple(sorted(eos)),
        max_context=_max_context(model_type, hf_config),
    )


def _hf_config(folder: Path) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(folder)
    except Exception as exc:  # transformers raises many kinds for a bad config
        raise ModelStoreError(f"{folder / 'config.json'} cannot be read: {exc}") from exc


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of the checkpoint (one file or an index of shards), on the CPU."""
    from safetensors import safe_open

    index = folder / WEIGHTS_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ModelStoreError(f"{index} is malformed: {exc}") from exc
        files = sorted({folder / name for name in weight_map.values()})
    else:
        files = [folder / WEIGHTS_FILE]
    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        if not path.is_file():
            raise ModelStoreError(f"model folder {str(folder)!r} has no {path.name}")
        try:
            with safe_open(str(path), framework="pt") as handle:
                for name in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    tensors[name] = handle.get_tensor(name)
        except Exception as exc:  # safetensors raises its own error types for corrupt files
            raise ModelStoreError(f"{path} is not a readable safetensors file: {exc}") from exc
    return tensors


def _tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except Exception as exc:
        raise ModelStoreError(f"the tokenizer in {str(folder)!r} cannot be loaded: {exc}") from exc


def _as_ids(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def _eos_ids(folder: Path, raw_config: dict[str, Any]) -> tuple[int, ...]:
    ids = _as_ids(raw_config.get("eos_token_id"))
    gen_path = folder / "generation_config.json"
    if gen_path.is_file():
        try:
            ids += _as_ids(json.loads(gen_path.read_text()).get("eos_token_id"))
        except (json.JSONDecodeError, TypeError, ValueError) as exc:
            raise ModelStoreError(f"{gen_path} is malformed: {exc}") from exc
    return tuple(sorted(set(ids)))


def _max_context(model_type: str, hf_config: Any) -> int:
    limit = int(hf_config.max_position_embeddings)
    window = getattr(hf_config, "sliding_window", None)
    uses_window = model_type == "mistral" or bool(getattr(hf_config, "use_sliding_window", False))
    if window and uses_window and int(window) < limit:
        # Within the window, sliding-window attention is plain causal attention.
        limit = int(window)
    if rope_type(hf_config) == "dynamic":
        logger.info("dynamic RoPE: context capped at max_position_embeddings=%d", limit)
    return limit
