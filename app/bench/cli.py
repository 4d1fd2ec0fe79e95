"""``python -m app bench <name>``: one sub-command per benchmark module.

A benchmark is a module in ``app/bench/`` with ``add_arguments(parser)`` and ``run(args) -> int``
(import torch and friends inside ``run`` so that ``--help`` stays fast). Register it in
:data:`BENCHES`; a module that does not exist yet is skipped.
"""

from __future__ import annotations

import argparse
import importlib

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
    "quality": (
        "app.bench.quality",
        "held-out loss per exit, SoFT checkpoint against an SFT checkpoint",
    ),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench", metavar="BENCH", required=True)
    for name, (module_name, help_text) in BENCHES.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue
        p = sub.add_parser(
            name,
            help=help_text,
            description=(module.__doc__ or help_text).strip(),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(p)
        p.set_defaults(bench_module=module)


def run(args: argparse.Namespace) -> int:
    return int(args.bench_module.run(args) or 0)
