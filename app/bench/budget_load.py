"""The budget benchmark's workload: prompts, Poisson arrival times and an open-loop client.

Open loop means each request is sent at its arrival time whatever the earlier ones are doing, as
independent users would; a closed loop (send the next when one returns) would slow its own
arrivals down exactly when the server falls behind, and hide the overload the benchmark is about.
The closed loop is used only to measure the capacity that the open-loop rates are multiples of.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import statistics
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
    sent_at: float = 0.0  # time.perf_counter() when sent and when the answer was read
    ended_at: float = 0.0


async def _one(client: Any, body: dict[str, Any]) -> Outcome:
    import httpx

    t0 = time.perf_counter()
    try:
        r = await client.post("/v1/generate", json=body)
        data = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
        t1 = time.perf_counter()
        return Outcome(r.status_code, (t1 - t0) * 1000, data, t0, t1)
    except httpx.HTTPError as exc:
        logger.warning("request failed: %s", exc)
        t1 = time.perf_counter()
        return Outcome(0, (t1 - t0) * 1000, {}, t0, t1)


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


async def run_closed_loop(
    url: str, bodies: list[dict[str, Any]], clients: int, seconds: float, timeout_s: float
) -> tuple[list[Outcome], float, float]:
    """``clients`` clients, each sending the next of ``bodies`` as soon as its previous answer
    came, for ``seconds``; the requests still running then are waited for. Returns the outcomes
    and the window's (start, stop) on the ``time.perf_counter()`` clock."""
    import httpx

    work = iter(bodies)
    outcomes: list[Outcome] = []
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)
    async with httpx.AsyncClient(base_url=url, timeout=timeout_s, limits=limits) as client:
        start = time.perf_counter()
        stop = start + seconds

        async def one_client() -> None:
            while time.perf_counter() < stop:
                body = next(work, None)
                if body is None:
                    return
                outcomes.append(await _one(client, body))

        await asyncio.gather(*(one_client() for _ in range(clients)))
    return outcomes, start, stop


def measure_capacity(
    url: str, bodies: list[dict[str, Any]], clients: int, seconds: float
) -> dict[str, Any]:
    """Capacity of the server for ``bodies`` (e.g. all at full depth): a closed loop of
    ``clients`` clients for ``seconds``, in completed requests per second (see
    :func:`app.bench.budget_workload.closed_loop_rate`)."""
    from app.bench.budget_workload import closed_loop_rate

    outcomes, start, stop = asyncio.run(run_closed_loop(url, bodies, clients, seconds, 300))
    ok = [o for o in outcomes if o.status == 200]
    rate = closed_loop_rate([(o.sent_at, o.ended_at) for o in ok], start, stop)
    in_window = sum(1 for o in ok if start <= o.ended_at <= stop)
    return {
        "requests_per_s": round(rate, 3),
        "completed_in_window_per_s": round(in_window / seconds, 3),
        "clients": clients,
        "seconds": seconds,
        "requests": len(outcomes),
        "failed": len(outcomes) - len(ok),
        "median_client_ms": round(statistics.median(o.client_ms for o in ok), 1) if ok else None,
    }


def wait_idle(url: str, timeout_s: float = 120.0) -> None:
    """Until the server has no request in flight (the previous run's stragglers)."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if httpx.get(f"{url}/info", timeout=10).json()["load"]["inflight"] == 0:
            return
        time.sleep(0.2)


def idle_latency(
    url: str, prompts: list[str], body: dict[str, Any], n: int = 5
) -> dict[str, float]:
    """Median client and server latency of ``n - 1`` requests sent one at a time (the first one
    warms up)."""
    import httpx

    client_ms, server_ms = [], []
    with httpx.Client(base_url=url, timeout=120) as client:
        for i in range(n):
            t0 = time.perf_counter()
            r = client.post("/v1/generate", json={"prompt": prompts[i % len(prompts)], **body})
            r.raise_for_status()
            client_ms.append((time.perf_counter() - t0) * 1000)
            server_ms.append(r.json()["budget"]["elapsed_ms"])
    return {
        "client": round(statistics.median(client_ms[1:]), 1),
        "server": round(statistics.median(server_ms[1:]), 1),
    }
