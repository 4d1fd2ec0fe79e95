"""Log-probabilities of given tokens and of the most likely alternatives, from logits.

The model's raw distribution, ``log_softmax(logits)``, before any temperature or filter (as vLLM
reports by default): the logits are those of the exit the row ran at. One host read per call;
the runner calls it only for rows that ask (normal requests never pay for it).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from app.engine.request_state import Scores


def token_scores(
    logits: torch.Tensor, tokens: torch.Tensor, top_n: Sequence[int], in_place: bool = False
) -> list[Scores]:
    """Per row of float32 ``logits [m, vocab]``: the log-probability of ``tokens[i]`` and the
    ``top_n[i]`` most likely tokens. ``in_place`` turns ``logits`` into log-probabilities
    instead of allocating a copy (for the prompt's ``[t, vocab]``)."""
    if in_place:
        logp = logits.sub_(logits.logsumexp(dim=-1, keepdim=True))
    else:
        logp = torch.log_softmax(logits, dim=-1)
    chosen = logp.gather(-1, tokens.view(-1, 1))
    k = max(top_n, default=0)
    if k:
        values, ids = logp.topk(k, dim=-1)
        table = torch.cat([chosen, values], dim=-1).tolist()
        id_rows = ids.tolist()
    else:
        table = chosen.tolist()
        id_rows = [[] for _ in table]
    return [
        Scores(row[0], row_ids[:n], row[1 : 1 + n])
        for row, row_ids, n in zip(table, id_rows, top_n, strict=True)
    ]
