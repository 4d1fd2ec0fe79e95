"""Unit tests of the depth scheduler on synthetic latency profiles (pure Python, no torch)."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import pytest

from app.scheduler import (
    DepthScheduler,
    ExitCost,
    LatencyProfile,
    ProfileError,
    SchedulerConfig,
    SchedulingError,
)

EXITS = (3, 6, 9, 12)


def decode_ms(k: int, b: int) -> float:
    return 1.0 + 0.5 * k * (1 + 0.15 * (b - 1))


def synth_profile() -> LatencyProfile:
    return LatencyProfile(
        ExitCost(k, 0.02 * k, {b: decode_ms(k, b) for b in (1, 2, 4, 8, 16)}) for k in EXITS
    )


@dataclass(frozen=True)
class Row:
    request_id: str
    exit_layer: int
    generated: int


@dataclass(frozen=True)
class Report:
    now: float
    step_seconds: float
    rows: tuple[Row, ...]
    finished: tuple[Row, ...] = ()

    @property
    def exits(self) -> tuple[int, ...]:
        return tuple(r.exit_layer for r in (*self.rows, *self.finished))


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def make(slots: int = 4, **kw) -> tuple[DepthScheduler, Clock]:
    clock = Clock()
    return DepthScheduler(synth_profile(), SchedulerConfig(max_slots=slots, **kw), clock), clock


def test_scheduler_imports_no_torch() -> None:
    # The scheduler must stay pure Python; run in a fresh interpreter to see its own imports.
    import subprocess

    code = "import sys, app.scheduler; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_profile_homogeneous_step_matches_measurements() -> None:
    profile = synth_profile()
    for k in EXITS:
        for b in (1, 2, 4, 8, 16):
            assert profile.step_ms([k] * b) == pytest.approx(decode_ms(k, b), rel=1e-6)
            assert profile.decode_ms(k, b) == pytest.approx(decode_ms(k, b))
    # interpolation between measured batch sizes
    assert profile.decode_ms(12, 3) == pytest.approx((decode_ms(12, 2) + decode_ms(12, 4)) / 2)
    assert profile.prefill_ms(6, 100) == pytest.approx(12.0)


def test_profile_mixed_batch_costs_between_its_homogeneous_bounds() -> None:
    profile = synth_profile()
    mixed = profile.step_ms([3, 12])
    assert profile.step_ms([3, 3]) < mixed < profile.step_ms([12, 12])
    # a shallow row beside a deep one adds little: the deep row sets the step's length
    assert mixed - profile.step_ms([12]) < profile.step_ms([3])


def test_profile_json_round_trip_and_errors() -> None:
    profile = synth_profile()
    again = LatencyProfile.from_json(profile.to_json())
    assert again.exits == EXITS
    assert again.step_ms([3, 9, 12]) == pytest.approx(profile.step_ms([3, 9, 12]), rel=1e-3)
    with pytest.raises(ProfileError):
        LatencyProfile([])
    with pytest.raises(ProfileError):
        LatencyProfile.from_json([{"exit_layer": 3}])
    with pytest.raises(ProfileError):
        LatencyProfile([ExitCost(3, -1.0, {1: 1.0})])
    with pytest.raises(ProfileError):
        LatencyProfile([ExitCost(3, 0.1, {1: 1.0}), ExitCost(6, 0.1, {2: 1.0})])


def test_idle_prediction_is_prefill_plus_decode_steps() -> None:
    sched, _ = make()
    d = sched.decide(prompt_tokens=50, max_new_tokens=11)
    assert d.exit_layer == 12 and d.reason == "no_budget" and d.budget_ms is None
    assert d.predicted_ms == pytest.approx(50 * 0.02 * 12 + 10 * decode_ms(12, 1))
    assert d.expected_queue_ms == 0 and d.expected_batch_size == 1


def test_large_budget_gets_deepest_exit() -> None:
    sched, _ = make()
    d = sched.decide(prompt_tokens=20, max_new_tokens=32, budget_ms=10_000)
    assert d.exit_layer == 12 and d.feasible and d.reason == "budget"


def test_impossible_budget_gets_shallowest_and_is_flagged() -> None:
    sched, _ = make()
    d = sched.decide(prompt_tokens=20, max_new_tokens=32, budget_ms=0.5)
    assert d.exit_layer == 3
    assert not d.feasible and d.predicted_ms > 0.5


def test_budget_picks_deepest_exit_that_fits() -> None:
    sched, _ = make()
    # idle, 21 new tokens: 20 steps; exit 6 costs 20 × 4 ms = 80 ms (+ 2.4 prefill), exit 9 ~112 ms
    d = sched.decide(prompt_tokens=20, max_new_tokens=21, budget_ms=100 / 0.9)
    assert d.exit_layer == 6 and d.feasible
    assert d.predicted_ms <= 100


def test_no_budget_runs_deepest_and_exit_layer_overrides() -> None:
    sched, _ = make()
    assert sched.decide(10, 10).exit_layer == 12
    d = sched.decide(10, 10, exit_layer=6)
    assert d.exit_layer == 6 and d.reason == "exit_layer"
    with pytest.raises(SchedulingError):
        sched.decide(10, 10, exit_layer=5)
    with pytest.raises(SchedulingError):
        sched.decide(10, 10, budget_ms=0)


def test_more_load_gives_shallower_exits() -> None:
    sched, clock = make(slots=4)
    budget = 400.0
    idle = sched.decide(prompt_tokens=20, max_new_tokens=40, budget_ms=budget)
    # three deep requests start decoding: a bigger batch, each step slower
    for i in range(3):
        sched.admit(f"r{i}", 20, 200, exit_layer=12)
    sched.on_step(Report(clock(), 0.0, tuple(Row(f"r{i}", 12, 1) for i in range(3))))
    busy = sched.decide(prompt_tokens=20, max_new_tokens=40, budget_ms=budget)
    # slots full and a queue: the wait alone eats most of the budget
    for i in range(3, 6):
        sched.admit(f"r{i}", 20, 200, exit_layer=12)
    full = sched.decide(prompt_tokens=20, max_new_tokens=40, budget_ms=budget)
    assert idle.exit_layer > busy.exit_layer
    assert busy.expected_batch_size == 4 and busy.expected_queue_ms < full.expected_queue_ms
    assert full.exit_layer == 3 and not full.feasible
    assert sched.expected_wait_ms() > 0


def test_late_requests_are_lowered_monotonically_and_never_raised() -> None:
    sched, clock = make(slots=4)
    sched.admit("late", 10, 50, budget_ms=400.0)
    sched.admit("free", 10, 50)  # no budget: never touched
    assert sched.exits_of(["late"])["late"] == 12
    seen = [12]
    for step in range(1, 50):
        clock.t += 0.012  # each step takes ~2× the profile's prediction: the request falls behind
        exits = sched.exits_of(["late", "free"])
        rows = (Row("late", exits["late"], step), Row("free", 12, step))
        changes = sched.on_step(Report(clock.t, 0.012, rows))
        assert "free" not in changes
        if "late" in changes:
            assert changes["late"] < seen[-1]
            seen.append(changes["late"])
    assert seen == sorted(seen, reverse=True) and len(seen) > 1
    assert seen[-1] == 3


def test_on_time_requests_are_not_lowered() -> None:
    sched, clock = make(slots=4)
    sched.admit("ok", 10, 20, budget_ms=10_000.0)
    for step in range(1, 20):
        clock.t += 0.005
        assert sched.on_step(Report(clock.t, 0.005, (Row("ok", 12, step),))) == {}


def test_ewma_learns_slower_steps_and_prefers_shallower_exits() -> None:
    sched, clock = make(slots=4, alpha=0.3)
    before = sched.decide(20, 21, budget_ms=120.0)
    sched.admit("x", 20, 1000)
    for step in range(1, 30):
        clock.t += 2 * decode_ms(12, 1) / 1000
        sched.on_step(Report(clock.t, 2 * decode_ms(12, 1) / 1000, (Row("x", 12, step),)))
    sched.finish("x")
    assert sched.snapshot()["step_correction"] == pytest.approx(2.0, rel=0.05)
    after = sched.decide(20, 21, budget_ms=120.0)
    assert after.exit_layer < before.exit_layer


def test_finish_forgets_and_learns_prefill() -> None:
    sched, _ = make(alpha=0.5)
    sched.admit("a", 100, 10)
    assert sched.snapshot()["tracked_requests"] == 1
    sched.finish("a", queue_ms=0.0, ttft_ms=2 * 100 * 0.02 * 12)
    assert sched.snapshot()["tracked_requests"] == 0
    assert sched.snapshot()["prefill_correction"] == pytest.approx(1.5)
    with pytest.raises(SchedulingError):
        sched.admit("b", 1, 1)
        sched.admit("b", 1, 1)


def test_online_model_learns_per_cell_scale_and_gap_between_steps() -> None:
    sched, clock = make(slots=4, alpha=0.2, cell_samples=4)
    model = sched.latency
    sched.admit("a", 10, 1000, exit_layer=6)
    sched.admit("b", 10, 1000, exit_layer=6)
    for step in range(1, 40):
        # the steps themselves take 3× the profile; 2 ms pass between steps (prefills, etc.)
        seconds = 3 * decode_ms(6, 2) / 1000
        clock.t += seconds + 0.002
        rows = (Row("a", 6, step), Row("b", 6, step))
        sched.on_step(Report(clock.t, seconds, rows))
    assert model.scale([6, 6]) == pytest.approx(3.0, rel=0.05)
    assert model.snapshot()["gap_ms"] == pytest.approx(2.0, rel=0.05)
    assert model.token_ms([6, 6]) == pytest.approx(3 * decode_ms(6, 2) + 2.0, rel=0.05)
    # a cell never seen falls back to the global correction
    assert model.scale([12]) == pytest.approx(model.snapshot()["step_correction"], rel=1e-3)


def test_finished_rows_stop_counting_as_load() -> None:
    sched, clock = make(slots=2)
    sched.admit("a", 10, 500, exit_layer=12)
    sched.admit("b", 10, 500, exit_layer=12)
    clock.t += 0.01
    sched.on_step(Report(clock.t, 0.01, (Row("a", 12, 1), Row("b", 12, 1))))
    busy = sched.expected_wait_ms()
    clock.t += 0.01
    sched.on_step(Report(clock.t, 0.01, (Row("a", 12, 2),), (Row("b", 12, 2),)))  # b left
    assert busy > 0 and sched.expected_wait_ms() < busy / 10


def test_a_late_request_lowers_the_rows_that_set_the_pace() -> None:
    sched, clock = make(slots=4)
    assert sched.admit("deep", 10, 1000, budget_ms=10_000.0).exit_layer == 12
    sched.on_step(Report(clock.t, 0.0079, (Row("deep", 12, 1),)))
    # 100 decode steps within 500 ms: not beside a row at 12 (7.2 ms a step), fine at 6 (4.45)
    tight = sched.admit("tight", 10, 101, budget_ms=500 / 0.9)
    assert tight.exit_layer == 6 and tight.feasible
    clock.t += 0.005
    rows = (Row("deep", 12, 2), Row("tight", 6, 1))
    assert sched.on_step(Report(clock.t, 0.005, rows)) == {"deep": 6}


def test_a_hopeless_request_does_not_drag_the_batch_down() -> None:
    sched, clock = make(slots=4)
    sched.admit("deep", 10, 1000, budget_ms=10_000.0)
    hopeless = sched.admit("hopeless", 10, 100, budget_ms=1.0)
    assert hopeless.exit_layer == 3 and not hopeless.feasible
    for step in range(1, 5):
        clock.t += 0.008
        rows = (Row("deep", 12, step), Row("hopeless", 3, step))
        assert sched.on_step(Report(clock.t, 0.008, rows)) == {}


def test_a_newcomer_does_not_make_running_requests_late() -> None:
    sched, clock = make(slots=4)
    # alone, 100 steps at exit 3 take 250 ms, at exit 6 400 ms: a 300 ms target gives exit 3
    assert sched.admit("running", 10, 101, budget_ms=300 / 0.9).exit_layer == 3
    sched.on_step(Report(clock.t, 0.0025, (Row("running", 3, 1),)))
    alone = sched.decide(10, 11, budget_ms=10_000.0)
    assert alone.exit_layer == 3  # anything deeper would slow "running" past its budget
    sched.finish("running")
    assert sched.decide(10, 11, budget_ms=10_000.0).exit_layer == 12


def test_online_model_learns_the_prefill_stalls_of_newcomers() -> None:
    sched, clock = make(slots=16, stall_alpha=0.05)
    rows = [Row("r0", 6, 1)]
    for step in range(1, 400):
        seconds = decode_ms(6, len(rows)) / 1000
        clock.t += seconds + 0.001  # 1 ms of bookkeeping between steps
        if step % 10 == 0:  # a newcomer's 20 ms prefill every 10 steps
            clock.t += 0.020
            rows = [*rows[-3:], Row(f"r{step}", 6, 1)]
        sched.on_step(Report(clock.t, seconds, tuple(rows)))
    snap = sched.latency.snapshot()
    assert snap["gap_ms"] == pytest.approx(1.0, rel=0.05)
    assert snap["stall_ms"] == pytest.approx(2.0, rel=0.35)  # 20 ms per 10 steps


def test_safety_margin_shrinks_on_misses_and_recovers() -> None:
    sched, _ = make(miss_target=0.05, margin_step=0.1)
    roomy = sched.decide(20, 21, budget_ms=1000.0)
    for i in range(5):  # feasible requests that missed: the model is too optimistic here
        sched.admit(f"m{i}", 20, 21, budget_ms=100.0)
        sched.finish(f"m{i}", total_ms=150.0)
    shrunk = sched.snapshot()["safety_margin"]
    assert shrunk == pytest.approx(0.9**5, rel=1e-3)
    sched.admit("hopeless", 20, 21, budget_ms=0.01)
    sched.finish("hopeless", total_ms=50.0)  # infeasible from the start: teaches nothing
    assert sched.snapshot()["safety_margin"] == shrunk
    for i in range(400):
        sched.admit(f"ok{i}", 20, 21, budget_ms=1000.0)
        sched.finish(f"ok{i}", total_ms=10.0)
    assert sched.snapshot()["safety_margin"] == 1.0
    assert sched.decide(20, 21, budget_ms=1000.0) == roomy


def test_predictions_calibrate_to_how_long_requests_really_take() -> None:
    sched, _ = make(bias_alpha=0.2)
    before = sched.decide(20, 21, budget_ms=10_000.0).predicted_ms
    for i in range(60):  # every request takes 1.5× its prediction
        d = sched.admit(f"r{i}", 20, 21, budget_ms=10_000.0)
        sched.finish(f"r{i}", total_ms=1.5 * d.predicted_ms / sched.bias, completion_tokens=21)
    assert sched.bias == pytest.approx(1.5, rel=0.01)
    assert sched.decide(20, 21, budget_ms=10_000.0).predicted_ms == pytest.approx(1.5 * before)
    sched.admit("short", 20, 21)
    sched.finish("short", total_ms=1.0, completion_tokens=3)  # stopped early: teaches nothing
    assert sched.bias == pytest.approx(1.5, rel=0.01)


def test_interleave_counts_the_steps_between_prefill_chunks() -> None:
    from app.scheduler.plans import interleave_ms

    config = SchedulerConfig(prefill_chunk=256, prefill_stall=1.5)
    # 1500 tokens at 2 ms: 3000 ms of prefill, 60 ms steps → chunks of at most 90 ms: 34 chunks
    assert interleave_ms(config, 1500, 3000.0, 60.0) == pytest.approx(33 * 60.0)
    # a cheap prefill: the size limit decides (6 chunks of ≤ 256 tokens)
    assert interleave_ms(config, 1500, 30.0, 60.0) == pytest.approx(5 * 60.0)
    # never under min_chunk tokens: at most ceil(40 / 16) = 3 chunks
    assert interleave_ms(config, 40, 1e6, 1.0) == pytest.approx(2.0)
    assert interleave_ms(config, 1500, 3000.0, 0.0) == 0.0  # nobody else runs
    assert interleave_ms(SchedulerConfig(), 1500, 3000.0, 60.0) == 0.0  # chunking off


def test_chunked_prefill_lengthens_a_newcomers_prediction_only_with_others_running() -> None:
    plain, _ = make()
    chunked, _ = make(prefill_chunk=64, prefill_stall=1.0)
    alone = [s.decide(600, 8, exit_layer=12) for s in (plain, chunked)]
    assert alone[0].predicted_ms == pytest.approx(alone[1].predicted_ms)
    assert alone[1].interleave_ms == 0.0
    for s in (plain, chunked):
        s.admit("running", 4, 100, exit_layer=12)
    busy = [s.decide(600, 8, exit_layer=12) for s in (plain, chunked)]
    # prefill 600 × 0.24 ms = 144 ms; the running one's step at exit 12 is 7 ms: ≥ 21 chunks
    step = decode_ms(12, 1)
    assert busy[1].interleave_ms == pytest.approx((math.ceil(144 / step) - 1) * step)
    assert busy[1].predicted_ms == pytest.approx(busy[0].predicted_ms + busy[1].interleave_ms)
    assert busy[0].interleave_ms == 0.0


def test_prefill_learning_leaves_the_interleaved_steps_aside() -> None:
    s, _ = make(prefill_chunk=64, prefill_stall=1.0)
    s.admit("running", 4, 100, exit_layer=12)
    d = s.admit("long", 600, 8, exit_layer=12)
    before = s.latency.prefill_ms(12, 600)
    # its prefill took just what the profile says; the rest of the TTFT was others' steps
    s.finish("long", queue_ms=0.0, ttft_ms=before + d.interleave_ms, total_ms=None)
    assert s.latency.prefill_ms(12, 600) == pytest.approx(before)
