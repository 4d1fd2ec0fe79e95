"""``python -m app bench decode``: batch-1 greedy decode speed at every exit, against HF generate
(and, with ``--against llama.cpp``, against llama.cpp on the base's own GGUF).

In one process, on the same checkpoint, prompt and machine, interleaved round by round so that any
background load hits every side alike (the sides: :mod:`app.bench.decode_sides`,
:mod:`app.bench.llama_anchor`):

- Hugging Face ``model.generate`` at full depth: greedy, ``min_new_tokens = max_new_tokens``;
- llama.cpp (optional): the same prompt ids, greedy, the same new tokens and threads;
- the engine at every trained exit, in every weight format of ``--weights`` (one engine each):
  greedy, ``ignore_eos``, one request at a time, through the async interface the server uses.

Reported per format and exit (:mod:`app.bench.decode_report`): tokens/s end to end (prefill
included, as ``generate`` is timed), ms per decoded token after the first, CPU ms per token, and
the targets of issues 3 and 12. Writes JSON with machine info to ``--out``.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from app.bench.common import (
    add_engine_arguments,
    bench_prompt,
    load_average,
    machine_info,
    write_results,
)

logger = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_engine_arguments(p, "decode", rounds=5)
    p.add_argument(
        "--weights",
        default="auto",
        help="comma-separated weight formats to run the engine in, e.g. float32,int8,int4 "
        "(default auto: the dtype's); each is one engine, in the same rounds",
    )
    p.add_argument(
        "--against",
        choices=["llama.cpp"],
        help="also run llama-cpp-python on the base's GGUF (needs the .[anchors] extra)",
    )
    p.add_argument("--gguf", help="the GGUF for --against (default: the model's or its base's)")
    p.add_argument(
        "--anchor-process",
        choices=["child", "same"],
        default="child",
        help="run llama.cpp in a child process of its own (default), or in this one beside "
        "torch, sharing its OpenMP runtime (its team freed after each run; "
        "app/bench/llama_anchor.py)",
    )


def run(args: argparse.Namespace) -> int:
    import torch

    from app.base_model import load_hf
    from app.base_ref import resolve
    from app.bench.decode_report import report
    from app.bench.decode_sides import engine_side, hf_side
    from app.engine import Engine, EngineConfig
    from app.model_store import ModelStoreError

    load_at_start = load_average()
    n = args.max_new_tokens
    formats = list(dict.fromkeys(f.strip() for f in args.weights.split(",") if f.strip()))
    engines: dict[str, Any] = {}
    try:
        for fmt in formats:
            config = EngineConfig(
                device=args.device,
                dtype=args.dtype,
                max_slots=1,
                torch_threads=args.torch_threads,
                weights=fmt,
            )
            engines[fmt] = Engine.from_pretrained(args.model, config)
        anchor = _anchor(args, next(iter(engines.values())).info.max_seq_len)
    except (ModelStoreError, ValueError) as exc:  # a bad checkpoint, format or missing extra
        logger.error("%s", exc)
        return 2
    first = next(iter(engines.values()))
    info = first.info
    prompt_ids = first.encode(bench_prompt())
    if len(prompt_ids) + n > info.max_seq_len:
        logger.error("prompt plus --max-new-tokens exceed the context of %d", info.max_seq_len)
        return 2
    # the same weights as transformers holds them: a folder, a GGUF, or an adapter merged by PEFT
    hf, _ = load_hf(resolve(args.model))
    hf = hf.to(device=torch.device(info.device), dtype=getattr(torch, info.dtype)).eval()
    pad = info.eos_token_ids[0] if info.eos_token_ids else 0
    sides = {"hf": hf_side(hf, prompt_ids, pad)}
    if anchor is not None:
        sides["llama.cpp"] = anchor.side(prompt_ids)
    for fmt, engine in engines.items():
        engine.start()
        for k in info.exits:
            sides[f"{fmt}/{k}"] = engine_side(engine, prompt_ids, k)

    logger.info("warming up %d sides", len(sides))
    for side in sides.values():
        side(4)
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in sides}
    tokens: dict[str, list[int]] = {}
    for r in range(args.rounds):
        for name, side in sides.items():
            sample, tokens[name] = side(n)
            samples[name].append(sample)
        logger.info("round %d/%d done", r + 1, args.rounds)
    for engine in engines.values():
        engine.shutdown(1.0)
    anchor_info: dict[str, Any] = {}
    if anchor is not None:
        same = anchor.tokenize(bench_prompt()) == prompt_ids
        anchor_info = {**anchor.describe(), "same_prompt_tokens": same}
        anchor.close()

    kernels = {fmt: e.info.weight_kernel for fmt, e in engines.items()}
    results = report(samples, tokens, info, formats, kernels, n)
    if anchor is not None:
        results["llama_cpp"] = {**anchor_info, **results.get("llama_cpp", {})}
    path = write_results(
        args.out,
        {
            "bench": "decode",
            "config": {
                "model": str(args.model),
                "prompt_tokens": len(prompt_ids),
                "max_new_tokens": n,
                "rounds": args.rounds,
                "device": info.device,
                "dtype": info.dtype,
                "weights": formats,
                "torch_threads": args.torch_threads,
                "threads_used": torch.get_num_threads(),
                "against": args.against,
            },
            "machine": machine_info(load_at_start),
            "model": {
                "model_id": info.model_id,
                "num_layers": info.num_layers,
                "exits": list(info.exits),
            },
            **results,
            "samples": samples,
        },
    )
    print(f"wrote {path}")
    return 0


def _anchor(args: argparse.Namespace, max_seq_len: int) -> Any:
    if args.against is None:
        return None
    import torch

    from app.base_ref import resolve
    from app.bench.llama_anchor import LlamaCpp, LlamaCppProcess, base_gguf

    gguf = resolve(args.gguf) if args.gguf else base_gguf(args.model)
    kind = LlamaCppProcess if args.anchor_process == "child" else LlamaCpp
    # the threads torch decodes with (set by --torch-threads once the engine loaded)
    return kind(gguf, torch.get_num_threads(), n_ctx=min(max_seq_len, 2048))
