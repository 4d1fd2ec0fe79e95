"""The command line. Each command lives in its own module with ``add_arguments`` and ``run``;
those modules import torch and friends inside ``run`` so that ``--help`` stays fast."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("app.api.serve_cli", "serve a checkpoint over HTTP"),
    "train": ("app.training.train_cli", "Sorted Fine-Tune (or SFT) a checkpoint on Alpaca data"),
    "eval-exits": ("app.training.eval_cli", "held-out loss and perplexity at every exit"),
    "serve-ray": (
        "app.ray_serve.serve_cli",
        "serve the same API from N engine replicas on Ray Serve (budget-aware routing)",
    ),
    "bench": ("app.bench.cli", "benchmarks: decode, batch, budget, quality"),
    "build-tiny": (
        "app.training.tiny_model",
        "rebuild the 3.4M test fixtures model_store/tiny and tiny-sft from ../shared/data",
    ),
}


def add_module_commands(
    sub: argparse._SubParsersAction, registry: dict[str, tuple[str, str]]
) -> dict[str, object]:
    """One sub-command per module of ``registry`` (name -> (module, help)); a module that does
    not exist is skipped. Each module has ``add_arguments(parser)`` and ``run(args)``."""
    modules: dict[str, object] = {}
    for name, (module_name, help_text) in registry.items():
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
        module.add_arguments(p)  # type: ignore[attr-defined]
        p.set_defaults(command_module=module)
        modules[name] = module
    return modules


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m app",
        description="SortedServe: serve a Sorted-Fine-Tuned model with per-request latency budgets",
    )
    parser.add_argument("--log-level", default="INFO", help="logging level (default: INFO)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_module_commands(sub, COMMANDS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv if argv is not None else sys.argv[1:])
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return int(args.command_module.run(args) or 0)
