"""``python -m app bench budget``: do latency budgets hold under open-loop load?

Starts the real server (``python -m app serve``) on the checkpoint, then, at several Poisson arrival
rates, sends the same request stream (same arrival times, same prompts, same seed) twice:

- **sortedserve**: each request carries ``budget_ms``; the depth scheduler picks the exit;
- **full-depth**: the same requests with ``exit_layer`` = the deepest exit (no budget sent; whether
  the budget was met is judged from the server's own ``elapsed_ms``).

Requests ignore EOS (``ignore_eos``), so each makes exactly ``--max-new-tokens`` tokens and the
arms do the same work. It reports the share of requests that meet the budget (refused or failed
requests count as missed), the exit mix, p50/p99 latency and the prediction error
|actual / predicted − 1|, prints a table and writes JSON to ``bench/results/budget.json``. The
budget defaults to a multiple of the measured idle full-depth latency, and rates may be given as
multiples of the idle full-depth request rate, so the same command makes sense on any machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import signal
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

DEFAULT_OUT = Path("bench/results/budget.json")
HELDOUT = Path("bench/data/heldout.json")
FALLBACK_INSTRUCTIONS = [
    "Write a short story about a dog who learns to fly.",
    "Explain why the sky is blue.",
    "Give three tips for staying healthy.",
    "Describe a day at the beach.",
    "Write a poem about the moon.",
    "Tell me a story about a little girl and her cat.",
]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, default=Path("model_store/default"), help="checkpoint")
    p.add_argument("--url", help="use this running server instead of starting one")
    p.add_argument(
        "--rates",
        default="0.5x,1x,2x,3x",
        help="arrival rates in requests/s, or, suffixed with x, multiples of the idle full-depth "
        "request rate (1000 / idle full-depth latency); default 0.5x,1x,2x,3x",
    )
    p.add_argument(
        "--duration", type=float, default=15.0, help="seconds of arrivals per run (default 15)"
    )
    p.add_argument(
        "--budget-ms",
        type=float,
        help="latency budget of every request (default: --budget-factor × idle full-depth latency)",
    )
    p.add_argument("--budget-factor", type=float, default=2.0, help="see --budget-ms (default 2)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens per request")
    p.add_argument("--seed", type=int, default=0, help="arrival times and prompt order")
    p.add_argument(
        "--stop-at-eos", action="store_true", help="let requests end at EOS (default: ignore it)"
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads of the started server")
    p.add_argument("--max-batch-size", type=int, default=16, help="slots of the started server")
    p.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"JSON results (default {DEFAULT_OUT})"
    )
    p.add_argument("--log", type=Path, default=Path("bench/results/budget-server.log"))


# -- workload ------------------------------------------------------------------------------------


def load_prompts(seed: int) -> list[str]:
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
    rng = random.Random(seed)
    times, t = [], rng.expovariate(rate)
    while t < duration:
        times.append(t)
        t += rng.expovariate(rate)
    return times


@dataclass
class Outcome:
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


# -- summaries -----------------------------------------------------------------------------------


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(int(q * len(ordered)), len(ordered) - 1)], 2)


def summarize(outcomes: list[Outcome], budget_ms: float, exits: list[int]) -> dict[str, Any]:
    # a request the server refused as invalid (e.g. a prompt past the context) is not a budget
    # miss of either arm: it is reported and left out; 429s and failures count as misses
    invalid = [o for o in outcomes if 400 <= o.status < 500 and o.status != 429]
    outcomes = [o for o in outcomes if o not in invalid]
    done = [o for o in outcomes if o.status == 200]
    elapsed = [o.body["budget"]["elapsed_ms"] for o in done]
    met = sum(1 for e in elapsed if e <= budget_ms)
    ratios = [o.body["budget"]["elapsed_ms"] / o.body["budget"]["predicted_ms"] for o in done]
    full_length = [
        o.body["budget"]["elapsed_ms"] / o.body["budget"]["predicted_ms"]
        for o in done
        if o.body["finish_reason"] == "length"
    ]
    final = Counter(o.body["exit_layer"] for o in done)
    initial = Counter(o.body["budget"]["initial_exit_layer"] for o in done)
    n = len(outcomes)
    return {
        "requests": n,
        "completed": len(done),
        "refused_429": sum(1 for o in outcomes if o.status == 429),
        "invalid_4xx": len(invalid),
        "failed": sum(1 for o in outcomes if o.status not in (200, 429)),
        "met_share": round(met / n, 4) if n else None,
        "exit_mix": {str(k): round(final[k] / len(done), 3) for k in exits} if done else {},
        "initial_exit_mix": {str(k): round(initial[k] / len(done), 3) for k in exits}
        if done
        else {},
        "mean_exit": round(statistics.fmean(o.body["exit_layer"] for o in done), 2)
        if done
        else None,
        "downgraded_share": round(
            sum(1 for o in done if o.body["budget"]["downgrades"]) / len(done), 3
        )
        if done
        else None,
        "latency_ms": {"p50": _pct(elapsed, 0.5), "p99": _pct(elapsed, 0.99)},
        "client_latency_ms": {
            "p50": _pct([o.client_ms for o in done], 0.5),
            "p99": _pct([o.client_ms for o in done], 0.99),
        },
        "prediction_error": {
            "median_abs_all": round(statistics.median(abs(r - 1) for r in ratios), 4)
            if ratios
            else None,
            "median_abs_length": round(statistics.median(abs(r - 1) for r in full_length), 4)
            if full_length
            else None,
            "length_finished": len(full_length),
            "median_ratio": round(statistics.median(ratios), 4) if ratios else None,
        },
        "completion_tokens": sum(o.body["usage"]["completion_tokens"] for o in done),
    }


# -- the run -------------------------------------------------------------------------------------


def _wait_idle(url: str, timeout_s: float = 60.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if httpx.get(f"{url}/info", timeout=10).json()["load"]["inflight"] == 0:
            return
        time.sleep(0.2)


def _idle_latency(url: str, prompts: list[str], body: dict[str, Any], n: int = 6) -> float:
    import httpx

    values = []
    with httpx.Client(base_url=url, timeout=120) as client:
        for i in range(n):
            r = client.post("/v1/generate", json={"prompt": prompts[i % len(prompts)], **body})
            r.raise_for_status()
            values.append(r.json()["budget"]["elapsed_ms"])
    return statistics.median(values[1:])  # the first one warms up


def parse_rates(text: str, unit_rate: float) -> list[float]:
    rates = []
    for item in text.split(","):
        item = item.strip()
        rates.append(float(item[:-1]) * unit_rate if item.endswith("x") else float(item))
    return [round(r, 3) for r in rates if r > 0]


def bench(url: str, args: argparse.Namespace) -> dict[str, Any]:
    import httpx

    from app.bench.common import machine_info

    info = httpx.get(f"{url}/info", timeout=10).json()
    exits = info["exits"]
    deepest, shallowest = exits[-1], exits[0]
    prompts = load_prompts(args.seed)
    n_new = args.max_new_tokens
    common = {"max_new_tokens": n_new, "ignore_eos": not args.stop_at_eos}
    full_idle = _idle_latency(url, prompts, {**common, "exit_layer": deepest})
    shallow_idle = _idle_latency(url, prompts, {**common, "exit_layer": shallowest})
    budget_ms = args.budget_ms or round(args.budget_factor * full_idle, 1)
    rates = parse_rates(args.rates, 1000.0 / full_idle)
    logger.info(
        "idle latency of %d tokens: %.1f ms at exit %d, %.1f ms at exit %d; budget %.1f ms; "
        "rates %s req/s",
        n_new,
        full_idle,
        deepest,
        shallow_idle,
        shallowest,
        budget_ms,
        rates,
    )
    runs = []
    for i, rate in enumerate(rates):
        times = arrivals(rate, args.duration, args.seed + i)
        arms = ("sortedserve", "full-depth") if i % 2 == 0 else ("full-depth", "sortedserve")
        for arm in arms:
            extra = {"budget_ms": budget_ms} if arm == "sortedserve" else {"exit_layer": deepest}
            bodies = [
                {"prompt": prompts[j % len(prompts)], **common, **extra} for j in range(len(times))
            ]
            _wait_idle(url)
            t0 = time.perf_counter()
            outcomes = asyncio.run(run_open_loop(url, bodies, times, timeout_s=120))
            summary = summarize(outcomes, budget_ms, exits)
            summary.update(arm=arm, rate=rate, wall_s=round(time.perf_counter() - t0, 1))
            runs.append(summary)
            logger.info(
                "rate %.2f/s %-11s met %5.1f%%  p50 %s ms  p99 %s ms  mean exit %s",
                rate,
                arm,
                100 * (summary["met_share"] or 0),
                summary["latency_ms"]["p50"],
                summary["latency_ms"]["p99"],
                summary["mean_exit"],
            )
    final_info = httpx.get(f"{url}/info", timeout=10).json()
    return {
        "benchmark": "budget",
        "command": "python -m app " + " ".join(sys.argv[1:]),
        "machine": machine_info(),
        "model": info["model_id"],
        "device": info["device"],
        "exits": exits,
        "max_new_tokens": n_new,
        "ignore_eos": not args.stop_at_eos,
        "budget_ms": budget_ms,
        "idle_latency_ms": {str(deepest): full_idle, str(shallowest): shallow_idle},
        "duration_s": args.duration,
        "seed": args.seed,
        "runs": runs,
        "verdict": verdict(runs),
        "scheduler": final_info["latency_profile"],
    }


def verdict(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Is there a rate where full depth meets < 50% of budgets and SortedServe ≥ 95%?"""
    by_rate: dict[float, dict[str, dict[str, Any]]] = {}
    for run in runs:
        by_rate.setdefault(run["rate"], {})[run["arm"]] = run
    hard = [
        {
            "rate": rate,
            "full_depth_met": arms["full-depth"]["met_share"],
            "sortedserve_met": arms["sortedserve"]["met_share"],
        }
        for rate, arms in sorted(by_rate.items())
        if (arms["full-depth"]["met_share"] or 0) < 0.5
    ]
    errors = [
        r["prediction_error"]["median_abs_length"]
        for r in runs
        if r["arm"] == "sortedserve" and r["prediction_error"]["median_abs_length"] is not None
    ]
    wins = [h["rate"] for h in hard if (h["sortedserve_met"] or 0) >= 0.95]
    return {
        "rates_where_full_depth_meets_under_half": hard,
        "rates_where_sortedserve_meets_95_there": wins,
        "target_met": bool(wins),
        "median_prediction_error_sortedserve": round(statistics.median(errors), 4)
        if errors
        else None,
    }


