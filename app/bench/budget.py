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
import logging
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from app.bench.budget_load import arrivals, load_prompts, run_open_loop
from app.bench.budget_summary import report, summarize, verdict

logger = logging.getLogger(__name__)

DEFAULT_OUT = Path("bench/results/budget.json")


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
