"""The router benchmark's load: one seeded open-loop stream, played against a server, summarised.

The stream is skewed so that routing matters: a share of **heavy** requests (no budget, many
tokens) occupies whichever replica they land on, among **budgeted** short requests, half with a
tight budget and half with a loose one. A router that ignores budgets puts about half the budgeted
requests beside a heavy one; the budget-aware router should send them to the replica where they
still get a deep exit. Every router is played the same stream (same arrival times, same
requests), on the client's clock.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

import httpx

logger = logging.getLogger(__name__)

PROMPT = "Once upon a time there was a little girl who"


@dataclass(frozen=True)
class Planned:
    at_s: float  # offset from the start of the run
    kind: str  # "heavy", "tight", "loose"
    max_new_tokens: int
    budget_ms: float | None


@dataclass
class Outcome:
    kind: str
    budget_ms: float | None
    status: int
    client_ms: float
    exit_layer: int | None = None
    initial_exit_layer: int | None = None
    replica: str | None = None
    server_met: bool | None = None

    @property
    def met(self) -> bool | None:
        """On the client's clock; a failed request misses."""
        if self.budget_ms is None:
            return None
        return self.status == 200 and self.client_ms <= self.budget_ms


def plan_stream(
    rate: float,
    duration_s: float,
    seed: int,
    heavy_share: float,
    heavy_tokens: int,
    short_tokens: int,
    tight_ms: float,
    loose_ms: float,
) -> list[Planned]:
    """Poisson arrivals at ``rate`` per second for ``duration_s``."""
    rng = random.Random(seed)
    out: list[Planned] = []
    t = rng.expovariate(rate)
    while t < duration_s:
        if rng.random() < heavy_share:
            out.append(Planned(t, "heavy", heavy_tokens, None))
        elif rng.random() < 0.5:
            out.append(Planned(t, "tight", short_tokens, tight_ms))
        else:
            out.append(Planned(t, "loose", short_tokens, loose_ms))
        t += rng.expovariate(rate)
    return out


async def _one(client: httpx.AsyncClient, url: str, p: Planned) -> Outcome:
    body: dict[str, Any] = {"prompt": PROMPT, "max_new_tokens": p.max_new_tokens}
    body["ignore_eos"] = True
    if p.budget_ms is not None:
        body["budget_ms"] = p.budget_ms
    t0 = time.perf_counter()
    try:
        r = await client.post(f"{url}/v1/generate", json=body)
    except httpx.HTTPError as exc:
        logger.warning("request failed: %s", exc)
        return Outcome(p.kind, p.budget_ms, 0, (time.perf_counter() - t0) * 1000)
    ms = (time.perf_counter() - t0) * 1000
    if r.status_code != 200:
        return Outcome(p.kind, p.budget_ms, r.status_code, ms)
    j = r.json()
    return Outcome(
        p.kind,
        p.budget_ms,
        200,
        ms,
        exit_layer=j["exit_layer"],
        initial_exit_layer=j["budget"]["initial_exit_layer"],
        replica=(j.get("sortedserve") or {}).get("replica"),
        server_met=j["budget"]["met"],
    )


async def play(url: str, stream: list[Planned]) -> list[Outcome]:
    """Fire every planned request at its time (open loop) and wait for all of them."""
    limits = httpx.Limits(max_connections=512, max_keepalive_connections=512)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        start = time.perf_counter()
        tasks = []
        for p in stream:
            delay = start + p.at_s - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(_one(client, url, p)))
        return list(await asyncio.gather(*tasks))


async def measure_idle_ms(url: str, max_new_tokens: int, rounds: int = 5) -> float:
    """Median client latency of one short request at full depth on an idle server."""
    times = []
    async with httpx.AsyncClient(timeout=60) as client:
        for _ in range(rounds):
            o = await _one(client, url, Planned(0.0, "probe", max_new_tokens, None))
            if o.status == 200:
                times.append(o.client_ms)
    return statistics.median(times)


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def summarise(outcomes: list[Outcome], num_layers: int) -> dict[str, Any]:
    budgeted = [o for o in outcomes if o.budget_ms is not None]
    ok = [o for o in budgeted if o.status == 200]
    per_kind = {}
    for kind in ("tight", "loose"):
        group = [o for o in budgeted if o.kind == kind]
        served = [o for o in group if o.status == 200 and o.exit_layer is not None]
        per_kind[kind] = {
            "requests": len(group),
            "met_share": _share([bool(o.met) for o in group]),
            "mean_exit": _mean([float(o.exit_layer) for o in served if o.exit_layer]),
            "p99_ms": _pct([o.client_ms for o in served], 0.99),
        }
    replicas: dict[str, int] = {}
    for o in outcomes:
        if o.replica:
            replicas[o.replica] = replicas.get(o.replica, 0) + 1
    return {
        "requests": len(outcomes),
        "budgeted": len(budgeted),
        "failed": sum(1 for o in outcomes if o.status != 200),
        "met_share": _share([bool(o.met) for o in budgeted]),
        "server_met_share": _share([bool(o.server_met) for o in ok]),
        "mean_exit": _mean([float(o.exit_layer) for o in ok if o.exit_layer]),
        "num_layers": num_layers,
        "p50_ms": _pct([o.client_ms for o in ok], 0.5),
        "p99_ms": _pct([o.client_ms for o in ok], 0.99),
        "by_kind": per_kind,
        "requests_per_replica": dict(sorted(replicas.items())),
    }


def _share(flags: list[bool]) -> float | None:
    return round(sum(flags) / len(flags), 4) if flags else None


def _mean(values: list[float]) -> float | None:
    return round(statistics.fmean(values), 3) if values else None


def stream_json(stream: list[Planned]) -> list[dict[str, Any]]:
    return [asdict(p) for p in stream]
