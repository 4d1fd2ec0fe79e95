"""``python -m app bench budget``: do latency budgets hold under open-loop load?

Starts the real server (``python -m app serve``) on the checkpoint and measures, first, the idle
full-depth latency of each prompt class and the **full-depth capacity**: a closed loop of
max-batch-size clients of the same workload at the deepest exit, in completed requests per second
(``x`` in ``--rates``; 1000 / idle latency is recorded beside it). Then, ``--repeats`` times with
another seed, at every Poisson arrival rate it sends the same request stream (same arrival times,
prompts and budgets) twice:

- **sortedserve**: each request carries ``budget_ms``; the depth scheduler picks the exit;
- **full-depth**: the same requests with ``exit_layer`` = the deepest exit and no budget.

The workload mixes short chat turns with a ``--long-share`` of long documents, and tight with
loose budgets (``--budget-factors`` × the idle full-depth latency of the request's prompt class;
see :mod:`app.bench.budget_workload`). A budget is met when the **client** had the whole answer
within it; the server's own ``elapsed_ms`` verdict is reported beside it. Refused or failed
requests count as missed. Requests ignore EOS (``ignore_eos``), so both arms do the same work.

Reported per rate and arm: the met share of every repeat and their spread, per budget class too,
the exit mix and the held-out quality it implies (``/info``'s per-exit table weighted by the mix),
latency percentiles and the prediction error |actual / predicted − 1|. Prints tables and writes
JSON to ``bench/results/budget.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from app.bench.budget_load import (
    HELDOUT,
    arrivals,
    idle_latency,
    load_prompts,
    measure_capacity,
    run_open_loop,
    wait_idle,
)
from app.bench.budget_repeats import aggregate, report, verdict
from app.bench.budget_summary import summarize
from app.bench.budget_workload import (
    LONG_SOURCE,
    TINYSTORIES,
    budgets_for,
    implied_quality,
    load_long_prompts,
    parse_factors,
    parse_rates,
    plan_requests,
)

logger = logging.getLogger(__name__)

DEFAULT_OUT = Path("bench/results/budget.json")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, default=Path("model_store/default"), help="checkpoint")
    p.add_argument("--url", help="use this running server instead of starting one")
    p.add_argument(
        "--target",
        choices=("server", "ray"),
        default="server",
        help="ray: the Ray Serve routers side by side instead (python -m app.ray_serve.bench, "
        "which has the rest of its flags), with --model, --duration, --seed and --threads",
    )
    p.add_argument(
        "--rates",
        default="1x,2x,4x",
        help="arrival rates in requests/s, or, suffixed with x, multiples of the measured "
        "full-depth capacity (see --capacity-seconds); default 1x,2x,4x",
    )
    p.add_argument(
        "--duration", type=float, default=15.0, help="seconds of arrivals per run (default 15)"
    )
    p.add_argument("--repeats", type=int, default=3, help="sweeps, each with another seed (3)")
    p.add_argument(
        "--budget-ms", type=float, help="one latency budget for every request (default: factors)"
    )
    p.add_argument(
        "--budget-factors",
        default="1.5,4",
        help="budget = a factor drawn per request × the idle full-depth latency of its prompt "
        "class (client-measured); comma-separated (default 1.5,4: tight and loose)",
    )
    p.add_argument("--budget-factor", type=float, help="one factor for all (as --budget-factors F)")
    p.add_argument(
        "--long-share",
        type=float,
        default=0.1,
        help="share of long-document prompts (~300 tokens of TinyStories), the rest short chat "
        "turns (held-out instructions); default 0.1",
    )
    p.add_argument(
        "--capacity-seconds",
        type=float,
        default=20.0,
        help="length of the closed-loop capacity measurement (default 20)",
    )
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens per request")
    p.add_argument("--seed", type=int, default=0, help="arrival times, prompts and budget draws")
    p.add_argument(
        "--stop-at-eos", action="store_true", help="let requests end at EOS (default: ignore it)"
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads of the started server")
    p.add_argument("--max-batch-size", type=int, default=16, help="slots of the started server")
    p.add_argument(
        "--weights",
        default="auto",
        help="weight format of the started server (auto, float32, bfloat16, int8, int4)",
    )
    p.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"JSON results (default {DEFAULT_OUT})"
    )
    p.add_argument("--log", type=Path, default=Path("bench/results/budget-server.log"))


def bench(url: str, args: argparse.Namespace) -> dict[str, Any]:
    import httpx

    from app.bench.common import machine_info

    load_at_start = os.getloadavg()
    info = httpx.get(f"{url}/info", timeout=10).json()
    exits = info["exits"]
    deepest, shallowest = exits[-1], exits[0]
    by_exit = {str(k): v for k, v in (info.get("quality", {}).get("by_exit") or {}).items()}
    n_new = args.max_new_tokens
    common = {"max_new_tokens": n_new, "ignore_eos": not args.stop_at_eos}
    full = {**common, "exit_layer": deepest}
    short = load_prompts(args.seed)
    long = load_long_prompts(args.seed) if args.long_share > 0 else []
    if args.long_share > 0 and not long:
        logger.warning("no long documents (%s missing): short prompts only", TINYSTORIES)
    share = args.long_share if long else 0.0
    idle = {"short": idle_latency(url, short, full)}
    if long:
        idle["long"] = idle_latency(url, long, full)
    shallow_idle = idle_latency(url, short, {**common, "exit_layer": shallowest})
    idle_ms = {k: v["client"] for k, v in idle.items()}
    clients = info["limits"]["max_batch_size"]
    planned = plan_requests(4000, short, long, share, [1.0], args.seed)
    bodies = [{"prompt": p.prompt, **full} for p in planned]
    capacity = measure_capacity(url, bodies, clients, args.capacity_seconds)
    factors = [args.budget_factor] if args.budget_factor else parse_factors(args.budget_factors)
    rates = parse_rates(args.rates, capacity["requests_per_s"])
    logger.info(
        "idle full-depth latency of %d tokens %s ms, exit %d %s; capacity %.2f req/s; rates %s",
        n_new, idle, shallowest, shallow_idle, capacity["requests_per_s"], rates,
    )  # fmt: skip
    runs = []
    for rep in range(args.repeats):
        seed = args.seed + 1000 * rep
        pools_r = (load_prompts(seed), load_long_prompts(seed) if share else [])
        for i, (label, rate) in enumerate(rates):
            times = arrivals(rate, args.duration, seed + i)
            planned = plan_requests(len(times), *pools_r, share, factors, seed + i)
            budgets = budgets_for(planned, idle_ms, args.budget_ms)
            classes = ["fixed" if args.budget_ms else f"{p.factor:g}x" for p in planned]
            kinds = [p.kind for p in planned]
            arms = ("sortedserve", "full-depth")
            for arm in arms if (i + rep) % 2 == 0 else arms[::-1]:
                bodies = [
                    {"prompt": p.prompt, **common, "budget_ms": b}
                    if arm == "sortedserve"
                    else {"prompt": p.prompt, **full}
                    for p, b in zip(planned, budgets, strict=True)
                ]
                wait_idle(url)
                t0 = time.perf_counter()
                outcomes = asyncio.run(run_open_loop(url, bodies, times, timeout_s=300))
                summary = summarize(outcomes, budgets, exits, classes, kinds)
                summary.update(
                    repeat=rep, seed=seed + i, rate_label=label, rate=rate, arm=arm,
                    wall_s=round(time.perf_counter() - t0, 1),
                    implied_quality=implied_quality(summary["exit_mix"], by_exit),
                )  # fmt: skip
                runs.append(summary)
                logger.info(
                    "repeat %d rate %s (%.2f/s) %-11s met %5.1f%% (server %5.1f%%) of %d, "
                    "client p99 %s ms, mean exit %s",
                    rep + 1, label, rate, arm, 100 * (summary["met_share"] or 0),
                    100 * (summary["server_met_share"] or 0), summary["requests"],
                    summary["client_latency_ms"]["p99"], summary["mean_exit"],
                )  # fmt: skip
    by_rate = aggregate(runs, by_exit)
    final_info = httpx.get(f"{url}/info", timeout=10).json()
    return {
        "benchmark": "budget",
        "command": "python -m app " + " ".join(sys.argv[1:]),
        "machine": machine_info(load_at_start),
        "model": info["model_id"],
        "device": info["device"],
        "weights": info.get("weights"),
        "weight_kernel": info.get("weight_kernel"),
        "exits": exits,
        "quality": info.get("quality"),
        "max_new_tokens": n_new,
        "ignore_eos": not args.stop_at_eos,
        "workload": {
            "short": f"{HELDOUT} instructions ({len(short)} prompts)",
            "long": f"{LONG_SOURCE} ({len(long)} documents)" if long else None,
            "long_share": share,
        },
        "budget_ms": args.budget_ms,
        "budget_factors": factors,
        "budget_rule": "fixed" if args.budget_ms else "factor x client idle full-depth latency",
        "idle_latency_ms": idle_ms,
        "idle_latency_client_and_server_ms": {**idle, f"exit {shallowest} short": shallow_idle},
        "idle_rate_per_s": round(1000.0 / idle_ms["short"], 3),
        "capacity": capacity,
        "rates": [{"label": k, "requests_per_s": v} for k, v in rates],
        "duration_s": args.duration,
        "seed": args.seed,
        "repeats": args.repeats,
        "runs": runs,
        "by_rate": by_rate,
        "verdict": verdict(by_rate, by_exit),
        "scheduler": final_info["latency_profile"],
    }


def run(args: argparse.Namespace) -> int:
    from app.api.launcher import ServerProcess
    from app.bench.common import write_results

    if args.target == "ray":
        from app.ray_serve.bench import main as ray_bench

        shared = {"--model": args.model, "--duration": args.duration, "--seed": args.seed}
        argv = [str(x) for item in {**shared, "--threads": args.threads}.items() for x in item]
        return ray_bench(argv)

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    # SIGTERM must unwind too, so that the server started below is stopped with us
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    if args.url:
        result = bench(args.url.rstrip("/"), args)
    else:
        env = {
            "SORTEDSERVE_TORCH_THREADS": str(args.threads),
            "SORTEDSERVE_MAX_BATCH_SIZE": str(args.max_batch_size),
            "SORTEDSERVE_WEIGHTS": args.weights,
            "SORTEDSERVE_MAX_QUEUE": "512",
            "SORTEDSERVE_API_KEY": "",
        }
        with ServerProcess(args.model, args.log, env, args=["--no-access-log"]) as server:
            result = bench(server.url, args)
    write_results(args.out, result)
    print(report(result))  # the benchmark's report is its output
    logger.info("wrote %s", args.out)
    return 0
