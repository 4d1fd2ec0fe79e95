"""Autoscaling on SortedServe's own signals: the pure policy (no Ray), and a real local cluster that
adds a replica when requests wait for a batch slot."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.api.metrics import Metrics
from app.ray_serve.autoscaling import (
    MET,
    MISSED,
    RUNNING,
    SLOTS,
    WAITING,
    Signals,
    SortedServePolicy,
    decide,
    replica_stats,
)


def sig(**kw: Any) -> Signals:
    base = dict(replicas=2, waiting=0.0, running=4.0, slots_per_replica=8.0, met=20.0, missed=0.0)
    return Signals(**{**base, **kw})


def test_waiting_requests_add_replicas_by_the_slots_they_need() -> None:
    assert decide(sig(waiting=1), 1, 8) == (3, "requests waiting for a slot")
    assert decide(sig(waiting=17), 1, 8)[0] == 2 + 3  # ceil(17 / 8)
    assert decide(sig(waiting=17), 1, 4)[0] == 4  # never past max_replicas


def test_a_falling_budget_share_adds_one_replica() -> None:
    assert decide(sig(met=15, missed=5), 1, 8) == (3, "budgets met 75% < 90%")
    # too few budgeted requests to judge: no change on that ground
    assert decide(sig(met=3, missed=4, running=9), 1, 8)[0] == 2


def test_room_to_spare_removes_one_replica_but_never_below_min() -> None:
    assert decide(sig(running=3), 1, 8) == (1, "room to spare")
    assert decide(sig(running=3), 2, 8)[0] == 2
    assert decide(sig(running=3, met=10, missed=10), 1, 8)[0] == 3  # budgets suffer: up, not down
    assert decide(sig(running=12), 1, 8) == (2, "steady")


@dataclass
class Ctx:
    aggregated_metrics: dict[str, dict[str, float]]
    policy_state: dict[str, Any] = field(default_factory=dict)
    current_num_replicas: int = 2
    capacity_adjusted_min_replicas: int = 1
    capacity_adjusted_max_replicas: int = 4


def test_policy_judges_the_budget_share_since_its_last_decision() -> None:
    policy = SortedServePolicy(met_target=0.9, min_budgeted=10)
    totals = {MET: {"a": 100.0, "b": 100.0}, MISSED: {"a": 0.0, "b": 0.0}}
    metrics = {WAITING: {"a": 0, "b": 0}, RUNNING: {"a": 6, "b": 6}, SLOTS: {"a": 8, "b": 8}}
    want, state = policy(Ctx({**metrics, **totals}))
    assert want == 2 and state["met"] == 200.0
    # since then: 5 more met, 15 missed -> 25 % met: up
    later = {MET: {"a": 102.0, "b": 103.0}, MISSED: {"a": 7.0, "b": 8.0}}
    want, state = policy(Ctx({**metrics, **later}, policy_state=state))
    assert want == 3 and state["missed"] == 15.0


class FakeEngine:
    def stats(self) -> Any:
        @dataclass
        class S:
            running: int = 3
            waiting: int = 2
            free_slots: int = 1
            max_slots: int = 4

        return S()


def test_a_replica_reports_its_queue_and_budget_totals() -> None:
    metrics = Metrics()
    for outcome in ("met", "met", "missed", "none"):
        metrics.budget_requests.labels(outcome=outcome).inc()

    @dataclass
    class State:
        engine: Any
        metrics: Metrics

    stats = replica_stats(State(FakeEngine(), metrics))
    assert stats == {WAITING: 2.0, RUNNING: 3.0, SLOTS: 4.0, MET: 2.0, MISSED: 1.0}
    assert replica_stats(State(None, metrics)) == {}


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_waiting_requests_bring_a_second_replica(tiny_checkpoint: Path, tmp_path: Path) -> None:
    pytest.importorskip("ray.serve")
    from tests.ray_support import tiny_ray_server

    server = tiny_ray_server(
        tiny_checkpoint, tmp_path, 1,
        *("--min-replicas", "1", "--max-replicas", "2", "--upscale-delay", "0"),
        *("--max-batch-size", "1"),
    )  # fmt: skip
    server.start(timeout_s=300)
    try:
        assert len(httpx.get(f"{server.url}/ready", timeout=30).json()["replicas"]) == 1
        stop = threading.Event()

        def load() -> None:  # one slot, four clients: three always wait
            while not stop.is_set():
                body = {"prompt": "Once", "max_new_tokens": 120, "ignore_eos": True}
                httpx.post(f"{server.url}/v1/generate", json=body, timeout=120)

        threads = [threading.Thread(target=load) for _ in range(4)]
        for t in threads:
            t.start()
        t0 = time.monotonic()
        replicas: list[str] = []
        try:
            while time.monotonic() - t0 < 120:
                r = httpx.get(f"{server.url}/ready", timeout=30)
                replicas = r.json().get("replicas", []) if r.status_code == 200 else replicas
                if len(replicas) == 2:
                    break
                time.sleep(1)
        finally:
            stop.set()
            for t in threads:
                t.join()
        print(f"second replica ready {time.monotonic() - t0:.1f} s after the load began")
        assert len(replicas) == 2, server.tail()
    finally:
        assert server.stop() == 0
