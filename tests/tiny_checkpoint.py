"""Tiny random checkpoints made inside the tests (no file from ../shared is ever read)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
)

from app.model_store import SortedMeta, write_sorted_meta
from app.training.tokenizer import train_bpe_tokenizer

CORPUS = [
    "Once upon a time there was a little girl who liked to play in the park.",
    "The quick brown fox jumps over the lazy dog. Héllo wörld, naïve café — 日本語のテキスト.",
    "### Instruction:\nSay hello.\n\n### Response:\nHello! How can I help you today?",
    "def add(a, b):\n    return a + b\n# numbers 0123456789 and emoji 🙂🚀",
] * 8

_CONFIGS = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}


def make_tokenizer(vocab_size: int = 400):
    return train_bpe_tokenizer(CORPUS, vocab_size=vocab_size)


def make_tiny_checkpoint(
    folder: str | Path,
    model_type: str = "llama",
    num_layers: int = 4,
    exits: list[int] | None = None,
    hidden_size: int = 64,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    max_position_embeddings: int = 256,
    tie_word_embeddings: bool = True,
    rope_parameters: dict | None = None,
    seed: int = 0,
    write_sorted: bool = True,
) -> Path:
    """Save a random ``model_type`` model, a BPE tokenizer and ``sorted.json`` into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer()
    kwargs = dict(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        rms_norm_eps=1e-5,
    )
    if rope_parameters is not None:
        kwargs["rope_parameters"] = rope_parameters
    config = _CONFIGS[model_type](**kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    # Random init gives near-uniform logits; sharpen them so that greedy choices are decisive.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(4.0)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    if write_sorted:
        write_sorted_meta(
            folder,
            SortedMeta(num_layers=num_layers, exits=exits or list(range(1, num_layers + 1))),
        )
    return folder
