"""Next-token choice for a batch of rows: greedy, or temperature + top-k + top-p sampling.

Randomness comes from the caller as one uniform number per sampled row (each request draws from
its own seeded ``random.Random``), and the token is picked by inverting the row's filtered CDF.
A request's random stream therefore never depends on its batch neighbours, and no per-device
generator state is needed. The filters follow Hugging Face's order and meaning: temperature,
then top-k, then top-p (the smallest set of tokens whose probability reaches ``top_p``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from app.engine.request_state import RowSampling

__all__ = ["RowSampling", "sample", "sample_rows"]

MIN_TEMPERATURE = 1e-5


def sample(logits: torch.Tensor, sampled: Sequence[tuple[int, RowSampling]]) -> torch.Tensor:
    """Token ids ``[n]`` for float32 ``logits [n, vocab]``.

    Rows not listed in ``sampled`` (``(row, params)`` pairs) are greedy.
    """
    tokens = logits.max(dim=-1).indices  # argmax's first maximum; 3x faster on CPU at 49k
    if not sampled:
        return tokens
    device = logits.device
    rows = torch.tensor([r for r, _ in sampled], device=device)
    params = [p for _, p in sampled]
    temperature = torch.tensor([p.temperature for p in params], device=device)
    top_k = torch.tensor([p.top_k for p in params], device=device)
    top_p = torch.tensor([p.top_p for p in params], device=device)
    uniform = torch.tensor([p.uniform for p in params], device=device)
    tokens[rows] = sample_rows(logits[rows], temperature, top_k, top_p, uniform)
    return tokens


def sample_rows(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    uniform: torch.Tensor,
) -> torch.Tensor:
    """One token per row of ``logits [m, vocab]``; ``top_k`` 0 means no top-k filter."""
    vocab = logits.shape[-1]
    # A positive temperature too small for float32 (5e-324 becomes 0) would divide by zero: at
    # MIN_TEMPERATURE sampling is already greedy.
    temperature = temperature.clamp(min=MIN_TEMPERATURE)
    scores, order = torch.sort(logits / temperature[:, None], dim=-1, descending=True)
    rank = torch.arange(vocab, device=logits.device)
    k = torch.where(top_k > 0, top_k, vocab)
    scores = scores.masked_fill(rank[None, :] >= k[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    before = probs.cumsum(dim=-1) - probs  # mass of the better-ranked tokens
    # the best token always stays, even for a top_p that float32 rounds to 0
    probs = probs.masked_fill((before >= top_p[:, None]) & (rank[None, :] > 0), 0.0)
    cdf = probs.cumsum(dim=-1)
    target = (uniform * cdf[:, -1])[:, None]
    pick = torch.searchsorted(cdf, target, right=True).clamp_(max=vocab - 1)
    # Rounding can put the target at the very end of the CDF: step back to a kept token.
    pick = torch.minimum(pick, (probs > 0).sum(dim=-1, keepdim=True) - 1)
    return order.gather(-1, pick).squeeze(-1)
