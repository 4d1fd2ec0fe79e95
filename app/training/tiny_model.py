"""``python -m app build-tiny``: the recipe that makes the 3.4 M-parameter test fixtures
``model_store/tiny`` (SoFT) and ``model_store/tiny-sft`` (SFT) from ``../shared/data``, end to end,
on CPU or GPU, with nothing pretrained. (The served default, Sorted SmolLM2-135M-Instruct, is
made by ``make default-model`` with ``python -m app train``.)

1. split the instruction sets (held-out by instruction hash, excluded from every later step);
2. train a byte-level BPE tokenizer on the plain text and the training responses;
3. pretrain a small LLaMA-architecture model with the plain LM loss on that text;
4. from the same base, with the same data, steps and seed: SoFT (every exit) and SFT (last layer);
5. evaluate both on the held-out split at every exit and write checkpoints and model cards.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import shlex
import sys
import time
from pathlib import Path

logger = logging.getLogger(__name__)

INSTRUCTION_FILES = (
    "alpaca_subset/alpaca_data_long2k.json",
    "alpaca_en_demo/alpaca_en_demo.json",
    "lima/lima.json",
    "dolly_subset/dolly_151.json",
)
CHECKPOINT_NAMES = {"soft": "tiny", "sft": "tiny-sft"}
TEXT_FILES = ("tinystories/tinystories_val_subset.txt", "tinyshakespeare/input.txt")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", type=Path, default=Path("../shared/data"), help="shared data folder")
    p.add_argument("--out", type=Path, default=Path("model_store"), help="model store folder")
    p.add_argument("--work", type=Path, default=Path("runs/tiny"), help="scratch folder")
    p.add_argument(
        "--heldout-out",
        type=Path,
        default=Path("bench/data/heldout.json"),
        help="where to write the held-out instructions",
    )
    p.add_argument("--held-out", type=float, default=0.05, help="held-out fraction")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=384)
    p.add_argument("--context", type=int, default=512, help="max_position_embeddings")
    p.add_argument(
        "--tie-embeddings",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="share the input embedding with the LM head (default: untied, as in LLaMA)",
    )
    p.add_argument("--block-size", type=int, default=256, help="pretraining sequence length")
    p.add_argument("--pretrain-steps", type=int, default=600)
    p.add_argument("--pretrain-lr", type=float, default=1.5e-3)
    p.add_argument("--pretrain-batch", type=int, default=16)
    p.add_argument("--finetune-steps", type=int, default=150)
    p.add_argument("--finetune-lr", type=float, default=5e-4)
    p.add_argument("--finetune-batch", type=int, default=16)
    p.add_argument("--max-len", type=int, default=384, help="fine-tuning truncation")
    p.add_argument("--exits", default="3,6,9,12", help="SoFT exits")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument(
        "--threads",
        type=int,
        help="torch CPU threads (1 is fastest on a 2-core machine that is doing other work)",
    )
    p.add_argument("--save-dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument(
        "--methods",
        default="soft,sft",
        help="which fine-tunes to run from the base: soft, sft or both (default soft,sft); "
        "two processes with one method each may run side by side",
    )
    p.add_argument(
        "--stage",
        choices=["all", "pretrain", "finetune"],
        default="all",
        help="run everything, or only pretraining, or only fine-tuning from --work's base",
    )


def run(args: argparse.Namespace) -> int:
    from app.training.data import DataError

    try:
        return build(args)
    except (DataError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _texts(data: Path) -> list[str]:
    docs: list[str] = []
    for rel in TEXT_FILES:
        path = data / rel
        if not path.is_file():
            raise OSError(f"{path} is missing (see ../shared/data/README.md)")
        # blank-line separated stories / speeches become documents
        docs.extend(d.strip() for d in path.read_text(encoding="utf-8").split("\n\n") if d.strip())
    return docs


def _records(data: Path) -> list:
    from app.training.data import load_alpaca

    records = []
    for rel in INSTRUCTION_FILES:
        recs = load_alpaca(data / rel)
        logger.info("%s: %d records", rel, len(recs))
        records.extend(recs)
    return records


def build(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, set_seed

    from app.model_store import read_sorted_meta, write_sorted_meta
    from app.training.data import encode_records, pack_text, save_alpaca, split_held_out
    from app.training.evaluate import format_table
    from app.training.model_card import write_model_card
    from app.training.soft import parse_exits
    from app.training.tokenizer import train_bpe_tokenizer
    from app.training.train import TrainOptions, run_trainer, save_checkpoint

    if args.threads:
        torch.set_num_threads(args.threads)
    machine = f"{platform.machine()}, {torch.get_num_threads()} torch threads, " + (
        f"CUDA {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "CPU"
    )
    timings: dict[str, float] = {}
    records = _records(args.data)
    train_records, held = split_held_out(records, args.held_out)
    args.heldout_out.parent.mkdir(parents=True, exist_ok=True)
    save_alpaca(held, args.heldout_out)
    logger.info(
        "%d training records, %d held out -> %s", len(train_records), len(held), args.heldout_out
    )
    base_dir = args.work / "base"

    if args.stage in ("all", "pretrain"):
        texts = _texts(args.data) + [r.output for r in train_records]
        t0 = time.perf_counter()
        tokenizer = train_bpe_tokenizer(texts, vocab_size=args.vocab_size)
        tokenizer.model_max_length = args.context
        set_seed(args.seed)
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=args.hidden,
            intermediate_size=args.intermediate,
            num_hidden_layers=args.layers,
            num_attention_heads=args.heads,
            num_key_value_heads=args.kv_heads,
            max_position_embeddings=args.context,
            rms_norm_eps=1e-5,
            tie_word_embeddings=args.tie_embeddings,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        model = AutoModelForCausalLM.from_config(config)
        blocks = pack_text(tokenizer, texts, args.block_size)
        logger.info(
            "pretraining %.1fM params on %d blocks of %d tokens (%.1fM tokens)",
            sum(p.numel() for p in model.parameters()) / 1e6,
            len(blocks),
            args.block_size,
            len(blocks) * args.block_size / 1e6,
        )
        opts = TrainOptions(
            method="sft",
            max_steps=args.pretrain_steps,
            lr=args.pretrain_lr,
            batch_size=args.pretrain_batch,
            warmup_ratio=0.05,
            weight_decay=0.1,
            seed=args.seed,
            group_by_length=False,
        )
        base_dir.mkdir(parents=True, exist_ok=True)
        run_trainer(model, tokenizer, blocks, [args.layers], opts, base_dir / "train_log.json")
        model.save_pretrained(base_dir)
        tokenizer.save_pretrained(base_dir)
        timings["pretrain_s"] = time.perf_counter() - t0
        (base_dir / "timings.json").write_text(json.dumps(timings))
    if args.stage == "pretrain":
        return 0

    if not base_dir.is_dir():
        raise OSError(f"no pretrained base at {base_dir}; run with --stage pretrain first")
    timings.update(json.loads((base_dir / "timings.json").read_text()))
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    exits = parse_exits(args.exits, None, args.layers)
    train_examples = encode_records(tokenizer, train_records, args.max_len)
    eval_examples = encode_records(tokenizer, held, args.max_len)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = set(methods) - set(CHECKPOINT_NAMES)
    if unknown or not methods:
        raise ValueError(f"--methods takes soft and/or sft, got {args.methods!r}")
    for method in methods:
        name = CHECKPOINT_NAMES[method]
        t0 = time.perf_counter()
        set_seed(args.seed)
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        opts = TrainOptions(
            method=method,
            max_steps=args.finetune_steps,
            lr=args.finetune_lr,
            batch_size=args.finetune_batch,
            seed=args.seed,
        )
        out_dir = args.out / name
        trained = exits if method == "soft" else [args.layers]
        out_dir.mkdir(parents=True, exist_ok=True)
        run_trainer(model, tokenizer, train_examples, trained, opts, out_dir / "train_log.json")
        training = {
            "base": f"{base_dir} (pretrained by this recipe; not committed)",
            "data": [*INSTRUCTION_FILES],
            "pretrain_data": [*TEXT_FILES, "responses of the training instructions"],
            "steps": args.finetune_steps,
            "batch_size": args.finetune_batch,
            "lr": args.finetune_lr,
            "seed": args.seed,
            "command": "python -m app build-tiny " + shlex.join(sys.argv[2:]),
            "pretrain_wall_s": round(timings.get("pretrain_s", 0.0)),
            "machine": machine,
        }
        meta = save_checkpoint(
            model,
            tokenizer,
            out_dir,
            exits=trained,
            method=method,
            eval_examples=eval_examples,
            eval_name=f"{args.heldout_out} ({len(held)} held-out instructions)",
            training=training,
            dtype=args.save_dtype,
            eval_exits=exits,
        )
        meta.training["wall_s"] = round(time.perf_counter() - t0)
        write_sorted_meta(out_dir, meta)
        by_exit = {int(k): v for k, v in meta.eval["by_exit"].items()}
        logger.info("%s held-out loss:\n%s", name, format_table(by_exit, args.layers))
    metas = {}
    for name in CHECKPOINT_NAMES.values():
        if (args.out / name / "sorted.json").is_file():
            metas[name] = read_sorted_meta(args.out / name)
    if len(metas) < len(CHECKPOINT_NAMES):
        logger.info("model cards are written once both checkpoints exist")
        return 0
    for name, meta in metas.items():
        write_model_card(
            args.out / name,
            name=name,
            meta=meta,
            other=metas,
            args=args,
            held=len(held),
            trained=len(train_records),
        )
    return 0
