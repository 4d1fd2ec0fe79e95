"""``bench quality --weights float32,int8,int4``: what each weight format costs in held-out loss.

The SoFT checkpoint is scored through the engine's own forward (:mod:`app.engine.model`, built by
:func:`app.engine.weights.build_model` in each format), on the same examples and prompt format as
the HF scoring of ``bench quality`` (``encode_records``, the chat template as trained). Loss per
exit is the token-weighted mean next-token cross-entropy (nats) over the answer tokens, as
``app.training.evaluate.evaluate_exits`` computes it. Each format is compared with the engine's
float32 (run first, whatever ``--weights`` says), so the only difference is the weights' storage.

Targets (issue 12): held-out loss within 1 % of float32 (either way) for int8 and within 3 % for
int4, at every exit.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from app.bench.common import table

TARGETS = {"int8": 0.01, "int4": 0.03}  # relative loss increase allowed over float32


def score_formats(
    model_ref: str | Path,
    data: Path,
    formats: Sequence[str],
    exits_spec: str | None,
    max_len: int,
) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    from app.engine.loader import load_checkpoint
    from app.engine.weights import build_model
    from app.training.data import IGNORE_INDEX, encode_records, load_alpaca
    from app.training.soft import parse_exits

    ckpt = load_checkpoint(model_ref, keep_adapter=True)  # the int formats' side path
    num_layers = ckpt.meta.num_layers
    exits = parse_exits(exits_spec, None, num_layers) if exits_spec else list(ckpt.meta.exits)
    trained = (ckpt.meta.training or {}).get("chat_template")
    chat = bool(ckpt.tokenizer.chat_template) if trained is None else bool(trained)
    examples = encode_records(ckpt.tokenizer, load_alpaca(data), max_len, chat)
    if not examples:
        raise ValueError(f"{data} yields no examples")
    longest = max(len(e.input_ids) for e in examples)
    order = ["float32", *(f for f in formats if f != "float32")]
    by_format: dict[str, dict[str, float]] = {}
    kernels: dict[str, str] = {}
    head_kernels: dict[str, str] = {}
    tokens = 0
    for fmt in order:
        model = build_model(
            ckpt.hf_config,
            ckpt.tensors,
            max(longest, 8),
            "cpu",
            torch.float32,
            weights=fmt,
            adapter=ckpt.adapter,
        )
        kernels[fmt] = model.kernel_choice.kernel  # the layers'; the head's beside it
        head_kernels[fmt] = model.head.kernel
        sums = dict.fromkeys(exits, 0.0)
        tokens = 0
        with torch.inference_mode():
            for e in examples:
                ids = torch.tensor(e.input_ids)
                target = torch.tensor(e.labels[1:])
                keep = target != IGNORE_INDEX
                n = int(keep.sum())
                if n == 0:
                    continue
                tokens += n
                for k in exits:
                    logits = model.prefill(ids, k, all_logits=True)[:-1][keep]
                    sums[k] += float(F.cross_entropy(logits, target[keep], reduction="sum"))
        by_format[fmt] = {str(k): sums[k] / tokens for k in exits}
        del model
    rows = []
    for fmt in order:
        for k in exits:
            loss, ref = by_format[fmt][str(k)], by_format["float32"][str(k)]
            limit = TARGETS.get(fmt)
            rows.append(
                {
                    "weights": fmt,
                    "exit": k,
                    "loss": round(loss, 4),
                    "vs_float32": round((loss - ref) / ref, 5),
                    "target": limit,
                    "met": None if limit is None else abs(loss - ref) / ref <= limit,
                }
            )
    return {
        "model": str(model_ref),
        "data": str(data),
        "examples": len(examples),
        "tokens": tokens,
        "chat_template": chat,
        "num_layers": num_layers,
        "exits": exits,
        "kernels": kernels,
        "head_kernels": head_kernels,
        "by_format": by_format,
        "sorted_json_eval": {str(k): v for k, v in (ckpt.meta.eval.get("by_exit") or {}).items()},
        "rows": rows,
        "targets_met": {
            fmt: all(r["met"] for r in rows if r["weights"] == fmt)
            for fmt in TARGETS
            if fmt in order
        },
    }


def format_table(result: dict[str, Any]) -> str:
    L = result["num_layers"]
    lines = [
        [
            r["weights"],
            f"{r['exit']}/{L}",
            r["loss"],
            f"{100 * r['vs_float32']:+.2f} %",
            "" if r["target"] is None else f"within {100 * r['target']:.0f} %",
            "" if r["met"] is None else ("yes" if r["met"] else "NO"),
        ]
        for r in result["rows"]
    ]
    return table(["weights", "exit", "loss (nats)", "vs float32", "target", "met"], lines)
