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
    "bench": ("app.bench.cli", "benchmarks: decode, batch, budget, quality"),
    "build-default": (
        "app.training.default_model",
        "rebuild model_store/default and default-sft from ../shared/data",
    ),
}


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, object]]:
    parser = argparse.ArgumentParser(
        prog="python -m app",
        description="SortedServe: serve a Sorted-Fine-Tuned model with per-request latency budgets",
    )
    parser.add_argument("--log-level", default="INFO", help="logging level (default: INFO)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    modules: dict[str, object] = {}
    for name, (module_name, help_text) in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)  # type: ignore[attr-defined]
        modules[name] = module
    return parser, modules


def main(argv: list[str] | None = None) -> int:
    parser, modules = build_parser()
    args = parser.parse_args(argv if argv is not None else sys.argv[1:])
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return int(modules[args.command].run(args) or 0)  # type: ignore[attr-defined]
