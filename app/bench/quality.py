"""``python -m app bench quality``: held-out loss per exit, SoFT checkpoint against SFT.

Reproduces at small scale the paper's Table 4/5 finding: SoFT's intermediate sub-models are far
better than SFT's at the same depth, and full depth is about equal.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import sys
import time
from pathlib import Path

logger = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--soft", type=Path, default=Path("model_store/default"), help="SoFT model")
    p.add_argument("--sft", type=Path, default=Path("model_store/default-sft"), help="SFT model")
    p.add_argument(
        "--data",
        type=Path,
        default=Path("bench/data/heldout.json"),
        help="held-out Alpaca-format instructions (default: the split build-default held out)",
    )
    p.add_argument("--exits", help="comma-separated exits (default: the SoFT model's)")
    p.add_argument("--max-len", type=int, default=512, help="truncate examples to N tokens")
    p.add_argument("--out", type=Path, default=Path("bench/results/quality.json"), help="JSON")


def compare(soft: dict, sft: dict) -> list[dict]:
    rows = []
    for k in sorted(int(x) for x in soft["by_exit"]):
        a, b = soft["by_exit"][str(k)], sft["by_exit"][str(k)]
        rows.append(
            {
                "exit": k,
                "soft_loss": a,
                "sft_loss": b,
                "soft_minus_sft": round(a - b, 4),
                "soft_over_sft": round(a / b, 4),
                "soft_ppl": round(math.exp(a), 2),
                "sft_ppl": round(math.exp(b), 2),
            }
        )
    return rows


def format_rows(rows: list[dict], num_layers: int) -> str:
    lines = [
        "exit  depth  SoFT loss  SFT loss  SoFT-SFT  SoFT/SFT  SoFT ppl   SFT ppl",
        "----  -----  ---------  --------  --------  --------  --------  --------",
    ]
    for r in rows:
        lines.append(
            f"{r['exit']:>4}  {r['exit'] / num_layers:>5.0%}  {r['soft_loss']:>9.3f}  "
            f"{r['sft_loss']:>8.3f}  {r['soft_minus_sft']:>+8.3f}  {r['soft_over_sft']:>8.3f}  "
            f"{r['soft_ppl']:>8.1f}  {r['sft_ppl']:>8.1f}"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from app.model_store import ModelStoreError, read_sorted_meta
    from app.training.data import DataError
    from app.training.eval_cli import evaluate_checkpoint

    try:
        exits = args.exits or ",".join(str(k) for k in read_sorted_meta(args.soft).exits)
        t0 = time.perf_counter()
        soft = evaluate_checkpoint(args.soft, args.data, exits, max_len=args.max_len)
        sft = evaluate_checkpoint(args.sft, args.data, exits, max_len=args.max_len)
    except (DataError, ModelStoreError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    rows = compare(soft, sft)
    print(f"held-out loss per exit on {args.data} ({soft['examples']} examples)")
    print(format_rows(rows, soft["num_layers"]))
    result = {
        "bench": "quality",
        "soft": str(args.soft),
        "sft": str(args.sft),
        "data": str(args.data),
        "examples": soft["examples"],
        "num_layers": soft["num_layers"],
        "rows": rows,
        "seconds": round(time.perf_counter() - t0, 1),
        "machine": platform.platform(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0
