"""Unit tests of the engine's batch bookkeeping (pure Python: no torch, no model)."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

from app.engine.batch import Batch, plan_rows
from app.engine.request_state import RequestState
from app.engine.types import FinalEvent, GenerationRequest, SamplingParams, TokenEvent

EOS = 0


def decode(ids: Any) -> str:
    return "".join(chr(ord("a") + (i - 1) % 26) for i in ids if i != EOS)


class Sink:
    """Stands in for an event loop and a request's queue (the batch only uses them as keys)."""


LOOP = Sink()


def state(rid: str, exit_layer: int, max_new: int = 10, prompt: int = 3, **kw: Any) -> RequestState:
    request = GenerationRequest(
        rid, list(range(1, prompt + 1)), exit_layer, SamplingParams(max_new_tokens=max_new, **kw)
    )
    return RequestState.create(request, LOOP, Sink(), decode, arrival=0.0)  # type: ignore[arg-type]


def finals(batch: Batch) -> dict[str, FinalEvent]:
    """The final events the batch has collected since the last call, by request id."""
    out: list[tuple[Any, TokenEvent | FinalEvent]] = batch.take_events().get(LOOP, [])  # type: ignore[call-overload]
    return {e.request_id: e for _, e in out if isinstance(e, FinalEvent)}


def admit_all(batch: Batch, token: int = 5) -> list[RequestState]:
    admitted = []
    while (s := batch.next_admission()) is not None:
        batch.joined(s, token, 1.0)
        admitted.append(s)
    return admitted


def test_batch_module_imports_no_torch() -> None:
    code = "import sys, app.engine.batch; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_admission_fills_free_rows_up_to_the_slots() -> None:
    done: list[str] = []
    batch = Batch(2, 64, frozenset({EOS}), done.append)
    for i, k in enumerate((2, 4, 3)):
        batch.add(state(f"r{i}", k))
    admitted = admit_all(batch)
    assert [s.request_id for s in admitted] == ["r0", "r1"]
    assert sorted(s.row for s in admitted) == [0, 1]
    assert [s.request_id for s in batch.waiting] == ["r2"] and batch.busy
    assert done == []


def test_layout_orders_rows_deepest_first_and_moves_little() -> None:
    batch = Batch(4, 64, frozenset({EOS}))
    for i, k in enumerate((2, 4, 3)):
        batch.add(state(f"r{i}", k))
    admit_all(batch)
    layout = batch.layout()
    assert layout is not None
    assert [s.request_id for s in batch.running] == ["r1", "r2", "r0"]
    assert layout.exits == [4, 3, 2] and layout.positions == [3, 3, 3]
    assert sorted(layout.moves) == [(0, 2, 2), (1, 0, 4), (2, 1, 3)]  # (src, dst, exit)
    assert batch.layout() is None  # nothing changed since
    batch.add(state("r3", 3))
    admit_all(batch)  # joins in the free row 3: only the exit-2 row has to move
    layout = batch.layout()
    assert layout is not None and layout.exits == [4, 3, 3, 2]
    assert sorted(layout.moves) == [(2, 3, 2), (3, 2, 3)]
    assert plan_rows([0, 1, 2], [4, 4, 2]) == [0, 1, 2]


def test_a_step_reports_exits_rows_and_the_rows_that_left() -> None:
    done: list[str] = []
    batch = Batch(4, 64, frozenset({EOS}), done.append)
    batch.add(state("long", 4, max_new=10))
    batch.add(state("short", 2, max_new=2))
    admit_all(batch)
    batch.layout()
    inputs = batch.step_inputs()
    assert inputs.tokens == [5, 5] and inputs.kv_len == 4 and inputs.sampled == []
    report = batch.stepped([6, 7], now=2.0, seconds=0.01)
    assert report.exits == (4, 2) and report.batch_size == 2 and report.deepest_exit == 4
    assert [r.request_id for r in report.rows] == ["long"]
    assert [(r.request_id, r.generated) for r in report.finished] == [("short", 2)]
    assert done == ["short"] and [s.request_id for s in batch.running] == ["long"]
    assert batch.layout() is not None  # membership changed


def test_eos_stop_and_length_end_a_request_with_their_reasons() -> None:
    batch = Batch(4, 64, frozenset({EOS}))
    batch.add(state("eos", 2))
    batch.add(state("stop", 2, stop=("c",)))
    batch.add(state("len", 2, max_new=1))
    admit_all(batch, token=1)  # "a"
    ended = finals(batch)
    assert set(ended) == {"len"} and ended["len"].finish_reason == "length"
    batch.layout()
    batch.stepped([EOS, 3], now=2.0, seconds=0.01)  # eos: token 0; stop: "c"
    ended = finals(batch)
    assert ended["eos"].finish_reason == "eos" and ended["eos"].text == "a"
    assert ended["stop"].finish_reason == "stop" and ended["stop"].text == "a"
    assert not batch.busy


def test_lowering_only_goes_shallower_and_cancel_reaches_waiting_requests() -> None:
    done: list[str] = []
    batch = Batch(1, 64, frozenset({EOS}), done.append)
    batch.add(state("run", 4))
    batch.add(state("wait", 4))
    (running,) = admit_all(batch)
    batch.layout()
    batch.lower(running, 4)  # not lower: ignored
    batch.lower(running, "two")  # not an exit: ignored
    assert batch.layout() is None and running.exit_layer == 4
    batch.lower(running, 2)
    assert running.exit_layer == 2 and batch.layout() is not None
    assert [(d.at_token, d.from_exit, d.to_exit) for d in running.downgrades] == [(1, 4, 2)]
    batch.cancel("wait")
    batch.cancel("no-such-request")
    assert done == ["wait"] and not batch.waiting
    batch.finish_all("cancelled")
    assert done == ["wait", "run"] and not batch.busy
    report = batch.stepped([], now=3.0, seconds=0.0)
    assert [r.request_id for r in report.finished] == ["run"]  # cancelled between steps


def test_the_context_limit_ends_a_request() -> None:
    batch = Batch(1, 5, frozenset({EOS}))
    batch.add(state("r", 2, max_new=100, prompt=3))
    admit_all(batch)
    batch.layout()
    batch.stepped([6], now=2.0, seconds=0.01)  # prompt 3 + 2 tokens fill the 5 positions
    (ended,) = finals(batch).values()
    assert ended.finish_reason == "length" and ended.completion_tokens == 2
