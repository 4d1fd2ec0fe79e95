"""Rotary position embeddings, with frequencies computed exactly as Hugging Face computes them.

The inverse frequencies (and the attention scaling of yarn-style variants) come from
``transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS``, so every static scaling variant a LLaMA,
Mistral or Qwen2 config can name (default, linear, llama3, yarn) uses the reference frequencies.
``dynamic`` NTK scaling equals the default frequencies up to ``max_position_embeddings``, so the
engine caps the context there; ``longrope`` switches frequencies with the sequence length and is
refused.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from app.model_store import ModelStoreError

logger = logging.getLogger(__name__)

STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def rope_type(hf_config: Any) -> str:
    params = getattr(hf_config, "rope_parameters", None) or {}
    return str(params.get("rope_type", params.get("type", "default")))


def check_rope(hf_config: Any) -> None:
    params = getattr(hf_config, "rope_parameters", None) or {}
    kind = rope_type(hf_config)
    if kind not in (*STATIC_ROPE_TYPES, "dynamic"):
        raise ModelStoreError(
            f"rope_type {kind!r} is not supported (supported: default, linear, "
            "llama3, yarn, dynamic)"
        )
    if float(params.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ModelStoreError("partial rotary embeddings are not supported")


def inverse_frequencies(hf_config: Any) -> tuple[torch.Tensor, float]:
    """``(inv_freq [head_dim / 2], attention_scaling)`` exactly as transformers computes them."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    check_rope(hf_config)
    kind = rope_type(hf_config)
    if kind in ("default", "dynamic"):
        # Dynamic NTK only departs from the default beyond max_position_embeddings (never reached).
        base = float(hf_config.rope_parameters["rope_theta"])
        dim = head_dim_of(hf_config)
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        return inv_freq, 1.0
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[kind](hf_config, torch.device("cpu"))
    return inv_freq.float(), float(scaling)


def head_dim_of(hf_config: Any) -> int:
    return int(
        getattr(hf_config, "head_dim", None)
        or hf_config.hidden_size // hf_config.num_attention_heads
    )


def rope_table(hf_config: Any, max_seq_len: int, device: str) -> torch.Tensor:
    """``[max_seq_len, head_dim / 2]`` complex64 rotations ``scaling * exp(i * pos * freq)``."""
    inv_freq, scaling = inverse_frequencies(hf_config)
    positions = torch.arange(max_seq_len, dtype=torch.int64).float()
    freqs = positions[:, None] * inv_freq[None, :]
    table = torch.complex(freqs.cos() * scaling, freqs.sin() * scaling)
    return table.to(device)


def interleave_permutation(head_dim: int) -> torch.Tensor:
    """Row order that turns Hugging Face's half-split rotary pairs ``(i, i + d/2)`` into adjacent
    pairs ``(2i, 2i + 1)``, so one complex multiply rotates a head.

    Applied to the q and k projection rows of every head, it permutes q and k alike, which leaves
    every attention score unchanged.
    """
    half = head_dim // 2
    return torch.stack((torch.arange(half), torch.arange(half) + half), dim=1).flatten()
