"""The budget benchmark's workload: prompts, Poisson arrival times and an open-loop client.

Open loop means each request is sent at its arrival time whatever the earlier ones are doing, as
independent users would; a closed loop (send the next when one returns) would slow its own
arrivals down exactly when the server falls behind, and hide the overload the benchmark is about.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

HELDOUT = Path("bench/data/heldout.json")
FALLBACK_INSTRUCTIONS = [
    "Write a short story about a dog who learns to fly.",
    "Explain why the sky is blue.",
    "Give three tips for staying healthy.",
    "Describe a day at the beach.",
    "Write a poem about the moon.",
    "Tell me a story about a little girl and her cat.",
]


def load_prompts(seed: int) -> list[str]:
    """Held-out instructions in the trained prompt format (a fixed few when none were written),
    shuffled by ``seed`` so that both arms of a run send the same prompts in the same order."""
    from app.training.prompting import alpaca_prompt

    records: list[dict[str, str]] = []
    if HELDOUT.is_file():
        records = json.loads(HELDOUT.read_text())
    if not records:
        records = [{"instruction": i, "input": ""} for i in FALLBACK_INSTRUCTIONS]
    prompts = [alpaca_prompt(r["instruction"], r.get("input", "")) for r in records]
    prompts = [p for p in prompts if len(p) < 1000]  # keep prefill a small part of the latency
    random.Random(seed).shuffle(prompts)
    return prompts


def arrivals(rate: float, duration: float, seed: int) -> list[float]:
    """Poisson arrival times (seconds from the start) at ``rate`` per second over ``duration``;
    seeded, so that the two arms of a rate see the very same stream."""
    rng = random.Random(seed)
    times, t = [], rng.expovariate(rate)
    while t < duration:
        times.append(t)
        t += rng.expovariate(rate)
    return times


@dataclass
class Outcome:
    """One request as the client saw it (status 0: the connection failed)."""

    status: int
    client_ms: float
    body: dict[str, Any] = field(default_factory=dict)


async def _one(client: Any, body: dict[str, Any]) -> Outcome:
    import httpx

    t0 = time.perf_counter()
    try:
        r = await client.post("/v1/generate", json=body)
        data = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
        return Outcome(r.status_code, (time.perf_counter() - t0) * 1000, data)
    except httpx.HTTPError as exc:
        logger.warning("request failed: %s", exc)
        return Outcome(0, (time.perf_counter() - t0) * 1000)


async def run_open_loop(
    url: str, bodies: list[dict[str, Any]], times: list[float], timeout_s: float
) -> list[Outcome]:
    """Send ``bodies[i]`` at ``times[i]`` seconds from now, whatever the earlier ones are doing."""
    import httpx

    limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)
    async with httpx.AsyncClient(base_url=url, timeout=timeout_s, limits=limits) as client:
        loop = asyncio.get_running_loop()
        start = loop.time()
        tasks = []
        for at, body in zip(times, bodies, strict=True):
            await asyncio.sleep(max(0.0, start + at - loop.time()))
            tasks.append(asyncio.create_task(_one(client, body)))
        return list(await asyncio.gather(*tasks))
