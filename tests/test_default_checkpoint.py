"""The committed tiny test checkpoints (the 3.4 M-parameter model that was the default before
Sorted SmolLM2) load with plain transformers and follow SPEC §2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from app.model_store import read_sorted_meta

STORE = Path(__file__).resolve().parent.parent / "model_store"


@pytest.mark.parametrize("name", ["tiny", "tiny-sft"])
def test_committed_checkpoint_loads_with_plain_transformers(name: str) -> None:
    folder = STORE / name
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(folder)
    meta = read_sorted_meta(folder)
    assert model.config.num_hidden_layers == meta.num_layers >= 12
    raw = json.loads((folder / "sorted.json").read_text())
    assert raw["format"] == 1 and raw["method"] == ("soft" if name == "tiny" else "sft")
    assert raw["eval"]["metric"] == "loss" and raw["training"]["seed"] == 42
    assert sum(f.stat().st_size for f in folder.iterdir()) < 30 * 2**20
    assert (folder / "README.md").is_file()
    ids = tok("Once upon a time", return_tensors="pt").input_ids
    assert ids[0, 0].item() == tok.bos_token_id
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all()
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert rendered.endswith("### Instruction:\nHi\n\n### Response:\n")


def test_tiny_is_soft_tuned_with_a_ladder_of_exits() -> None:
    meta = read_sorted_meta(STORE / "tiny")
    layers = meta.num_layers
    assert len(meta.exits) >= 4 and meta.exits[0] <= layers // 3 and meta.exits[-1] == layers
    losses = [meta.eval["by_exit"][str(k)] for k in meta.exits]
    assert losses == sorted(losses, reverse=True), "held-out loss must not rise with depth"
    sft = read_sorted_meta(STORE / "tiny-sft").eval["by_exit"]
    assert sft[str(meta.exits[0])] > losses[0]  # SoFT's shallow exit beats SFT's
    assert losses[-1] <= 1.05 * sft[str(layers)]  # full depth within 5 % of SFT
