"""``bench budget``'s pure parts, without a server: the workload mix, capacity arithmetic, the
per-run summary (client against server verdict, per class), the figures over repeats, the verdict
and the printed report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from app.bench.budget_load import Outcome
from app.bench.budget_repeats import aggregate, report, verdict
from app.bench.budget_summary import summarize
from app.bench.budget_workload import (
    budgets_for,
    closed_loop_rate,
    implied_quality,
    load_long_prompts,
    parse_factors,
    parse_rates,
    plan_requests,
    split_documents,
)

EXITS = [9, 30]
LOSS = {"9": 8.0, "30": 2.0}


def _text() -> str:
    return "\n\n".join(f"Paragraph {i}. " + "The cat sat on the mat. " * 12 for i in range(40))


def test_documents_are_a_few_hundred_tokens_of_whole_paragraphs() -> None:
    docs = split_documents(_text())
    assert len(docs) >= 5
    assert all(550 <= len(d) <= 1500 for d in docs)
    assert all(d.startswith("Paragraph") and d.endswith("mat.") for d in docs)


def test_long_prompts_come_in_the_trained_format_and_need_the_file(tmp_path: Path) -> None:
    path = tmp_path / "stories.txt"
    assert load_long_prompts(0, path) == []
    path.write_text(_text())
    prompts = load_long_prompts(0, path)
    assert prompts and all("### Input:\n" in p and p.endswith("### Response:\n") for p in prompts)
    assert sorted(prompts) == sorted(load_long_prompts(1, path))  # the same, in another order


def test_the_plan_mixes_classes_and_budgets_by_seed() -> None:
    short, long = ["s1", "s2", "s3"], ["l1", "l2"]
    plan = plan_requests(4000, short, long, 0.1, [1.5, 4.0], seed=3)
    assert plan == plan_requests(4000, short, long, 0.1, [1.5, 4.0], seed=3)
    assert plan != plan_requests(4000, short, long, 0.1, [1.5, 4.0], seed=4)
    longs = [p for p in plan if p.kind == "long"]
    assert 0.08 < len(longs) / len(plan) < 0.12
    assert {p.prompt for p in longs} == set(long)
    assert all(p.prompt in short for p in plan if p.kind == "short")
    tight = sum(1 for p in plan if p.factor == 1.5) / len(plan)
    assert 0.45 < tight < 0.55 and {p.factor for p in plan} == {1.5, 4.0}
    # prompts cycle within their class, so every short prompt is used equally often
    counts = [sum(1 for p in plan if p.prompt == s) for s in short]
    assert max(counts) - min(counts) <= 1
    assert all(p.kind == "short" for p in plan_requests(50, short, [], 0.5, [2.0], seed=0))
    with pytest.raises(ValueError):
        plan_requests(5, [], long, 0.1, [2.0], seed=0)


def test_budgets_are_the_factor_times_the_idle_latency_of_the_class() -> None:
    plan = plan_requests(200, ["s"], ["l"], 0.3, [1.5, 4.0], seed=0)
    budgets = budgets_for(plan, {"short": 100.0, "long": 400.0})
    for p, b in zip(plan, budgets, strict=True):
        assert b == p.factor * (100.0 if p.kind == "short" else 400.0)
    assert budgets_for(plan, {"short": 100.0, "long": 400.0}, fixed_ms=250) == [250.0] * 200


def test_closed_loop_rate_is_clients_over_latency() -> None:
    # 4 clients, each request 2 s, started in step: 2 requests/s whatever the window's phase
    spans = [(t, t + 2.0) for t in range(0, 20, 2) for _ in range(4)]
    assert closed_loop_rate(spans, 0.0, 20.0) == pytest.approx(2.0)
    assert closed_loop_rate(spans, 1.0, 12.0) == pytest.approx(2.0)  # cuts requests in half
    staggered = [(c * 0.5 + t, c * 0.5 + t + 2.0) for c in range(4) for t in range(0, 24, 2)]
    assert closed_loop_rate(staggered, 2.0, 20.0) == pytest.approx(2.0)
    with pytest.raises(ValueError):
        closed_loop_rate(spans, 5.0, 5.0)


def test_rates_keep_their_labels_and_factors_parse() -> None:
    assert parse_rates("1x, 2x,4x,5,0", 2.5) == [("1x", 2.5), ("2x", 5.0), ("4x", 10.0), ("5", 5.0)]
    assert parse_factors("1.5,4") == [1.5, 4.0]
    with pytest.raises(ValueError):
        parse_factors("0,2")


def test_implied_quality_weights_the_table_by_the_mix() -> None:
    assert implied_quality({"9": 0.25, "30": 0.75}, LOSS) == pytest.approx(3.5)
    assert implied_quality({"9": 0.0, "30": 1.0}, LOSS) == 2.0
    assert implied_quality({}, LOSS) is None
    assert implied_quality({"12": 1.0}, LOSS) is None


def _ok(client_ms: float, elapsed_ms: float, exit_layer: int = 30, tokens: int = 50) -> Outcome:
    body = {
        "exit_layer": exit_layer,
        "finish_reason": "length",
        "usage": {"prompt_tokens": tokens, "completion_tokens": 8},
        "budget": {
            "elapsed_ms": elapsed_ms,
            "predicted_ms": elapsed_ms,
            "initial_exit_layer": exit_layer,
            "downgrades": [],
        },
    }
    return Outcome(200, client_ms, body)


def test_the_client_clock_decides_and_the_server_is_reported_beside_it() -> None:
    outcomes = [
        _ok(90, 80, exit_layer=9),  # met on both clocks
        _ok(110, 95),  # the server says met, the client waited too long
        _ok(300, 280, tokens=300),  # long, loose budget, met
        Outcome(429, 5.0),  # refused: a miss
        Outcome(422, 1.0),  # invalid: left out of both arms
    ]
    budgets = [100.0, 100.0, 400.0, 100.0, 100.0]
    classes = ["1.5x", "1.5x", "4x", "1.5x", "1.5x"]
    kinds = ["short", "short", "long", "short", "short"]
    s = summarize(outcomes, budgets, EXITS, classes, kinds)
    assert (s["requests"], s["completed"], s["invalid_4xx"], s["refused_429"]) == (4, 3, 1, 1)
    assert s["met_share"] == 0.5 and s["server_met_share"] == 0.75
    assert s["by_budget_class"]["1.5x"]["met_share"] == round(1 / 3, 4)
    assert s["by_budget_class"]["4x"] == {
        "requests": 1,
        "met_share": 1.0,
        "server_met_share": 1.0,
        "median_budget_ms": 400.0,
    }
    assert s["by_prompt_class"]["long"]["met_share"] == 1.0
    assert s["mean_prompt_tokens"] == {"long": 300.0, "short": 50.0}
    assert s["exit_mix"] == {"9": 0.333, "30": 0.667}
    # one budget for all still works, as before
    assert summarize(outcomes[:2], 100.0, EXITS)["met_share"] == 0.5


def _run(rep: int, label: str, arm: str, met: float, mix: dict[str, float]) -> dict[str, Any]:
    return {
        "repeat": rep,
        "rate_label": label,
        "rate": {"1x": 2.0, "2x": 4.0}[label] + 0.01 * rep,
        "arm": arm,
        "requests": 40,
        "completed": 40,
        "refused_429": 0,
        "failed": 0,
        "met_share": met,
        "server_met_share": met,
        "by_budget_class": {"1.5x": {"met_share": met}, "4x": {"met_share": 1.0}},
        "client_latency_ms": {"p99": 900.0},
        "exit_mix": mix,
    }


def _runs(ss_2x: list[float]) -> list[dict[str, Any]]:
    runs = []
    for rep, ss in enumerate(ss_2x):
        runs += [
            _run(rep, "1x", "sortedserve", 1.0, {"9": 0.0, "30": 1.0}),
            _run(rep, "1x", "full-depth", 0.6, {"9": 0.0, "30": 1.0}),
            _run(rep, "2x", "sortedserve", ss, {"9": 0.5, "30": 0.5}),
            _run(rep, "2x", "full-depth", 0.2, {"9": 0.0, "30": 1.0}),
        ]
    return runs


def test_repeats_give_every_share_and_the_spread() -> None:
    rows = aggregate(_runs([1.0, 0.995, 0.97]), LOSS)
    assert [(r["rate_label"], r["arm"]) for r in rows] == [
        ("1x", "sortedserve"),
        ("1x", "full-depth"),
        ("2x", "sortedserve"),
        ("2x", "full-depth"),
    ]
    ss = rows[2]
    assert ss["met_shares"] == [1.0, 0.995, 0.97]
    assert (ss["met_spread"]["min"], ss["met_spread"]["max"]) == (0.97, 1.0)
    assert ss["by_budget_class"] == {"1.5x": [1.0, 0.995, 0.97], "4x": [1.0, 1.0, 1.0]}
    assert ss["exit_mix"] == {"9": 0.5, "30": 0.5} and ss["implied_quality"] == 5.0
    assert rows[3]["implied_quality"] == 2.0


def test_the_target_must_hold_in_every_repeat() -> None:
    missed = verdict(aggregate(_runs([1.0, 0.995, 0.97]), LOSS), LOSS)
    assert missed["sortedserve_met_99_every_repeat"] is False
    assert missed["full_depth_under_half_every_repeat"] is True
    assert missed["target_met"] is False
    met = verdict(aggregate(_runs([1.0, 0.995, 0.99]), LOSS), LOSS)
    assert met["target_met"] is True and met["full_depth_quality"] == 2.0
    assert [p["rate"] for p in met["per_rate"]] == ["1x", "2x"]
    assert met["per_rate"][0]["full_depth_under_half_every_repeat"] is False
    only_1x = [r for r in _runs([1.0]) if r["rate_label"] == "1x"]
    assert verdict(aggregate(only_1x, LOSS), LOSS)["target_met"] is None


def test_the_report_shows_every_repeat() -> None:
    rows = aggregate(_runs([1.0, 0.995, 0.97]), LOSS)
    result = {
        "by_rate": rows,
        "verdict": verdict(rows, LOSS),
        "capacity": {"requests_per_s": 2.0, "clients": 16, "seconds": 20.0},
        "idle_rate_per_s": 1.2,
        "max_new_tokens": 16,
        "budget_factors": [1.5, 4.0],
        "idle_latency_ms": {"short": 800.0, "long": 1500.0},
    }
    text = report(result)
    assert "100.0 / 99.5 / 97.0" in text and "97.0-100.0" in text
    assert "NOT met" in text and "9:50 30:50" in text


def test_target_ray_runs_the_router_benchmark(monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    from app.bench import budget
    from app.ray_serve import bench as ray_bench

    seen: list[list[str]] = []
    monkeypatch.setattr(ray_bench, "main", lambda argv: seen.append(argv) or 0)
    p = argparse.ArgumentParser()
    budget.add_arguments(p)
    args = p.parse_args(["--target", "ray", "--model", "m", "--duration", "5", "--threads", "2"])
    assert budget.run(args) == 0
    assert seen == [["--model", "m", "--duration", "5.0", "--seed", "0", "--threads", "2"]]