def report(result: dict[str, Any]) -> str:
    from app.bench.common import table

    exits = result["exits"]
    headers = ["rate/s", "arm", "met %", "p50 ms", "p99 ms"]
    headers += [f"exit {k} %" for k in exits] + ["pred err", "429"]
    rows = []
    for r in result["runs"]:
        err = r["prediction_error"]["median_abs_length"]
        rows.append(
            [r["rate"], r["arm"], 100 * (r["met_share"] or 0), r["latency_ms"]["p50"] or 0.0,
             r["latency_ms"]["p99"] or 0.0]
            + [100 * r["exit_mix"].get(str(k), 0) for k in exits]
            + [float("nan") if err is None else err, r["refused_429"]]
        )  # fmt: skip
    v = result["verdict"]
    hard = [h["rate"] for h in v["rates_where_full_depth_meets_under_half"]]
    summary = (
        f"budget {result['budget_ms']} ms, {result['max_new_tokens']} new tokens; "
        f"full depth meets < 50% at rates {hard}; SortedServe meets ≥ 95% at "
        f"{v['rates_where_sortedserve_meets_95_there']}; median |actual/predicted − 1| "
        f"{v['median_prediction_error_sortedserve']}"
    )
    return table(headers, rows) + "\n" + summary


def run(args: argparse.Namespace) -> int:
    from app.api.launcher import ServerProcess
    from app.bench.common import write_results

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    # SIGTERM must unwind too, so that the server started below is stopped with us
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    if args.url:
        result = bench(args.url.rstrip("/"), args)
    else:
        env = {
            "SORTEDSERVE_TORCH_THREADS": str(args.threads),
            "SORTEDSERVE_MAX_BATCH_SIZE": str(args.max_batch_size),
            "SORTEDSERVE_MAX_QUEUE": "256",
            "SORTEDSERVE_API_KEY": "",
        }
        with ServerProcess(args.model, args.log, env, args=["--no-access-log"]) as server:
            result = bench(server.url, args)
    write_results(args.out, result)
    print(report(result))  # the benchmark's report is its output
    logger.info("wrote %s", args.out)
    return 0
