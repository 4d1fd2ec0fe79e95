"""Budget-aware routing, pure Python (no Ray): the load picture a replica publishes reproduces its
depth scheduler's predictions, and the ranking sends each request where it gets the deepest exit
within its budget (ties by predicted finish), or to the least-loaded replica without a budget."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import pytest

from app.ray_serve.picture import EXTRA_ROWS, LoadPicture, take_picture
from app.ray_serve.ranking import RequestShape, explain, prospect, rank
from app.scheduler import DepthScheduler, SchedulerConfig
from tests.test_scheduler import EXITS, Clock, Report, Row
from tests.test_scheduler import synth_profile as profile


def scheduler_with(running: int, clock: Clock | None = None) -> DepthScheduler:
    """A scheduler with ``running`` no-budget requests decoding at full depth."""
    clock = clock or Clock()
    s = DepthScheduler(profile(), SchedulerConfig(max_slots=16), clock=clock)
    rows = []
    for i in range(running):
        s.admit(f"r{i}", prompt_tokens=10, max_new_tokens=400, arrival=clock.t)
        rows.append(Row(f"r{i}", 12, 5))
    if rows:
        s.on_step(Report(clock.t, 0.0, tuple(rows)))
    return s


def picture_of(name: str, running: int) -> LoadPicture:
    s = scheduler_with(running)
    return take_picture(
        name,
        s,
        running=running,
        waiting=0,
        inflight=running,
        max_slots=16,
        batch_exits=[12] * running,
        now=1000.0,
    )


@pytest.mark.parametrize("running", [0, 1, 5])
@pytest.mark.parametrize(("prompt", "new"), [(1, 1), (7, 32), (120, 200)])
def test_picture_reproduces_the_scheduler_prediction(running: int, prompt: int, new: int) -> None:
    s = scheduler_with(running)
    pic = take_picture(
        "a", s, running=running, waiting=0, inflight=running, max_slots=16, batch_exits=[]
    )
    for k in EXITS:
        expected = s.decide(prompt, new, exit_layer=k).predicted_ms
        assert pic.predict_ms(k, prompt, new) == pytest.approx(expected, rel=1e-9, abs=1e-9)


def test_pace_grows_with_unseen_rows_and_round_trips_through_stats() -> None:
    pic = picture_of("a", 2)
    for k in EXITS:
        paces = pic.pace_ms[k]
        assert len(paces) == EXTRA_ROWS + 1
        assert all(b > a for a, b in itertools.pairwise(paces))
        # past the table, the pace keeps growing
        assert pic.predict_ms(k, 4, 64, EXTRA_ROWS + 3) > pic.predict_ms(k, 4, 64, EXTRA_ROWS)
    again = LoadPicture.from_stats(pic.to_stats())
    assert again == pic


def test_unreadable_stats_give_no_picture() -> None:
    assert LoadPicture.from_stats({}) is None
    assert LoadPicture.from_stats(None) is None
    broken = picture_of("a", 0).to_stats()
    del broken["pace_ms"]["12"]
    assert LoadPicture.from_stats(broken) is None


def test_a_tight_budget_goes_where_it_gets_the_deepest_exit() -> None:
    busy, idle = picture_of("busy", 8), picture_of("idle", 0)
    shape = RequestShape(prompt_tokens=10, max_new_tokens=32, budget_ms=200)
    on_busy, on_idle = prospect(busy, shape), prospect(idle, shape)
    assert on_idle.exit_layer > on_busy.exit_layer  # the premise: load costs depth
    assert rank({"busy": busy, "idle": idle}, shape) == ["idle", "busy"]
    assert rank({"idle": idle, "busy": busy}, shape) == ["idle", "busy"]


def test_a_loose_budget_is_a_tie_on_depth_broken_by_the_earlier_finish() -> None:
    busy, idle = picture_of("busy", 3), picture_of("idle", 0)
    shape = RequestShape(prompt_tokens=10, max_new_tokens=16, budget_ms=10_000)
    prospects = explain({"busy": busy, "idle": idle}, shape)
    assert prospects["busy"].exit_layer == prospects["idle"].exit_layer == 12
    assert prospects["idle"].predicted_ms < prospects["busy"].predicted_ms
    assert rank({"busy": busy, "idle": idle}, shape) == ["idle", "busy"]


def test_an_infeasible_budget_still_prefers_the_replica_where_it_fits() -> None:
    a, b = picture_of("a", 12), picture_of("b", 1)
    # a budget between what the shallowest exit needs on each
    need_a, need_b = (p.predict_ms(EXITS[0], 10, 64) for p in (a, b))
    budget = (need_a + need_b / b.headroom) / 2
    assert need_b / b.headroom < budget < need_a
    shape = RequestShape(prompt_tokens=10, max_new_tokens=64, budget_ms=budget)
    pa, pb = prospect(a, shape), prospect(b, shape)
    assert pb.fits and not pa.fits
    assert rank({"a": a, "b": b}, shape)[0] == "b"


def test_no_budget_goes_to_the_least_loaded_and_unseen_requests_count() -> None:
    a, b = picture_of("a", 2), picture_of("b", 3)
    shape = RequestShape(prompt_tokens=10, max_new_tokens=64)
    assert rank({"a": a, "b": b}, shape) == ["a", "b"]
    # two requests sent to "a" since its picture: it is now the busier one
    assert rank({"a": a, "b": b}, shape, {"a": 2}) == ["b", "a"]


def test_unseen_requests_lower_the_exit_a_budget_gets() -> None:
    a = picture_of("a", 1)
    shape = RequestShape(prompt_tokens=10, max_new_tokens=48, budget_ms=400)
    exits = [prospect(a, shape, extra).exit_layer for extra in range(0, 12)]
    assert exits == sorted(exits, reverse=True)
    assert exits[0] > exits[-1]


def test_forced_exit_goes_to_the_earliest_finish_at_that_exit() -> None:
    a, b = picture_of("a", 4), picture_of("b", 1)
    shape = RequestShape(prompt_tokens=10, max_new_tokens=64, exit_layer=3)
    assert prospect(b, shape).exit_layer == 3
    assert rank({"a": a, "b": b}, shape) == ["b", "a"]


def test_replicas_without_a_picture_or_draining_come_last() -> None:
    good = picture_of("good", 6)
    draining = LoadPicture.from_stats({**picture_of("d", 0).to_stats(), "draining": True})
    shape = RequestShape(prompt_tokens=10, max_new_tokens=64, budget_ms=300)
    order = rank({"new": None, "d": draining, "good": good}, shape)
    assert order[0] == "good"
    assert order[-1] == "d"  # a draining replica is the very last resort


def test_idle_ties_are_broken_at_random() -> None:
    shape = RequestShape(prompt_tokens=10, max_new_tokens=64)
    pictures = {"a": picture_of("a", 0), "b": picture_of("b", 0)}
    rng = random.Random(7)
    firsts = {rank(pictures, shape, rng=rng)[0] for _ in range(40)}
    assert firsts == {"a", "b"}


def test_shapes_round_trip_and_reject_garbage() -> None:
    shape = RequestShape(prompt_tokens=3, max_new_tokens=9, budget_ms=50.0, exit_layer=None)
    assert RequestShape.from_dict(shape.to_dict()) == shape
    assert RequestShape.from_dict({"prompt_tokens": "x", "max_new_tokens": 1}) is None
    assert RequestShape.from_dict(None) is None


def test_the_ingress_reads_each_route_s_shape_without_validating() -> None:
    from app.ray_serve.shapes import TokenCounter, read_shape

    counter = TokenCounter(None)  # no tokenizer: characters / 4
    native = read_shape(
        "/v1/generate",
        b'{"prompt": "abcdefgh", "budget_ms": 80}',
        counter,
        default_max_new_tokens=128,
    )
    assert native == RequestShape(prompt_tokens=3, max_new_tokens=128, budget_ms=80.0)
    completion = read_shape("/v1/completions", b'{"prompt": [5, 6, 7], "exit_layer": 3}', counter)
    assert completion == RequestShape(prompt_tokens=3, max_new_tokens=16, exit_layer=3)
    chat = read_shape(
        "/v1/chat/completions",
        b'{"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 9}',
        counter,
    )
    assert chat is not None and chat.max_new_tokens == 9 and chat.prompt_tokens >= 6
    assert read_shape("/v1/generate", b"{broken", counter) is None
    assert read_shape("/v1/generate", b'{"budget_ms": "soon"}', counter) is None
    assert read_shape("/info", b"", counter) is None


def test_the_checkpoint_tokenizer_counts_prompt_tokens(tiny_checkpoint: Path) -> None:
    from transformers import AutoTokenizer

    from app.ray_serve.shapes import TokenCounter

    text = "Once upon a time there was a little girl."
    expected = len(AutoTokenizer.from_pretrained(tiny_checkpoint)(text)["input_ids"])
    assert abs(TokenCounter(tiny_checkpoint).count(text) - expected) <= 1  # BOS aside
