"""``python -m app.bench.kernel_micro [--threads N] [--out FILE]``: the weight formats' kernels on
SmolLM2-135M's shapes, one row and 16 rows, cold (30 layers' worth of distinct weights, as a
decode step reads them) and the 576x49152 tied head, median ms. Random weights; the numbers are
what :mod:`app.engine.kernels` chooses between at start-up (it times one row only).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

LAYER_SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # qkv, o, gate_up, down
HEAD_SHAPE = (49152, 576)


def _time(fn: Callable[[], object], budget: float = 0.6) -> float:
    fn()
    samples: list[float] = []
    end = time.perf_counter() + budget
    while len(samples) < 3 or time.perf_counter() < end:
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return round(statistics.median(samples) * 1000, 3)


def main() -> None:
    import torch

    from app.engine.linear import (
        Linear,
        cast_linear,
        int4_linear,
        int8_linear,
        onednn_cast_linear,
    )

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("bench/results/kernels.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    bf, f32 = torch.bfloat16, torch.float32
    makers = {
        "float32 mm": lambda w: Linear(w, None, False),
        "float32 oneDNN packed": lambda w: Linear(w, None, True),
        "bfloat16 mm": lambda w: cast_linear(w, None, bf),
        "bfloat16 oneDNN packed": lambda w: onednn_cast_linear(w, None, bf),
        "int8 _weight_int8pack_mm, bf16 act": lambda w: int8_linear(w, None, bf),
        "int8 _weight_int8pack_mm, f32 act": lambda w: int8_linear(w, None, f32),
        "int4 _weight_int4pack_mm_for_cpu, bf16 act": lambda w: int4_linear(w, None, bf),
        "int4 _weight_int4pack_mm_for_cpu, f32 act": lambda w: int4_linear(w, None, f32),
    }
    g = torch.Generator().manual_seed(0)
    base = [torch.randn(o, i, generator=g) * 0.02 for o, i in LAYER_SHAPES]
    head = torch.randn(*HEAD_SHAPE, generator=g) * 0.02
    results: dict[str, dict[str, float]] = {}
    for name, make in makers.items():
        r: dict[str, float] = {}
        layers = [[make(w) for w in base] for _ in range(30)]
        slow = name.endswith("f32 act")  # 10-30x slower: one row only
        for rows in (1,) if slow else (1, 16):
            xs = [torch.randn(rows, i, generator=g) for _, i in LAYER_SHAPES]

            def step(layers=layers, xs=xs) -> None:
                for layer in layers:
                    for linear, x in zip(layer, xs, strict=True):
                        linear(x)

            r[f"30 layers, {rows} row(s)"] = _time(step)
        del layers
        h = make(head)
        for rows in (1,) if slow else (1, 16):
            x = torch.randn(rows, HEAD_SHAPE[1], generator=g)
            r[f"head, {rows} row(s)"] = _time(lambda h=h, x=x: h(x))
        results[name] = r
        print(name, r, flush=True)
    from app.bench.common import machine_info, write_results

    write_results(args.out, {"bench": "kernels", "ms": results, "machine": machine_info()})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
