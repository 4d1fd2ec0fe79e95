"""``python -m app.ray_serve.bench``: the three request routers side by side on one load stream.

For each router (``budget``, ``pow2`` = Ray's default, ``round_robin``) it starts
``python -m app serve-ray`` with that router (same checkpoint, replicas and settings), warms it,
plays the same seeded open-loop stream (:mod:`app.ray_serve.bench_load`) and stops it. Budgets are
set once from the idle full-depth latency of a short request measured on the first server
(tight = ``--tight`` × that, loose = ``--loose`` × that), so every router faces the same stream.
Reports, per router: share of budgets met on the client's clock, mean exit, p99 latency; JSON in
``bench/results/ray_router.json``. Run it on a quiet machine (``flock`` the CPU lock).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import signal
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from app.ray_serve.bench_load import measure_idle_ms, plan_stream, play, stream_json, summarise
from app.ray_serve.launcher import RayServerProcess

logger = logging.getLogger(__name__)

ROUTERS = ("budget", "pow2", "round_robin")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m app.ray_serve.bench", description=__doc__)
    p.add_argument("--model", default="model_store/tiny", help="checkpoint (default: tiny)")
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--routers", default=",".join(ROUTERS), help="comma-separated, in run order")
    p.add_argument("--rate", type=float, default=6.0, help="arrivals per second (default 6)")
    p.add_argument("--duration", type=float, default=40.0, help="seconds of arrivals (40)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--heavy-share", type=float, default=0.25, help="share of heavy requests")
    p.add_argument("--heavy-tokens", type=int, default=160, help="tokens of a heavy request")
    p.add_argument("--short-tokens", type=int, default=32, help="tokens of a budgeted request")
    p.add_argument("--tight", type=float, default=1.5, help="tight budget / idle latency")
    p.add_argument("--loose", type=float, default=4.0, help="loose budget / idle latency")
    p.add_argument("--threads", type=int, default=1, help="torch threads per replica")
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument(
        "--kill-at",
        type=float,
        default=None,
        help="fault run instead: SIGKILL one replica this many seconds into the stream "
        "(first router only); report failed requests and the time until /ready lists a new one",
    )
    p.add_argument("--out", type=Path, default=Path("bench/results/ray_router.json"))
    p.add_argument("--log-dir", type=Path, default=Path("build/ray-bench"))
    return p


def server_args(a: argparse.Namespace, router: str) -> list[str]:
    return [
        *("--router", router, "--replica-cpus", "0", "--threads", str(a.threads)),
        *("--max-batch-size", str(a.max_batch_size), "--stats-period", "0.1"),
    ]


def run_one(a: argparse.Namespace, router: str, budgets: dict[str, float] | None) -> dict[str, Any]:
    log = a.log_dir / f"serve-ray-{router}.log"
    server = RayServerProcess(a.model, log, replicas=a.replicas, args=server_args(a, router))
    t0 = time.perf_counter()
    server.start(timeout_s=600)
    ready_s = time.perf_counter() - t0
    try:
        info = httpx.get(f"{server.url}/info", timeout=30).json()
        idle = asyncio.run(measure_idle_ms(server.url, a.short_tokens))
        if budgets is None:
            budgets = {"idle_ms": idle, "tight_ms": a.tight * idle, "loose_ms": a.loose * idle}
        stream = plan_stream(
            a.rate,
            a.duration,
            a.seed,
            a.heavy_share,
            a.heavy_tokens,
            a.short_tokens,
            budgets["tight_ms"],
            budgets["loose_ms"],
        )
        logger.info("%s: %d requests over %.0f s", router, len(stream), a.duration)
        fault: dict[str, Any] = {}
        killer = None
        if a.kill_at is not None:
            killer = threading.Thread(target=kill_and_watch, args=(server.url, a.kill_at, fault))
            killer.start()
        outcomes = asyncio.run(play(server.url, stream))
        if killer is not None:
            killer.join()
        summary = summarise(outcomes, info["num_layers"])
        if fault:
            summary["fault"] = fault
        summary.update(router=router, ready_s=round(ready_s, 1), idle_ms_here=round(idle, 2))
        return {"summary": summary, "budgets": budgets, "stream": stream_json(stream)}
    finally:
        server.stop()


def kill_and_watch(url: str, at_s: float, out: dict[str, Any], limit_s: float = 120) -> None:
    """SIGKILL, ``at_s`` into the run, the first replica seen with a request in flight (within
    5 s; else the busiest); time until /ready lists a new one."""
    time.sleep(at_s)
    details = httpx.get(f"{url}/ready", timeout=30).json()["details"]
    look_until = time.perf_counter() + 5
    while time.perf_counter() < look_until and not any(d["inflight"] for d in details):
        time.sleep(0.02)
        details = httpx.get(f"{url}/ready", timeout=30).json()["details"]
    victim = max(details, key=lambda d: d["inflight"])
    os.kill(victim["pid"], signal.SIGKILL)
    killed = time.perf_counter()
    out.update(killed_replica=victim["replica"], inflight_at_kill=victim["inflight"])
    while time.perf_counter() - killed < limit_s:
        r = httpx.get(f"{url}/ready", timeout=30)
        names = r.json().get("replicas", []) if r.status_code == 200 else []
        if len(names) == len(details) and victim["replica"] not in names:
            out["recovered_s"] = round(time.perf_counter() - killed, 2)
            return
        time.sleep(0.25)
    out["recovered_s"] = None


def table(results: list[dict[str, Any]]) -> str:
    head = "| router | budgets met | tight met | loose met | mean exit | p99 ms | failed |"
    lines = [head, "|---|---|---|---|---|---|---|"]
    for r in results:
        s = r["summary"]
        k = s["by_kind"]
        lines.append(
            f"| {s['router']} | {_pc(s['met_share'])} | {_pc(k['tight']['met_share'])} | "
            f"{_pc(k['loose']['met_share'])} | {s['mean_exit']} of {s['num_layers']} | "
            f"{s['p99_ms']:.0f} | {s['failed']} |"
        )
    return "\n".join(lines)


def _pc(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f} %"


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    a = parser().parse_args(argv)
    routers = [r.strip() for r in a.routers.split(",") if r.strip()]
    if a.kill_at is not None:
        routers = routers[:1]
    results = []
    budgets = None
    for router in routers:
        result = run_one(a, router, budgets)
        budgets = result["budgets"]
        results.append(result)
        logger.info("%s: %s", router, json.dumps(result["summary"]))
    print(table(results))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "bench": "ray_router",
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "python": sys.version.split()[0]},
        "args": {k: str(v) for k, v in vars(a).items()},
        "budgets": budgets,
        "results": [r["summary"] for r in results],
        "stream": results[0]["stream"] if results else [],
    }
    a.out.write_text(json.dumps(payload, indent=2) + "\n")
    logger.info("wrote %s", a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
