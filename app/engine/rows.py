"""Where each running request's cache row goes when the batch changes (pure Python, no torch).

The engine keeps the running requests in rows ``0..n-1`` grouped by exit, deepest first, so that
layer ``l`` runs over a prefix of rows (see :mod:`app.engine.kv_cache`); a join, a leave or a
lowered exit must restore that order with as few row copies as possible.
"""

from __future__ import annotations

from collections.abc import Sequence


def plan_rows(current: Sequence[int], exits: Sequence[int]) -> list[int]:
    """New rows for requests now in rows ``current`` with ``exits``: grouped by exit, deepest first.

    The result fills rows ``0..n-1``; a request keeps its row when the row already lies inside its
    exit group's range, so a join, a leave or a lowered exit moves at most one row per exit group.
    """
    n = len(current)
    order = sorted(range(n), key=lambda i: -exits[i])
    ranges: dict[int, tuple[int, int]] = {}
    for rank, i in enumerate(order):
        start, _ = ranges.get(exits[i], (rank, rank))
        ranges[exits[i]] = (start, rank + 1)
    new = [-1] * n
    taken: set[int] = set()
    for i in range(n):
        start, end = ranges[exits[i]]
        if start <= current[i] < end:
            new[i] = current[i]
            taken.add(current[i])
    for exit_layer, (start, end) in ranges.items():
        free = iter(r for r in range(start, end) if r not in taken)
        for i in range(n):
            if exits[i] == exit_layer and new[i] < 0:
                new[i] = next(free)
    return new
