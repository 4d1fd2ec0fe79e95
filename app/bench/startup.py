"""``python -m app bench startup``: how long until ``/ready``, cold and warm?

Starts the real server (``python -m app serve``) and times it from the process start to the first
``200`` from ``/ready``, for each arm in turn:

- ``cold``: an empty profile cache, the default start-up profile (a few exits, fitted, capped);
- ``warm``: the same again, the profile now cached (ready in the time of the load alone);
- ``all-exits`` (``--with-all-exits``): an empty cache and every exit timed at every batch size
  with no cap (``--profile-depths 0``), as before the fitted profile.

The profile's own seconds are read from the server log. Issue 11's target: ``/ready`` within 60 s
on Sorted SmolLM2 with a cold cache, the profile step at most 15 s. Writes
``bench/results/startup.json``.
"""

from __future__ import annotations

import argparse
import logging
import re
import tempfile
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

DEFAULT_OUT = Path("bench/results/startup.json")
PROFILE_LINE = re.compile(r"measured the latency profile in ([0-9.]+) s")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, default=Path("model_store/default"), help="checkpoint")
    p.add_argument("--threads", type=int, default=2, help="torch threads of the server")
    p.add_argument("--max-batch-size", type=int, default=16, help="slots (default 16)")
    p.add_argument(
        "--with-all-exits",
        action="store_true",
        help="also start once timing every exit at every batch size (the old profile)",
    )
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON (default {DEFAULT_OUT})")
    p.add_argument("--log", type=Path, default=Path("bench/results/startup-server.log"))


def _start(args: argparse.Namespace, cache: Path, extra: list[str]) -> dict[str, Any]:
    from app.api.launcher import ServerProcess

    env = {
        "SORTEDSERVE_TORCH_THREADS": str(args.threads),
        "SORTEDSERVE_MAX_BATCH_SIZE": str(args.max_batch_size),
        "SORTEDSERVE_PROFILE_CACHE_DIR": str(cache),
        "SORTEDSERVE_API_KEY": "",
    }
    t0 = time.perf_counter()
    with ServerProcess(args.model, args.log, env, args=["--no-access-log", *extra]) as server:
        ready_s = time.perf_counter() - t0
        info = _info(server.url)
    log = args.log.read_text(errors="replace")
    found = PROFILE_LINE.findall(log)
    profile = info["latency_profile"]
    return {
        "ready_s": round(ready_s, 1),
        "profile_s": float(found[-1]) if found else None,
        "profile_source": profile["source"],
        "profiled_batch_sizes": profile["batch_sizes"],
        "fitted_exits": [e["exit_layer"] for e in profile["exits"] if e.get("fitted")],
    }


def _info(url: str) -> dict[str, Any]:
    import httpx

    return httpx.get(f"{url}/info", timeout=30).json()


def run(args: argparse.Namespace) -> int:
    from app.bench.common import machine_info, table, write_results

    logging.getLogger("httpx").setLevel(logging.WARNING)
    arms: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "fitted"
        for name in ("cold", "warm"):
            logger.info("start-up %s", name)
            arms[name] = _start(args, cache, [])
        if args.with_all_exits:
            logger.info("start-up with every exit timed (the old profile)")
            extra = ["--profile-depths", "0", "--profile-max-s", "1e9"]
            arms["all-exits"] = _start(args, Path(tmp) / "all", extra)
    payload = {
        "bench": "startup",
        "machine": machine_info(),
        "model": str(args.model),
        "threads": args.threads,
        "max_batch_size": args.max_batch_size,
        "arms": arms,
        "target": "/ready within 60 s with a cold cache; profile at most 15 s",
    }
    write_results(args.out, payload)
    headers = ["arm", "ready s", "profile s", "source", "batch sizes", "fitted exits"]
    rows = [
        [name, a["ready_s"], a["profile_s"], a["profile_source"], a["profiled_batch_sizes"],
         len(a["fitted_exits"])]
        for name, a in arms.items()
    ]  # fmt: skip
    print(table(headers, rows))  # the benchmark's report is its output
    return 0
