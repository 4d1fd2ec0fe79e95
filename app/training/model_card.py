"""The model card (``README.md``) written into each default checkpoint folder."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from app.model_store import SortedMeta

LICENCES = """\
| data | licence |
|---|---|
| alpaca_subset (Stanford Alpaca) | CC BY-NC 4.0 — non-commercial only |
| alpaca_en_demo (Alpaca-GPT4 style) | CC BY-NC 4.0 — non-commercial only |
| LIMA | CC BY-NC-SA — non-commercial, share-alike |
| dolly_subset (databricks-dolly-15k) | CC BY-SA 3.0 |
| TinyStories | CDLA-Sharing-1.0 |
| tiny-shakespeare | MIT (text in the public domain) |

Because most of the fine-tuning data is non-commercial, **these weights are for research and
local testing only, not for commercial use.**"""


def write_model_card(
    folder: Path,
    name: str,
    meta: SortedMeta,
    other: dict[str, SortedMeta],
    args: argparse.Namespace,
    held: int,
    trained: int,
) -> None:
    rows = []
    exits = sorted(int(k) for k in meta.eval["by_exit"])
    names = list(other)
    header = "| exit | " + " | ".join(f"{n} loss (ppl)" for n in names) + " |"
    rows.append(header)
    rows.append("|---" * (len(names) + 1) + "|")
    for k in exits:
        cells = []
        for n in names:
            loss = float(other[n].eval["by_exit"][str(k)])
            cells.append(f"{loss:.3f} ({math.exp(loss):.1f})")
        rows.append(f"| {k} | " + " | ".join(cells) + " |")
    table = "\n".join(rows)
    kind = (
        "Sorted Fine-Tuned (SoFT): every exit in `sorted.json` is a usable sub-model"
        if meta.method == "soft"
        else "the SFT baseline: fine-tuned at full depth only (for comparison with `default`)"
    )
    card = f"""# {name}

A small LLaMA-architecture model, {kind}. Made by SortedServe's own trainer from the data in
`../shared/data`, reproducibly, on one machine; no pretrained weights were downloaded.

- architecture: LLaMA, {args.layers} layers, hidden {args.hidden}, {args.heads} heads
  ({args.kv_heads} KV heads), MLP {args.intermediate}, byte-level BPE vocabulary {args.vocab_size},
  context {args.context}, {"tied" if args.tie_embeddings else "untied"} LM head; weights saved in
  {args.save_dtype}
- exits trained: {meta.exits} (method `{meta.method}`)
- prompt format: Alpaca (the chat template renders it; see `app/training/prompting.py`)

## How it was made
```
make default-model
```
runs `python -m app build-default --stage pretrain --threads 1`, then the SoFT and the SFT
fine-tunes from that base side by side (`--stage finetune --methods soft`, `--methods sft`), with
`--data ../shared/data --out model_store`. This checkpoint's fine-tune ran as:
`{meta.training.get("command", "")}` (`--work` is only the scratch folder of the base).

1. {held} instructions held out by a hash of the instruction text ({args.held_out:.0%}),
   excluded from every step, written to `{args.heldout_out}`; {trained} used for training.
2. byte-level BPE tokenizer trained on TinyStories, tiny-shakespeare and the training responses.
3. pretraining with the plain LM loss on the same text: {args.pretrain_steps} steps × batch
   {args.pretrain_batch} × {args.block_size} tokens, lr {args.pretrain_lr}, cosine schedule.
4. from that base, with the same {args.finetune_steps} steps × batch {args.finetune_batch}, lr
   {args.finetune_lr}, seed {args.seed}: `default` with the SoFT loss (mean over exits
   {meta.exits if meta.method == "soft" else args.exits}), `default-sft` with the last layer only.
   Only response tokens count (the Alpaca prompt is masked).

Seed {args.seed}. Machine: {meta.training.get("machine", "?")}. Wall time: pretraining
{meta.training.get("pretrain_wall_s", 0) / 60:.1f} min, this fine-tune
{meta.training.get("wall_s", 0) / 60:.1f} min.

## Held-out loss per exit (nats per response token)
Measured on the saved weights, on `{args.heldout_out}`:

{table}

## Data and licences
{LICENCES}
"""
    (folder / "README.md").write_text(card)
