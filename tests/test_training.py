"""The SoFT trainer: loss, prompt mask, exits, CLI, checkpoint format."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from app.cli import main
from app.model_store import ModelStoreError, SortedMeta, read_sorted_meta, write_sorted_meta
from app.training.data import (
    IGNORE_INDEX,
    DataError,
    Record,
    encode_record,
    load_alpaca,
    pad_batch,
    split_held_out,
)
from app.training.soft import ExitError, exit_losses, parse_exits, sorted_loss
from app.training.train import TrainOptions, run_trainer
from tests.tiny_checkpoint import make_tiny_checkpoint

RECORDS = [
    {"instruction": "Say hello.", "input": "", "output": "Hello! How can I help you today?"},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "2 + 3 = 5"},
    {"instruction": "Tell a story.", "input": "", "output": "Once upon a time there was a fox."},
    {"instruction": "Name a colour.", "input": "", "output": "Blue is a colour."},
] * 4


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("train") / "m", num_layers=4)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "alpaca.json"
    path.write_text(json.dumps(RECORDS))
    return path


def _batch(ckpt: Path) -> dict[str, torch.Tensor]:
    tok = AutoTokenizer.from_pretrained(ckpt)
    examples = [encode_record(tok, Record(**r), 512) for r in RECORDS[:4]]
    feats = [{"input_ids": e.input_ids, "labels": e.labels} for e in examples if e]
    return pad_batch(feats, tok.pad_token_id)


def test_prompt_mask_covers_exactly_the_prompt(ckpt: Path) -> None:
    tok = AutoTokenizer.from_pretrained(ckpt)
    rec = Record("Add the numbers.", "2 and 3", "2 + 3 = 5")
    ex = encode_record(tok, rec, 512)
    assert ex is not None
    n_prompt = len(tok(rec.prompt).input_ids)
    assert ex.input_ids[0] == tok.bos_token_id
    assert ex.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert ex.labels[n_prompt:] == ex.input_ids[n_prompt:]
    assert ex.input_ids[-1] == tok.eos_token_id
    assert tok.decode(ex.input_ids[n_prompt:-1]) == rec.output
    assert "### Input:\n2 and 3" in rec.prompt and rec.prompt.endswith("### Response:\n")


def test_prompt_longer_than_max_len_is_skipped(ckpt: Path) -> None:
    tok = AutoTokenizer.from_pretrained(ckpt)
    assert encode_record(tok, Record("word " * 200, "", "ok"), 16) is None


def test_exit_losses_match_a_hand_computed_reference(ckpt: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    batch = _batch(ckpt)
    with torch.no_grad():
        losses = exit_losses(
            model, batch["input_ids"], batch["labels"], [1, 2, 3, 4], batch["attention_mask"]
        )
        hs = model(
            batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True
        ).hidden_states
        for k in (1, 2, 3):
            logits = model.lm_head(model.model.norm(hs[k]))
            ref = F.cross_entropy(
                logits[:, :-1].flatten(0, 1),
                batch["labels"][:, 1:].flatten(),
                ignore_index=IGNORE_INDEX,
            )
            torch.testing.assert_close(losses[k], ref, rtol=1e-5, atol=1e-5)
        # the last exit is exactly what plain transformers computes as the LM loss
        hf = model(**batch).loss
    torch.testing.assert_close(losses[4], hf, rtol=1e-5, atol=1e-5)
    assert len({round(float(v), 4) for v in losses.values()}) == 4


def test_sft_loss_is_the_last_exit_only_and_soft_is_the_mean(ckpt: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    batch = _batch(ckpt)
    soft = exit_losses(model, batch["input_ids"], batch["labels"], [1, 2, 3, 4])
    sft = exit_losses(model, batch["input_ids"], batch["labels"], parse_exits(None, None, 4)[-1:])
    assert list(sft) == [4]
    torch.testing.assert_close(sorted_loss(soft), sum(soft.values()) / 4)
    # SFT gradients do not depend on the intermediate exits: the head's gradient from the SFT loss
    # equals the gradient of plain transformers' LM loss.
    sorted_loss(sft).backward()
    g_sft = model.model.layers[0].mlp.down_proj.weight.grad.clone()
    model.zero_grad()
    model(**batch).loss.backward()
    torch.testing.assert_close(g_sft, model.model.layers[0].mlp.down_proj.weight.grad)


def test_last_weight_splits_the_loss_between_full_depth_and_the_other_exits() -> None:
    losses = {
        3: torch.tensor(6.0),
        6: torch.tensor(4.0),
        9: torch.tensor(2.0),
        12: torch.tensor(1.0),
    }
    # The paper's weighting: every exit an equal share.
    torch.testing.assert_close(sorted_loss(losses, 4), torch.tensor(13.0 / 4))
    # Half for full depth, half for the mean of the others, sampled or not.
    torch.testing.assert_close(sorted_loss(losses, 4, 0.5), torch.tensor(0.5 * 1.0 + 0.5 * 4.0))
    sampled = {6: losses[6], 12: losses[12]}
    torch.testing.assert_close(sorted_loss(sampled, 4, 0.5), torch.tensor(0.5 * 1.0 + 0.5 * 4.0))
    torch.testing.assert_close(sorted_loss(losses, 4, 1.0), torch.tensor(1.0))  # SFT
    torch.testing.assert_close(sorted_loss({12: losses[12]}, 4, 0.5), torch.tensor(1.0))


def test_one_soft_step_lowers_the_multi_exit_loss(ckpt: Path, tmp_path: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(ckpt)
    examples = [encode_record(tok, Record(**r), 512) for r in RECORDS[:4]]
    batch = _batch(ckpt)
    exits = [1, 2, 3, 4]
    with torch.no_grad():
        before = sorted_loss(exit_losses(model, batch["input_ids"], batch["labels"], exits))
    opts = TrainOptions(
        max_steps=1,
        lr=3e-3,
        batch_size=4,
        warmup_ratio=0.0,
        logging_steps=1,
        group_by_length=False,
        scheduler="constant",
    )
    history = run_trainer(model, tok, examples, exits, opts, log_path=tmp_path / "log.json")
    with torch.no_grad():
        after = sorted_loss(exit_losses(model, batch["input_ids"], batch["labels"], exits))
    assert float(after) < float(before) - 1e-3
    logged = [h for h in history if "loss" in h]
    assert logged and all(f"loss_exit_{k}" in logged[0] for k in exits)
    assert json.loads((tmp_path / "log.json").read_text())


def test_parse_exits() -> None:
    assert parse_exits("3,6,9", None, 12) == [3, 6, 9, 12]
    assert parse_exits(None, 4, 12) == [4, 8, 12]
    assert parse_exits(None, 5, 12) == [5, 10, 12]
    assert parse_exits(None, None, 12) == [12]
    with pytest.raises(ExitError, match="outside"):
        parse_exits("3,14", None, 12)
    with pytest.raises(ExitError, match="comma"):
        parse_exits("three", None, 12)


def test_sorted_json_round_trips(tmp_path: Path) -> None:
    meta = SortedMeta(
        num_layers=12,
        exits=[12, 3, 6, 9],
        eval={"metric": "loss", "by_exit": {"3": 3.1}},
        training={"seed": 42},
    )
    write_sorted_meta(tmp_path, meta)
    data = json.loads((tmp_path / "sorted.json").read_text())
    assert data["format"] == 1 and data["method"] == "soft" and data["exits"] == [3, 6, 9, 12]
    back = read_sorted_meta(tmp_path, 12)
    assert back == meta
    with pytest.raises(ModelStoreError, match="12 layers"):
        read_sorted_meta(tmp_path, 6)
    (tmp_path / "sorted.json").write_text(json.dumps({**data, "exits": [3, 13]}))
    with pytest.raises(ModelStoreError, match="outside"):
        read_sorted_meta(tmp_path, 12)


def test_missing_sorted_json_offers_every_layer(tmp_path: Path, caplog) -> None:
    folder = make_tiny_checkpoint(tmp_path / "m", num_layers=3, write_sorted=False)
    with caplog.at_level(logging.WARNING):
        meta = read_sorted_meta(folder)
    assert meta.exits == [1, 2, 3] and not meta.soft_tuned
    assert "not SoFT-tuned" in caplog.text


def test_held_out_split_is_stable_and_keeps_duplicates_together() -> None:
    recs = [Record(f"instruction {i}", "", "x") for i in range(400)]
    dup = [Record(r.instruction, "other input", "y") for r in recs]
    train, held = split_held_out(recs + dup, 0.1)
    assert 40 < len(held) < 120
    held_ins = {r.instruction for r in held}
    assert not held_ins & {r.instruction for r in train}
    assert split_held_out(recs + dup, 0.1) == (train, held)


def test_train_cli_writes_a_checkpoint_plain_transformers_loads(
    ckpt: Path, data_file: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "soft"
    # the eval set's instructions are kept out of training, so score a few of them only
    eval_file = tmp_path / "eval.json"
    eval_file.write_text(json.dumps(RECORDS[:2]))
    rc = main(
        [
            "train",
            "--model",
            str(ckpt),
            "--data",
            str(data_file),
            "--out",
            str(out),
            "--exits",
            "2,4",
            "--max-steps",
            "2",
            "--batch-size",
            "4",
            "--lr",
            "1e-3",
            "--eval-data",
            str(eval_file),
        ]
    )
    assert rc == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 4
    meta = read_sorted_meta(out)
    assert meta.exits == [2, 4] and meta.method == "soft"
    assert set(meta.eval["by_exit"]) == {"2", "4"}
    assert (out / "train_log.json").is_file()
    card = (out / "README.md").read_text()
    assert meta.training["command"] in card and "SoFT" in card
    for k in ("2", "4"):
        assert f"| {k} | {float(meta.eval['by_exit'][k]):.3f} |" in card
    rc = main(
        [
            "eval-exits",
            "--model",
            str(out),
            "--data",
            str(eval_file),
            "--json",
            str(tmp_path / "e.json"),
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "exit  layers" in printed
    result = json.loads((tmp_path / "e.json").read_text())
    assert result["by_exit"].keys() == {"2", "4"}
    # the checkpoint's own numbers and the evaluator agree (same data, same weights)
    for k, v in meta.eval["by_exit"].items():
        assert abs(result["by_exit"][k] - v) < 1e-3


@pytest.mark.parametrize(
    ("content", "extra", "message"),
    [
        (None, [], "does not exist"),
        ('[{"instruction": "x"}]', [], "record 0 has no non-empty string 'output'"),
        ('{"not": "a list"}', [], "expected a JSON list"),
        (json.dumps(RECORDS), ["--exits", "2,9"], "outside the model's layers 1..4"),
        (json.dumps(RECORDS), ["--last-weight", "1.5"], "--last-weight must be between 0 and 1"),
    ],
)
def test_train_cli_clear_errors(
    ckpt: Path, tmp_path: Path, capsys, content: str | None, extra: list[str], message: str
) -> None:
    data = tmp_path / "d.json"
    if content is not None:
        data.write_text(content)
    rc = main(
        [
            "train",
            "--model",
            str(ckpt),
            "--data",
            str(data),
            "--out",
            str(tmp_path / "o"),
            "--max-steps",
            "1",
            *extra,
        ]
    )
    assert rc == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_load_alpaca_reads_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in RECORDS[:2]) + "\n")
    assert [r.output for r in load_alpaca(path)] == [RECORDS[0]["output"], RECORDS[1]["output"]]
    path.write_text("{broken")
    with pytest.raises(DataError, match="neither JSON"):
        load_alpaca(path)


def test_bench_quality_compares_base_sft_and_soft_with_answers(
    ckpt: Path, data_file: Path, tmp_path: Path, capsys
) -> None:
    sft = make_tiny_checkpoint(tmp_path / "sft", num_layers=4, seed=1)
    base = make_tiny_checkpoint(tmp_path / "base", num_layers=4, seed=2, write_sorted=False)
    out = tmp_path / "quality.json"
    argv = ["bench", "quality", "--soft", str(ckpt), "--sft", str(sft), "--base", str(base)]
    rc = main([*argv, "--data", str(data_file), "--answer-tokens", "3", "--out", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    assert [r["exit"] for r in result["rows"]] == [1, 2, 3, 4]
    for r in result["rows"]:
        assert r["soft_minus_sft"] == pytest.approx(r["soft_loss"] - r["sft_loss"], abs=1e-3)
        assert len({r["soft_loss"], r["sft_loss"], r["base_loss"]}) == 3
        assert r["base_ppl"] == pytest.approx(math.exp(r["base_loss"]), rel=1e-3)
    answers = result["answers"]["soft"]
    assert len(answers) == 3
    assert all(list(by_exit) == ["1", "2", "3", "4"] for by_exit in answers.values())
    assert "cpu" in result["machine"]
    printed = capsys.readouterr().out
    assert "SoFT/SFT" in printed and "base loss" in printed and "greedy answers" in printed


def test_bench_quality_refuses_bad_answer_settings(ckpt: Path, data_file: Path, capsys) -> None:
    argv = ["bench", "quality", "--soft", str(ckpt), "--sft", str(ckpt), "--data", str(data_file)]
    assert main([*argv, "--answers-from", "base"]) == 2
    assert "--answers-from base needs --base" in capsys.readouterr().err
    assert main([*argv, "--answer-tokens", "-1"]) == 2
    assert "--answer-tokens must be at least 0" in capsys.readouterr().err


def test_resume_with_other_settings_is_refused_naming_the_file(tmp_path: Path) -> None:
    from app.training.run_record import SETTINGS_FILE, check_resume

    settings = {"model": "m", "lr": 1e-3, "seed": 42}
    check_resume(tmp_path, settings, resume=False)
    check_resume(tmp_path, settings, resume=True)  # the same settings continue
    with pytest.raises(ValueError, match=r"run_settings.json was made with other settings.*lr"):
        check_resume(tmp_path, settings | {"lr": 5e-4}, resume=True)
    assert json.loads((tmp_path / SETTINGS_FILE).read_text()) == settings
