"""Model cards (``README.md``): the tiny fixtures' (``build-tiny``) and any ``train`` run's."""

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
`python -m app build-tiny --data ../shared/data --out model_store` pretrains the base
(`--stage pretrain`), then runs the SoFT and the SFT fine-tunes from it (`--stage finetune
--methods soft`, `--methods sft`; side by side in two shells on two cores). This checkpoint's
fine-tune ran as:
`{meta.training.get("command", "")}` (`--work` is only the scratch folder of the base).

1. {held} instructions held out by a hash of the instruction text ({args.held_out:.0%}),
   excluded from every step, written to `{args.heldout_out}`; {trained} used for training.
2. byte-level BPE tokenizer trained on TinyStories, tiny-shakespeare and the training responses.
3. pretraining with the plain LM loss on the same text: {args.pretrain_steps} steps × batch
   {args.pretrain_batch} × {args.block_size} tokens, lr {args.pretrain_lr}, cosine schedule.
4. from that base, with the same {args.finetune_steps} steps × batch {args.finetune_batch}, lr
   {args.finetune_lr}, seed {args.seed}: `tiny` with the SoFT loss (mean over exits
   {meta.exits if meta.method == "soft" else args.exits}), `tiny-sft` with the last layer only.
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


def write_trained_card(folder: Path, meta: SortedMeta) -> Path:
    """The model card of a ``python -m app train`` checkpoint, from its ``sorted.json`` alone.

    Replaces PEFT's empty template: it names the base, the recipe, the exact command, the wall
    time and the held-out loss per exit, and the data's licences."""
    t = meta.training
    base = t.get("base") or {}
    if base.get("package"):
        base_line = (
            f"`{base['file']}` from the PyPI wheel `{base['package']}=={base.get('version', '?')}`"
            f" (`pkg:{base['package']}/{base['file']}`), sha256 `{base.get('sha256', '?')}`,"
            " checked at load"
        )
    else:
        base_line = f"`{base.get('path', t.get('model', '?'))}`"
    lora = t.get("lora")
    form = (
        f"a PEFT LoRA adapter (rank {lora['rank']}, alpha {lora['alpha']}, on every attention and"
        " MLP projection, norms trained in full), merged into the base once at load"
        if lora
        else "a full checkpoint"
    )
    if meta.method == "soft":
        what = (
            f"Sorted Fine-Tuned (SoFT, arXiv 2309.08968): every exit in {meta.exits} — the first k"
            " layers plus the shared final norm and LM head — is a sub-model to serve"
        )
        loss = (
            f"each step, full depth and {t['exit_sample']} other exits drawn at random"
            if t.get("exit_sample")
            else "the mean over every exit"
        )
        if t.get("last_weight"):
            loss += (
                f"; full depth weighs {t['last_weight']} of the loss, the other exits share"
                " the rest"
            )
        if t.get("distill"):
            loss += (
                f"; plus {t['distill']} × KL(frozen base at full depth ‖ exit) at every trained"
                " exit: a distillation term added to the paper's loss"
            )
    else:
        what = "the SFT baseline: fine-tuned at full depth only, for comparison with SoFT"
        loss = "cross-entropy at full depth only"
    by_exit = meta.eval.get("by_exit", {})
    rows = "\n".join(
        f"| {k} | {float(v):.3f} | {math.exp(float(v)):.1f} |"
        for k, v in sorted(by_exit.items(), key=lambda kv: int(kv[0]))
    )
    length = (
        f"{t['max_steps']} steps ({t['max_steps'] * t.get('batch_size', 1)} examples)"
        if t.get("max_steps")
        else f"{t.get('epochs', '?')} epochs"
    )
    data = "\n".join(f"  - `{d}`" for d in t.get("data", []))
    card = f"""# {folder.name}: {meta.method.upper()} of SmolLM2-135M-Instruct

{what}.

- base: {base_line}
- stored as {form}
- layers: {meta.num_layers}; exits served: {meta.exits}
- prompt format: {"the base's chat template" if t.get("chat_template") else "Alpaca"}

## How it was made
`make default-model` trains this checkpoint and its counterpart side by side on two CPU cores
and writes both into `model_store/`. This one ran as (`--out` is where it was written):

```
{t.get("command", "?")}
```

- {length}, batch {t.get("batch_size")}, sequences cut at {t.get("max_len")} tokens, lr
  {t.get("lr")}, seed {t.get("seed")}; only response tokens count
- loss: {loss}
- wall time: {t.get("train_wall_s", 0) / 60:.1f} min of training, {t.get("threads", "?")} thread(s)
- data (the held-out split in `{meta.eval.get("dataset", "?")}` excluded):
{data}

## Held-out response loss per exit (nats per token)
On `{meta.eval.get("dataset", "?")}` ({meta.eval.get("tokens", "?")} response tokens), measured
on the weights as saved:

| exit | loss | perplexity |
|---|---|---|
{rows}

SoFT, SFT and the untuned base side by side, with greedy answers at every exit:
`docs/soft-vs-sft.md` (`python -m app bench quality`).

## Licences
The base, SmolLM2-135M-Instruct, is Apache-2.0.

{LICENCES}
"""
    path = folder / "README.md"
    path.write_text(card)
    return path
