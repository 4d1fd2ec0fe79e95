"""Load a base model as Hugging Face objects: from an HF folder, or from a GGUF file.

A GGUF file is checked (architecture, tensor types), then read by ``transformers``
(``from_pretrained(..., gguf_file=...)``), which dequantizes it to float32. That takes tens of
seconds, so the dequantized model and its tokenizer are written once to a cache folder keyed by the
file's sha256 and read from there afterwards (a plain safetensors folder, bit-identical).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from app.base_ref import sha256_file
from app.model_store import SUPPORTED_MODEL_TYPES, ModelStoreError

logger = logging.getLogger(__name__)

# Tensor types that gguf's dequantizer (and so transformers) reads.
GGUF_TYPES = {
    "F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
    "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
}  # fmt: skip
CACHE_ENV = "SORTEDSERVE_CACHE_DIR"


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "sortedserve")


def check_gguf(path: Path) -> dict[str, Any]:
    """Architecture and tensor types of a GGUF file; one clear error for what we cannot serve."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except Exception as exc:  # gguf raises ValueError/struct errors for a bad file
        raise ModelStoreError(f"{path} is not a readable GGUF file: {exc}") from exc
    arch_field = reader.fields.get("general.architecture")
    arch = arch_field.contents() if arch_field is not None else None
    if arch not in SUPPORTED_MODEL_TYPES:
        raise ModelStoreError(
            f"{path}: GGUF architecture {arch!r} is not supported; SortedServe serves "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    types = sorted({t.tensor_type.name for t in reader.tensors})
    bad = [t for t in types if t not in GGUF_TYPES]
    if bad:
        raise ModelStoreError(
            f"{path}: GGUF quantization type {', '.join(bad)} is not supported "
            f"(readable: {', '.join(sorted(GGUF_TYPES))})"
        )
    return {"architecture": arch, "tensor_types": types}


def gguf_to_folder(path: Path, cache_dir: Path | None = None) -> Path:
    """An HF folder holding ``path`` dequantized to float32 (made once, then reused)."""
    check_gguf(path)
    sha = sha256_file(path)
    root = (cache_dir or default_cache_dir()) / "gguf"
    folder = root / f"{path.stem}-{sha[:16]}"
    if (folder / "model.safetensors").is_file() and (folder / "config.json").is_file():
        return folder
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("dequantizing %s to float32 (once; cached in %s)", path.name, folder)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32
        )
    except Exception as exc:  # transformers' GGUF reader raises many kinds
        raise ModelStoreError(f"{path} cannot be read by transformers: {exc}") from exc
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=root))
    try:
        _save_plain(model, tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "source.txt").write_text(f"{path.name}\nsha256 {sha}\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)  # atomic: a crash never leaves a half-written cache
    return folder


def _save_plain(model: Any, folder: Path) -> None:
    """Weights and config as a plain float checkpoint (transformers refuses to re-save a model
    it read from GGUF, since it marks it quantized; the tensors are already dequantized)."""
    from safetensors.torch import save_file

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    if getattr(config, "tie_word_embeddings", False):
        tensors.pop("lm_head.weight", None)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(folder)
    model.generation_config.save_pretrained(folder)


def hf_folder(path: Path, cache_dir: Path | None = None) -> Path:
    """The HF folder for a model path: itself, or the dequantized cache of its GGUF."""
    from app.base_ref import find_gguf

    gguf = find_gguf(path)
    return gguf_to_folder(gguf, cache_dir) if gguf is not None else path


def load_hf(path: Path, cache_dir: Path | None = None) -> tuple[Any, Any]:
    """``(model, tokenizer)`` in float32 on the CPU, from an HF folder, a GGUF file, or an
    adapter folder (merged into its base)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from app.base_ref import is_adapter

    adapter = is_adapter(path)
    folder = path if adapter else hf_folder(path, cache_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as exc:
        raise ModelStoreError(f"the tokenizer in {str(path)!r} cannot be loaded: {exc}") from exc
    if adapter:
        from app.engine.adapter import merged_model

        model, _, _ = merged_model(path, cache_dir)
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        except Exception as exc:
            raise ModelStoreError(f"the model in {str(path)!r} cannot be loaded: {exc}") from exc
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
