"""The budget benchmark's request mix and capacity arithmetic (pure: no server, no torch).

- **Prompt classes**: ``short`` chat turns (held-out Alpaca instructions, see
  :func:`app.bench.budget_load.load_prompts`) and, with probability ``long_share``, ``long``
  documents: a few hundred tokens of TinyStories text (CDLA-Sharing-1.0; the copy in
  ``../shared/data/tinystories`` comes from an MIT repository) to summarise.
- **Budget classes**: each request draws a factor from ``factors``; its budget is that factor times
  the idle full-depth latency of its prompt class (tight and loose budgets in one stream).
- **Capacity**: the full-depth capacity is measured with a closed loop of max-batch-size clients;
  :func:`closed_loop_rate` turns its (send, end) times into completed requests per second.

Every draw is seeded, so that the two arms of a run send the very same requests.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

TINYSTORIES = Path("../shared/data/tinystories/tinystories_val_subset.txt")
LONG_INSTRUCTION = "Summarize the story below in two sentences."
LONG_SOURCE = "TinyStories validation text (CDLA-Sharing-1.0), " + str(TINYSTORIES)


@dataclass(frozen=True)
class Planned:
    """One request of the stream: its prompt, prompt class and budget factor."""

    prompt: str
    kind: str  # "short" or "long"
    factor: float


def split_documents(text: str, min_chars: int = 1100, max_chars: int = 1500) -> list[str]:
    """Consecutive paragraphs of ``text`` joined into documents of ``min_chars``..``max_chars``
    characters (about 250-350 tokens of English), each cut at a paragraph end when it can be."""
    paragraphs = [p.strip() for p in text.split("\n\n") if p.strip()]
    docs, current = [], ""
    for par in paragraphs:
        joined = f"{current}\n\n{par}" if current else par
        if len(joined) <= max_chars:
            current = joined
            if len(current) >= min_chars:
                docs.append(current)
                current = ""
            continue
        if current and len(current) >= min_chars // 2:
            docs.append(current)  # a shorter document rather than one cut mid-paragraph
        current = par if len(par) <= max_chars else ""
    return [d for d in docs if min_chars // 2 <= len(d) <= max_chars]


def load_long_prompts(seed: int, path: Path = TINYSTORIES, limit: int = 200) -> list[str]:
    """Long-document prompts in the trained format, shuffled by ``seed`` (empty if no text)."""
    from app.training.prompting import alpaca_prompt

    if not path.is_file():
        return []
    docs = split_documents(path.read_text(encoding="utf-8"))[:limit]
    random.Random(seed).shuffle(docs)
    return [alpaca_prompt(LONG_INSTRUCTION, d) for d in docs]


def plan_requests(
    n: int,
    short: Sequence[str],
    long: Sequence[str],
    long_share: float,
    factors: Sequence[float],
    seed: int,
) -> list[Planned]:
    """``n`` requests: each long with probability ``long_share`` (short when there are no long
    prompts), with a budget factor drawn from ``factors``; prompts cycle within their class."""
    if not short:
        raise ValueError("no short prompts")
    if not factors:
        raise ValueError("no budget factors")
    rng = random.Random(seed)
    counts = {"short": 0, "long": 0}
    planned = []
    for _ in range(n):
        kind = "long" if long and rng.random() < long_share else "short"
        pool = long if kind == "long" else short
        prompt = pool[counts[kind] % len(pool)]
        counts[kind] += 1
        planned.append(Planned(prompt, kind, float(rng.choice(list(factors)))))
    return planned


def budgets_for(
    planned: Sequence[Planned], idle_ms: dict[str, float], fixed_ms: float | None = None
) -> list[float]:
    """Each request's budget: ``fixed_ms`` if given, else its factor × its class's idle latency."""
    if fixed_ms is not None:
        return [float(fixed_ms)] * len(planned)
    return [round(p.factor * idle_ms[p.kind], 1) for p in planned]


def closed_loop_rate(spans: Sequence[tuple[float, float]], start: float, stop: float) -> float:
    """Completed requests per second in [start, stop] of a closed loop, from each request's
    (sent, ended) times: every request counts with the share of its lifetime inside the window
    (so a window that cuts a batch of requests in half counts half of each, not all or none).
    In a closed loop of N clients this is N / mean latency (Little's law), without the
    all-or-nothing count that synchronised clients would make jumpy."""
    if stop <= start:
        raise ValueError("empty window")
    done = 0.0
    for sent, ended in spans:
        life = ended - sent
        if life <= 0:
            continue
        inside = min(ended, stop) - max(sent, start)
        if inside > 0:
            done += inside / life
    return done / (stop - start)


def parse_rates(text: str, unit_rate: float) -> list[tuple[str, float]]:
    """``"1x,2x,5"`` → [("1x", unit), ("2x", 2 unit), ("5", 5.0)] (labels kept for the report)."""
    rates = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        value = float(item[:-1]) * unit_rate if item.endswith("x") else float(item)
        if value > 0:
            rates.append((item, round(value, 3)))
    return rates


def parse_factors(text: str) -> list[float]:
    factors = [float(x) for x in text.replace(" ", "").split(",") if x]
    if not factors or any(f <= 0 for f in factors):
        raise ValueError(f"budget factors must be positive numbers: {text!r}")
    return factors


def implied_quality(exit_mix: dict[str, float], by_exit: dict[str, float]) -> float | None:
    """The held-out metric the exit mix implies: by_exit's values weighted by the mix."""
    weights = {k: w for k, w in exit_mix.items() if w > 0}
    if not weights or any(k not in by_exit for k in weights):
        return None
    total = sum(weights.values())
    return round(sum(w * float(by_exit[k]) for k, w in weights.items()) / total, 4)
