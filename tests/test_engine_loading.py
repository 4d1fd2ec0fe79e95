"""Loading checkpoints: clear one-line errors for bad folders, refusal of other architectures."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from app.engine import Engine, EngineConfig
from app.engine.loader import load_checkpoint
from app.engine.model import Transformer
from app.model_store import ModelStoreError


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _load_error(folder: Path) -> str:
    with pytest.raises(ModelStoreError) as info:
        Engine.from_pretrained(folder, EngineConfig(max_slots=1, max_seq_len=32))
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_folder(tmp_path: Path) -> None:
    assert "does not exist" in _load_error(tmp_path / "nope")


def test_unsupported_architecture_is_refused(tiny_checkpoint: Path, tmp_path: Path) -> None:
    folder = _copy(tiny_checkpoint, tmp_path / "gpt2")
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "gpt2"
    (folder / "config.json").write_text(json.dumps(config))
    message = _load_error(folder)
    assert "'gpt2' is not supported" in message and "llama" in message


def test_corrupted_weights(tiny_checkpoint: Path, tmp_path: Path) -> None:
    folder = _copy(tiny_checkpoint, tmp_path / "corrupt")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert "not a readable safetensors file" in _load_error(folder)
    weights.unlink()
    assert "has no model.safetensors" in _load_error(folder)


def test_bad_sorted_json(tiny_checkpoint: Path, tmp_path: Path) -> None:
    folder = _copy(tiny_checkpoint, tmp_path / "badsorted")
    (folder / "sorted.json").write_text("{not json")
    assert "sorted.json" in _load_error(folder)
    (folder / "sorted.json").write_text(json.dumps({"num_layers": 4, "exits": [2, 9]}))
    assert "outside" in _load_error(folder)


def test_missing_tensor(tiny_checkpoint: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    folder = _copy(tiny_checkpoint, tmp_path / "missing")
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.2.mlp.up_proj.weight"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    assert "model.layers.2.mlp.up_proj.weight" in _load_error(folder)


def test_without_sorted_json_every_layer_is_an_exit(
    tiny_checkpoint: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = _copy(tiny_checkpoint, tmp_path / "plain")
    (folder / "sorted.json").unlink()
    with caplog.at_level(logging.WARNING):
        engine = Engine.from_pretrained(folder, EngineConfig(max_slots=1, max_seq_len=32))
    assert engine.info.exits == (1, 2, 3, 4) and not engine.info.soft_tuned
    assert "not SoFT-tuned" in caplog.text


def test_bfloat16_runs_the_same_code_path(tiny_checkpoint: Path) -> None:
    """CUDA runs bfloat16; the same forward must work in that dtype (here on the CPU)."""
    ckpt = load_checkpoint(tiny_checkpoint)
    ids = torch.tensor(ckpt.tokenizer("Once upon a time").input_ids)
    ref = Transformer.from_checkpoint(ckpt.hf_config, dict(ckpt.tensors), 32, "cpu", torch.float32)
    low = Transformer.from_checkpoint(ckpt.hf_config, ckpt.tensors, 32, "cpu", torch.bfloat16)
    with torch.inference_mode():
        for k in (1, 4):
            want = ref.prefill(ids, k, all_logits=True)
            got = low.prefill(ids, k, all_logits=True)
            assert got.dtype == torch.float32
            assert (got - want).abs().max() < 0.1 * want.abs().max()
