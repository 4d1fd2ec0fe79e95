"""``bench step``: the per-op profile of one decode step, per weight format and thread."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from app.bench.step import group_of
from app.cli import main
from tests.tiny_checkpoint import make_tiny_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("step") / "ckpt")


@pytest.mark.parametrize("thread", ["worker", "loader"])
def test_step_profiles_every_format_by_group(tiny: Path, tmp_path: Path, thread: str) -> None:
    out = tmp_path / "step.json"
    argv = ["bench", "step", "--model", str(tiny), "--weights", "float32,int4", "--exit", "3"]
    argv += ["--steps", "4", "--rounds", "2", "--context", "8", "--thread", thread]
    assert main([*argv, "--top", "50", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["config"]["exit"] == 3 and data["config"]["thread"] == thread
    for fmt, part in data["formats"].items():
        assert len(part["ms_per_step_rounds"]) == 2 and part["ms_per_step"] > 0
        groups = part["us_per_step"]
        assert sum(groups.values()) == pytest.approx(part["profiled_us_per_step"], rel=0.01)
        assert part["us_per_layer"]["gemm"] == pytest.approx(groups["gemm"] / 3, abs=0.1)
        ops = {op["op"]: op for op in part["top_ops"]}
        # float32 at one row: mm for qkv, gate/up and the head, addmm (residual fused) for o and
        # down; int4: one kernel call per linear, 4 a layer, and the head in int8
        expected = {
            "float32": {"aten::mm": 2 * 3 + 1},
            "int4": {"aten::_weight_int4pack_mm_for_cpu": 4 * 3, "aten::_weight_int8pack_mm": 1},
        }[fmt]
        for kernel, calls in expected.items():
            assert ops[kernel]["group"] == "gemm" and ops[kernel]["calls_per_step"] == calls
    assert data["formats"]["int4"]["kernel"].startswith("_weight_int4pack_mm_for_cpu")


def test_ops_are_grouped_by_what_they_do() -> None:
    assert group_of("aten::_weight_int4pack_mm_for_cpu") == "gemm"
    assert group_of("aten::_scaled_dot_product_flash_attention_for_cpu") == "attention"
    assert group_of("aten::mul") == "other"


def test_a_bad_exit_is_refused(tiny: Path, tmp_path: Path, caplog) -> None:
    argv = ["bench", "step", "--model", str(tiny), "--exit", "9", "--out", str(tmp_path / "s.json")]
    assert main(argv) == 2
    assert any("--exit must be within 1..4" in r.getMessage() for r in caplog.records)
