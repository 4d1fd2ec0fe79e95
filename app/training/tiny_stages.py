"""The stages of ``python -m app build-tiny`` (see tiny_model.py): read the data, pretrain the
base, fine-tune it (SoFT and/or SFT), write the model cards.

Each stage leaves its result on disk (the base and its ``timings.json`` under ``--work``, the
checkpoints under ``--out``), so that ``--stage`` can run pretraining and fine-tuning apart, and two
processes with one method each can fine-tune side by side. Torch and transformers are imported
inside the stages so that ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import time
from pathlib import Path

from app.training.data import Record

logger = logging.getLogger(__name__)

INSTRUCTION_FILES = (
    "alpaca_subset/alpaca_data_long2k.json",
    "alpaca_en_demo/alpaca_en_demo.json",
    "lima/lima.json",
    "dolly_subset/dolly_151.json",
)
CHECKPOINT_NAMES = {"soft": "tiny", "sft": "tiny-sft"}
TEXT_FILES = ("tinystories/tinystories_val_subset.txt", "tinyshakespeare/input.txt")


def read_texts(data: Path) -> list[str]:
    """The plain-text pretraining documents."""
    docs: list[str] = []
    for rel in TEXT_FILES:
        path = data / rel
        if not path.is_file():
            raise OSError(f"{path} is missing (see ../shared/data/README.md)")
        # blank-line separated stories / speeches become documents
        docs.extend(d.strip() for d in path.read_text(encoding="utf-8").split("\n\n") if d.strip())
    return docs


def read_records(data: Path) -> list[Record]:
    """Every instruction record of :data:`INSTRUCTION_FILES`, before the held-out split."""
    from app.training.data import load_alpaca

    records = []
    for rel in INSTRUCTION_FILES:
        recs = load_alpaca(data / rel)
        logger.info("%s: %d records", rel, len(recs))
        records.extend(recs)
    return records


def pretrain(args: argparse.Namespace, texts: list[str], base_dir: Path) -> None:
    """Train the BPE tokenizer on ``texts`` and pretrain a fresh LLaMA-architecture model on them
    with the plain LM loss; save both, and the wall time, to ``base_dir``."""
    from transformers import AutoModelForCausalLM, LlamaConfig, set_seed

    from app.training.data import pack_text
    from app.training.tokenizer import train_bpe_tokenizer
    from app.training.train import TrainOptions, run_trainer

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
    timings = {"pretrain_s": time.perf_counter() - t0}
    (base_dir / "timings.json").write_text(json.dumps(timings))


def finetune(
    args: argparse.Namespace,
    train_records: list[Record],
    held: list[Record],
    base_dir: Path,
    machine: str,
) -> None:
    """From the same base, data, steps and seed, fine-tune each of ``--methods`` (SoFT at every
    exit, SFT at the last layer) and save it, scored on ``held`` at every exit."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed

    from app.model_store import write_sorted_meta
    from app.training.data import encode_records
    from app.training.evaluate import format_table
    from app.training.soft import parse_exits
    from app.training.train import TrainOptions, run_trainer, save_checkpoint

    if not base_dir.is_dir():
        raise OSError(f"no pretrained base at {base_dir}; run with --stage pretrain first")
    timings = json.loads((base_dir / "timings.json").read_text())
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


def write_cards(args: argparse.Namespace, held: int, trained: int) -> None:
    """Both model cards, once both checkpoints exist: each card compares the two side by side
    (with ``--methods`` split over two processes, the second to finish writes them)."""
    from app.model_store import read_sorted_meta
    from app.training.model_card import write_model_card

    metas = {}
    for name in CHECKPOINT_NAMES.values():
        if (args.out / name / "sorted.json").is_file():
            metas[name] = read_sorted_meta(args.out / name)
    if len(metas) < len(CHECKPOINT_NAMES):
        logger.info("model cards are written once both checkpoints exist")
        return
    for name, meta in metas.items():
        write_model_card(
            args.out / name,
            name=name,
            meta=meta,
            other=metas,
            args=args,
            held=held,
            trained=trained,
        )
