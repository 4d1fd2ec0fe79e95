"""``python -m app bench <name>``: one sub-command per benchmark module.

A benchmark is a module in ``app/bench/`` with ``add_arguments(parser)`` and ``run(args) -> int``
(import torch and friends inside ``run`` so that ``--help`` stays fast). Register it in
:data:`BENCHES`; a module that does not exist yet is skipped.
"""

from __future__ import annotations

import argparse

# bench name -> (module, one-line help)
BENCHES: dict[str, tuple[str, str]] = {
    "decode": (
        "app.bench.decode",
        "batch-1 greedy decode tokens/s at every exit against Hugging Face generate",
    ),
    "batch": (
        "app.bench.batch",
        "aggregate tokens/s of 1, 4, 16 concurrent streams at mixed exits",
    ),
    "budget": (
        "app.bench.budget",
        "share of requests meeting budget_ms under Poisson load, against full depth",
    ),
    "startup": (
        "app.bench.startup",
        "seconds until /ready with a cold and a warm profile cache",
    ),
    "stall": (
        "app.bench.stall",
        "largest inter-token gap of running streams while a long prompt is prefilled",
    ),
    "step": (
        "app.bench.step",
        "where one decode step's time goes, op by op (torch.profiler), per weight format",
    ),
    "quality": (
        "app.bench.quality",
        "held-out loss per exit, SoFT checkpoint against an SFT checkpoint",
    ),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from app.cli import add_module_commands

    sub = parser.add_subparsers(dest="bench", metavar="BENCH", required=True)
    for name, module in add_module_commands(sub, BENCHES).items():
        sub.choices[name].set_defaults(bench_module=module)


def run(args: argparse.Namespace) -> int:
    return int(args.bench_module.run(args) or 0)
