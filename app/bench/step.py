"""``python -m app bench step``: where the time of one decode step goes, op by op.

The engine's own decode step (the runner the server uses: ``ModelRunner.decode``) at one exit,
``--rows`` rows after a ``--context``-token prompt, first timed plainly (``--steps`` steps, median
ms), then under ``torch.profiler``; in a worker thread, as the engine runs it (``--thread``).
The profiler's self CPU time per op type is reported per step and per layer run, grouped into
what it is for:

- ``gemm``: the linear layers' weight reads (the kernels of the weight format, the side path);
- ``attention``: scaled-dot-product attention over the cache;
- ``other``: everything else (norms, rotary, casts, the cache write, views, sampling...): the
  per-op overhead that a leaner step cuts.

Each weight format of ``--weights`` is one engine, timed in turn, interleaved over ``--rounds``.
Writes JSON with machine info to ``--out``.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import threading
import time
from typing import Any

from app.bench.common import add_engine_arguments, load_average, machine_info, write_results

logger = logging.getLogger(__name__)

GEMM_OPS = (
    "aten::_weight_int4pack_mm_for_cpu",
    "aten::_weight_int8pack_mm",
    "aten::mm",
    "aten::addmm",
    "aten::addmm_",
    "mkldnn::_linear_pointwise",
    "aten::linear",
)
ATTENTION_OPS = ("aten::_scaled_dot_product_flash_attention_for_cpu", "aten::bmm", "aten::baddbmm")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_engine_arguments(p, "step", rounds=3)
    p.add_argument(
        "--weights", default="auto", help="comma-separated weight formats (default auto)"
    )
    p.add_argument("--exit", type=int, default=None, help="exit layer (default: full depth)")
    p.add_argument("--rows", type=int, default=1, help="rows decoding together (default 1)")
    p.add_argument("--context", type=int, default=128, help="prompt tokens before (default 128)")
    p.add_argument("--steps", type=int, default=64, help="timed steps per round (default 64)")
    p.add_argument("--top", type=int, default=12, help="op types listed per format (default 12)")
    p.add_argument(
        "--thread",
        choices=["worker", "loader", "worker-beside-loader"],
        default="worker",
        help="where the steps run: a worker thread, as the engine runs them (default); the "
        "thread that loaded the model; or a worker while the loading thread keeps its OpenMP "
        "team (the engine before app/engine/openmp.py)",
    )


def group_of(op: str) -> str:
    if op in GEMM_OPS:
        return "gemm"
    if op in ATTENTION_OPS:
        return "attention"
    return "other"


class StepTimer:
    """One engine's runner, ``rows`` rows at ``exit_layer`` after ``context`` prompt tokens."""

    def __init__(self, engine: Any, exit_layer: int, rows: int, context: int) -> None:
        self.kernel = engine.info.weight_kernel
        self.runner = engine._loop.runner  # the step the server runs, without its thread
        self.exit_layer, self.rows, self.context = exit_layer, rows, context
        self.reset()

    def reset(self) -> None:
        """Prefill every row again: each round starts from the same context length."""
        runner = self.runner
        with runner.inference():
            for row in range(self.rows):
                prompt = [(7 * row + i) % 1000 + 10 for i in range(self.context)]
                runner.prefill(row, prompt, self.exit_layer, None, generate=False)
            runner.set_layout([], 0, [self.context] * self.rows, [self.exit_layer] * self.rows)
        self.tokens = [11] * self.rows
        self.kv_len = self.context + 1

    def step(self) -> None:
        self.tokens, _ = self.runner.decode(self.tokens, self.kv_len, [])
        self.kv_len += 1

    def time(self, steps: int) -> float:
        """Median ms of ``steps`` steps (after a reset and 4 untimed steps)."""
        self.reset()
        samples = []
        with self.runner.inference():
            for _ in range(4):
                self.step()
            for _ in range(steps):
                start = time.perf_counter()
                self.step()
                samples.append(time.perf_counter() - start)
        return statistics.median(samples) * 1000

    def profile(self, steps: int) -> dict[str, dict[str, float]]:
        """Self CPU µs and calls per step, by op type, over ``steps`` profiled steps."""
        from torch.profiler import ProfilerActivity, profile

        self.reset()
        with self.runner.inference():
            for _ in range(4):
                self.step()
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(steps):
                    self.step()
        ops: dict[str, dict[str, float]] = {}
        for event in prof.key_averages():
            if event.self_cpu_time_total <= 0:
                continue
            ops[event.key] = {
                "us_per_step": event.self_cpu_time_total / steps,
                "calls_per_step": event.count / steps,
            }
        return ops


