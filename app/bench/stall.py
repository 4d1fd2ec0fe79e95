"""``python -m app bench stall``: do running streams stall while a long prompt is prefilled?

Starts the real server once per ``--prefill-chunk`` arm (interleaved over ``--repeats``), opens
``--streams`` SSE streams on ``/v1/generate`` at full depth, and once every stream is decoding
sends one prompt of ``--prompt-tokens`` token ids (``/v1/completions``, one new token). Token
arrival times are taken on the client. Per arm and repeat it reports the streams' normal
inter-token gap (the median before the long prompt arrived), the largest gap while it was
prefilled, their ratio, and the long prompt's own time to answer. Writes
``bench/results/stall.json``. Issue 11's target: the largest gap at most 3× the normal one.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import logging
import random
import statistics
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

DEFAULT_OUT = Path("bench/results/stall.json")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, default=Path("model_store/default"), help="checkpoint")
    p.add_argument("--chunks", default="256,0", help="--prefill-chunk arms (default 256,0)")
    p.add_argument("--streams", type=int, default=8, help="running streams (default 8)")
    p.add_argument("--prompt-tokens", type=int, default=1500, help="the long prompt's tokens")
    p.add_argument("--repeats", type=int, default=2, help="rounds over the arms (default 2)")
    p.add_argument("--threads", type=int, default=2, help="torch threads of the server")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON (default {DEFAULT_OUT})")
    p.add_argument("--log", type=Path, default=Path("bench/results/stall-server.log"))


async def _stream(client: Any, url: str, times: list[float], started: asyncio.Event) -> None:
    body = {
        "prompt": "Write a long story about a lighthouse keeper.",
        "max_new_tokens": 1000,
        "exit_layer": int((await client.get(f"{url}/info")).json()["exits"][-1]),
        "ignore_eos": True,
        "stream": True,
    }
    async with client.stream("POST", f"{url}/v1/generate", json=body) as r:
        async for line in r.aiter_lines():
            if line.startswith("event: token"):
                times.append(time.perf_counter())
                if len(times) >= 10:
                    started.set()


async def _round(url: str, streams: int, prompt_ids: list[int]) -> dict[str, Any]:
    import httpx

    async with httpx.AsyncClient(timeout=300) as client:
        times: list[list[float]] = [[] for _ in range(streams)]
        ready = [asyncio.Event() for _ in range(streams)]
        tasks = [
            asyncio.create_task(_stream(client, url, t, e))
            for t, e in zip(times, ready, strict=True)
        ]
        await asyncio.gather(*(e.wait() for e in ready))
        await asyncio.sleep(0.5)  # a steady state first
        sent = time.perf_counter()
        r = await client.post(
            f"{url}/v1/completions",
            json={"model": "m", "prompt": prompt_ids, "max_tokens": 1, "temperature": 0},
        )
        r.raise_for_status()
        answered = time.perf_counter()
        await asyncio.sleep(0.5)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    before = [b - a for t in times for a, b in itertools.pairwise(t) if b < sent]
    # gaps that overlap the long prompt's time in the server
    during = [b - a for t in times for a, b in itertools.pairwise(t) if b > sent and a < answered]
    normal, worst = statistics.median(before), max(during, default=0.0)
    return {
        "normal_gap_ms": round(normal * 1000, 2),
        "max_gap_ms": round(worst * 1000, 2),
        "ratio": round(worst / normal, 2),
        "long_prompt_ms": round((answered - sent) * 1000, 1),
        "long_prompt_tokens": r.json()["usage"]["prompt_tokens"],
    }


def run(args: argparse.Namespace) -> int:
    from app.api.launcher import ServerProcess
    from app.bench.common import machine_info, table, write_results

    logging.getLogger("httpx").setLevel(logging.WARNING)
    chunks = [int(c) for c in args.chunks.split(",")]
    rng = random.Random(0)
    prompt_ids = [rng.randrange(100, 40000) for _ in range(args.prompt_tokens)]
    rounds = []
    for repeat in range(args.repeats):
        for chunk in chunks if repeat % 2 == 0 else chunks[::-1]:
            env = {
                "SORTEDSERVE_TORCH_THREADS": str(args.threads),
                "SORTEDSERVE_MAX_BATCH_SIZE": str(max(args.streams + 1, 2)),
                "SORTEDSERVE_PREFILL_CHUNK": str(chunk),
                "SORTEDSERVE_API_KEY": "",
            }
            logger.info("repeat %d, --prefill-chunk %d: starting the server", repeat + 1, chunk)
            with ServerProcess(args.model, args.log, env, args=["--no-access-log"]) as server:
                result = asyncio.run(_round(server.url, args.streams, prompt_ids))
            rounds.append({"prefill_chunk": chunk, "repeat": repeat + 1, **result})
            logger.info("%s", rounds[-1])
    payload = {
        "bench": "stall",
        "machine": machine_info(),
        "model": str(args.model),
        "streams": args.streams,
        "prompt_tokens": args.prompt_tokens,
        "threads": args.threads,
        "rounds": rounds,
        "target": "max gap <= 3x the normal gap while the long prompt is prefilled",
    }
    write_results(args.out, payload)
    headers = ["chunk", "repeat", "normal gap ms", "max gap ms", "ratio", "long prompt ms"]
    rows = [
        [r["prefill_chunk"], r["repeat"], r["normal_gap_ms"], r["max_gap_ms"], r["ratio"],
         r["long_prompt_ms"]]
        for r in rounds
    ]  # fmt: skip
    print(table(headers, rows))  # the benchmark's report is its output
    return 0
