"""Cheap checks that a model reference can be served, before uvicorn and torch are imported.

Each failure is one :class:`~app.model_store.ModelStoreError` naming the file and what is wrong:
a GGUF of an unsupported architecture or tensor type, an adapter whose base is missing or has the
wrong sha256, a folder without a supported config, a bad ``sorted.json``. (Whether an adapter's
rank and targets fit its base is only known when PEFT loads it, so the engine's load reports it.)
"""

from __future__ import annotations

from pathlib import Path

from app.base_ref import find_gguf, is_adapter, read_json, resolve, resolve_base
from app.model_store import ModelStoreError, check_architecture, read_config, read_sorted_meta


def check_servable(ref: str | Path) -> Path:
    """The local path of ``ref`` once it passed the cheap checks."""
    path = resolve(ref)
    if is_adapter(path):
        from app.engine.adapter import adapter_base  # torch-free at import

        read_json(path / "adapter_config.json")
        base_path = resolve_base(adapter_base(path), str(path / "sorted.json"))
        check_servable(base_path)
        return path
    gguf = find_gguf(path)
    if gguf is not None:
        from app.base_model import check_gguf

        check_gguf(gguf)
        return path
    try:
        config = read_config(path)
        check_architecture(config)
        read_sorted_meta(path, int(config["num_hidden_layers"]))
    except KeyError as exc:
        raise ModelStoreError(f"{path / 'config.json'} has no {exc}") from exc
    return path