def summarise(ops: dict[str, dict[str, float]], layers: int, top: int) -> dict[str, Any]:
    total = sum(o["us_per_step"] for o in ops.values())
    groups = {g: 0.0 for g in ("gemm", "attention", "other")}
    for name, o in ops.items():
        groups[group_of(name)] += o["us_per_step"]
    listed = sorted(ops.items(), key=lambda kv: -kv[1]["us_per_step"])[:top]
    return {
        "profiled_us_per_step": round(total, 1),
        "us_per_layer": {g: round(v / layers, 1) for g, v in groups.items()},
        "us_per_step": {g: round(v, 1) for g, v in groups.items()},
        "ops_per_step": round(sum(o["calls_per_step"] for o in ops.values()), 1),
        "top_ops": [
            {
                "op": name,
                "group": group_of(name),
                "us_per_step": round(o["us_per_step"], 1),
                "calls_per_step": round(o["calls_per_step"], 2),
            }
            for name, o in listed
        ],
    }


def run(args: argparse.Namespace) -> int:
    import torch

    from app.bench.common import load_engine
    from app.engine import EngineConfig
    from app.engine.openmp import release_thread_pool

    load_at_start = load_average()
    formats = list(dict.fromkeys(f.strip() for f in args.weights.split(",") if f.strip()))
    timers: dict[str, StepTimer] = {}
    for fmt in formats:
        config = EngineConfig(
            device=args.device,
            dtype=args.dtype,
            max_slots=max(args.rows, 1),
            max_seq_len=args.context + args.steps * (args.rounds + 2) + 16,
            torch_threads=args.torch_threads,
            weights=fmt,
        )
        engine = load_engine(args.model, config)
        if engine is None:
            return 2
        exit_layer = args.exit or engine.info.num_layers
        if not 1 <= exit_layer <= engine.info.num_layers:
            logger.error("--exit must be within 1..%d", engine.info.num_layers)
            return 2
        timers[fmt] = StepTimer(engine, exit_layer, args.rows, args.context)
    ms: dict[str, list[float]] = {fmt: [] for fmt in formats}
    profiles: dict[str, dict[str, dict[str, float]]] = {}

    def measure() -> None:
        for r in range(args.rounds):
            for fmt, timer in timers.items():
                ms[fmt].append(timer.time(args.steps))
            logger.info("round %d/%d done", r + 1, args.rounds)
        for fmt, timer in timers.items():
            profiles[fmt] = timer.profile(args.steps)

    if args.thread == "loader":
        measure()
    else:  # as the engine decodes: in a thread of its own, after the loading thread
        if args.thread == "worker":
            release_thread_pool()  # what Engine.start does (app/engine/openmp.py)
        worker = threading.Thread(target=measure, name="bench-step-worker")
        worker.start()
        worker.join()
    results: dict[str, Any] = {}
    for fmt, timer in timers.items():
        summary = summarise(profiles[fmt], timer.exit_layer, args.top)
        results[fmt] = {
            "kernel": timer.kernel,
            "ms_per_step": round(statistics.median(ms[fmt]), 3),
            "ms_per_step_rounds": [round(v, 3) for v in ms[fmt]],
            **summary,
        }
        _print(fmt, results[fmt])
    path = write_results(
        args.out,
        {
            "bench": "step",
            "config": {
                "model": str(args.model),
                "exit": next(iter(timers.values())).exit_layer,
                "rows": args.rows,
                "context": args.context,
                "steps": args.steps,
                "rounds": args.rounds,
                "weights": formats,
                "thread": args.thread,
                "threads_used": torch.get_num_threads(),
            },
            "machine": machine_info(load_at_start),
            "formats": results,
        },
    )
    print(f"wrote {path}")
    return 0


def _print(fmt: str, r: dict[str, Any]) -> None:
    per_layer = r["us_per_layer"]
    print(
        f"\n{fmt} ({r['kernel']}): {r['ms_per_step']:.2f} ms/step; profiled "
        f"{r['profiled_us_per_step'] / 1000:.2f} ms/step, {r['ops_per_step']:.0f} ops; per layer "
        f"gemm {per_layer['gemm']:.1f} µs, attention {per_layer['attention']:.1f} µs, "
        f"other {per_layer['other']:.1f} µs"
    )
    print(f"  {'op':<52} {'group':<9} {'µs/step':>9} {'calls/step':>10}")
    for op in r["top_ops"]:
        print(
            f"  {op['op']:<52} {op['group']:<9} {op['us_per_step']:>9.1f} "
            f"{op['calls_per_step']:>10.2f}"
        )
