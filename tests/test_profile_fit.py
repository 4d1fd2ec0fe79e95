"""The start-up profile measures a few exits and fits the rest (issue 11): the pure fit, the
exits and batch sizes chosen, the time cap on a real tiny engine, and a profile cache that is
corrupt or for other settings (measured again, with one warning)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from app.api.profile_cache import cache_path, load_profile, profile_key, save_profile
from app.engine import Engine, EngineConfig, ProfilePoint
from app.engine.profile import batch_order, profile_exits
from app.scheduler import LatencyProfile, ProfileError, fill_exits

EXITS = list(range(3, 31, 3))


def linear_point(k: int, sizes: tuple[int, ...] = (1, 4, 16)) -> ProfilePoint:
    """Costs exactly on ``overhead(b) + k × layer(b)``: 2b + k × (0.5 + 0.1b) ms a step."""
    return ProfilePoint(k, 0.2 + 0.05 * k, {b: 2 * b + k * (0.5 + 0.1 * b) for b in sizes})


def test_fill_exits_puts_the_other_exits_on_the_measured_line() -> None:
    measured = [linear_point(k) for k in (3, 15, 30)]
    costs = fill_exits(measured, EXITS)
    assert [c.exit_layer for c in costs] == EXITS
    for c in costs:
        want = linear_point(c.exit_layer)
        assert c.fitted == (c.exit_layer not in (3, 15, 30))
        assert c.prefill_ms_per_token == pytest.approx(want.prefill_ms_per_token)
        assert c.decode_ms_by_batch == pytest.approx(want.decode_ms_by_batch)
    profile = LatencyProfile(costs)
    assert profile.decode_ms(21, 4) == pytest.approx(8 + 21 * 0.9)
    again = LatencyProfile.from_json(json.loads(json.dumps(profile.to_json())))
    assert [c["fitted"] for c in again.to_json() if "fitted" in c] == [True] * 7
    assert again.decode_ms(27, 16) == pytest.approx(profile.decode_ms(27, 16), abs=1e-3)


def test_fill_exits_resists_one_disturbed_measurement() -> None:
    points = [linear_point(k) for k in (3, 9, 15, 21, 30)]
    points[2] = ProfilePoint(15, 0.95, {b: 10 * v for b, v in points[2].decode_ms_by_batch.items()})
    by_exit = {c.exit_layer: c for c in fill_exits(points, EXITS)}
    assert by_exit[27].decode_ms_by_batch[1] == pytest.approx(2 + 27 * 0.6)
    assert by_exit[15].decode_ms_by_batch[1] == pytest.approx(10 * (2 + 15 * 0.6))  # its own


def test_fill_exits_uses_batch_sizes_measured_everywhere() -> None:
    points = [linear_point(3, (1, 4, 16)), linear_point(30, (1, 4))]
    assert all(set(c.decode_ms_by_batch) == {1, 4} for c in fill_exits(points, EXITS))
    with pytest.raises(ProfileError, match="no measured exits"):
        fill_exits([], EXITS)
    with pytest.raises(ProfileError, match="share no"):
        fill_exits([linear_point(3, (1,)), linear_point(30, (2,))], EXITS)


def test_profile_exits_and_batch_order() -> None:
    assert profile_exits(EXITS, 3) == [3, 15, 30]  # shallowest, middle, deepest
    assert profile_exits(EXITS, 1) == [30]
    assert profile_exits(EXITS, 0) == EXITS and profile_exits([2, 4], 3) == [2, 4]
    assert profile_exits(range(1, 31), 4) == [1, 11, 20, 30]
    assert batch_order([8, 1, 4, 16, 2]) == [1, 16, 2, 4, 8] and batch_order([1]) == [1]


def test_engine_profile_measures_few_exits_within_the_cap(tiny_checkpoint: Path) -> None:
    eng = Engine.from_pretrained(tiny_checkpoint, EngineConfig(max_slots=4, max_seq_len=64))
    try:
        points = eng.measure_profile([1, 2, 4], prompt_tokens=8, decode_steps=2, depths=2)
        assert [p.exit_layer for p in points] == [1, 4]
        assert all(set(p.decode_ms_by_batch) == {1, 2, 4} for p in points)
        # a cap already spent: batch 1 and the largest still run (idle and full load), no more
        capped = eng.measure_profile([1, 2, 4], prompt_tokens=8, decode_steps=2, max_seconds=1e-9)
        assert [p.exit_layer for p in capped] == [1, 2, 3, 4]
        assert all(set(p.decode_ms_by_batch) == {1, 4} for p in capped)
        profile = LatencyProfile(fill_exits(points, eng.info.exits))
        assert profile.exits == (1, 2, 3, 4) and profile.decode_ms(3, 4) > 0
    finally:
        eng.shutdown(timeout_s=1.0)


def test_bad_or_foreign_profile_cache_is_measured_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    key = profile_key(tmp_path, "cpu", "float32", 2, (1, 4), 4, 3)
    profile = LatencyProfile(fill_exits([linear_point(3), linear_point(30)], EXITS))
    path = save_profile(tmp_path / "cache", key, profile)
    assert path is not None and load_profile(tmp_path / "cache", key) is not None
    with caplog.at_level(logging.WARNING, logger="app.api.profile_cache"):
        data = json.loads(path.read_text())
        data["key"]["checkpoint"] = "/somewhere/else"  # copied from another checkpoint
        path.write_text(json.dumps(data))
        assert load_profile(tmp_path / "cache", key) is None
        path.write_text('{"key": ')  # cut short
        assert load_profile(tmp_path / "cache", key) is None
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2 and all(str(path) in w for w in warnings)
    assert cache_path(tmp_path / "cache", key) == path
