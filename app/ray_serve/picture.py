"""The load picture one replica publishes in Ray Serve's ``routing_stats``.

A router must know, without asking, what exit a request would get on each replica. The replica's
depth scheduler predicts a request at exit *k* as ``wait + prefill(k) × prompt tokens + (new
tokens − 1) × pace(k)`` (SPEC §4, bias included). :func:`take_picture` reads those three terms
off the scheduler's own :meth:`~app.scheduler.DepthScheduler.decide` (forced to each exit, for
1 or 2 new tokens and 0 or 1 prompt tokens, so that the router's arithmetic reproduces the
scheduler's prediction for any request shape), plus how the pace grows with ``m`` more rows, for
requests the router sends before the next picture arrives. Pure Python, no Ray, no torch.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

EXTRA_ROWS = 4  # pace published for 0..EXTRA_ROWS rows more than the picture shows


@dataclass(frozen=True)
class LoadPicture:
    replica: str
    taken_at: float  # time.time() on the replica
    ready: bool
    draining: bool
    running: int  # rows in the batch
    waiting: int  # admitted requests waiting for a slot
    inflight: int  # admitted generation requests (running + waiting + being prepared)
    max_slots: int
    exits: tuple[int, ...]
    batch_exits: tuple[int, ...]  # exits of the rows of the last decode step
    headroom: float  # the scheduler's budget × headroom × learnt margin
    base_ms: dict[int, float]  # prediction for 0 prompt tokens, 1 new token, at exit k
    prefill_ms_per_token: dict[int, float]
    pace_ms: dict[int, tuple[float, ...]]  # ms per new token at k with 0..EXTRA_ROWS more rows
    latency: dict[str, Any] = field(default_factory=dict)  # the scheduler's snapshot, as is

    @property
    def load(self) -> int:
        return max(self.inflight, self.running + self.waiting)

    def predict_ms(
        self, exit_layer: int, prompt_tokens: int, max_new_tokens: int, extra_rows: int = 0
    ) -> float:
        """The replica's prediction for a request arriving now, ``extra_rows`` requests after
        this picture was taken."""
        paces = self.pace_ms[exit_layer]
        pace = paces[min(max(extra_rows, 0), len(paces) - 1)]
        # past the table (more unseen requests than published), grow by the last step
        if extra_rows >= len(paces) and len(paces) > 1:
            pace += (extra_rows - len(paces) + 1) * (paces[-1] - paces[-2])
        return (
            self.base_ms[exit_layer]
            + self.prefill_ms_per_token[exit_layer] * max(prompt_tokens, 0)
            + max(max_new_tokens - 1, 0) * pace
        )

    def to_stats(self) -> dict[str, Any]:
        """JSON-able (string keys), for ``record_routing_stats``."""
        return {
            "replica": self.replica,
            "taken_at": self.taken_at,
            "ready": self.ready,
            "draining": self.draining,
            "running": self.running,
            "waiting": self.waiting,
            "inflight": self.inflight,
            "max_slots": self.max_slots,
            "exits": list(self.exits),
            "batch_exits": list(self.batch_exits),
            "headroom": self.headroom,
            "base_ms": {str(k): v for k, v in self.base_ms.items()},
            "prefill_ms_per_token": {str(k): v for k, v in self.prefill_ms_per_token.items()},
            "pace_ms": {str(k): list(v) for k, v in self.pace_ms.items()},
            "latency": dict(self.latency),
        }

    @classmethod
    def from_stats(cls, stats: Mapping[str, Any] | None) -> LoadPicture | None:
        """The picture in ``stats``; ``None`` for an empty or unreadable one (a replica that has
        not published yet)."""
        if not stats or "exits" not in stats:
            return None
        try:
            exits = tuple(int(k) for k in stats["exits"])
            return cls(
                replica=str(stats["replica"]),
                taken_at=float(stats["taken_at"]),
                ready=bool(stats["ready"]),
                draining=bool(stats["draining"]),
                running=int(stats["running"]),
                waiting=int(stats["waiting"]),
                inflight=int(stats["inflight"]),
                max_slots=int(stats["max_slots"]),
                exits=exits,
                batch_exits=tuple(int(k) for k in stats["batch_exits"]),
                headroom=float(stats["headroom"]),
                base_ms={k: float(stats["base_ms"][str(k)]) for k in exits},
                prefill_ms_per_token={
                    k: float(stats["prefill_ms_per_token"][str(k)]) for k in exits
                },
                pace_ms={k: tuple(float(x) for x in stats["pace_ms"][str(k)]) for k in exits},
                latency=dict(stats.get("latency", {})),
            )
        except (KeyError, TypeError, ValueError) as exc:
            logger.warning("unreadable routing stats (%s): %s", type(exc).__name__, exc)
            return None


def take_picture(
    replica: str,
    scheduler: Any,
    *,
    running: int,
    waiting: int,
    inflight: int,
    max_slots: int,
    batch_exits: Sequence[int],
    ready: bool = True,
    draining: bool = False,
    now: float | None = None,
) -> LoadPicture:
    """The picture of a replica whose depth scheduler is ``scheduler`` (a DepthScheduler)."""
    exits = tuple(scheduler.exits)
    snapshot = dict(scheduler.snapshot())

    def decide(prompt_tokens: int, new_tokens: int, k: int) -> float:
        return float(scheduler.decide(prompt_tokens, new_tokens, exit_layer=k).predicted_ms)

    base: dict[int, float] = {}
    prefill: dict[int, float] = {}
    pace: dict[int, tuple[float, ...]] = {}
    deepest = exits[-1]
    rows = list(batch_exits)
    for k in exits:
        one, two = decide(0, 1, k), decide(0, 2, k)
        base[k] = one
        prefill[k] = max(decide(1, 1, k) - one, 0.0)
        now_pace = max(two - one, 0.0)
        paces = [now_pace]
        for m in range(1, EXTRA_ROWS + 1):
            grown = _token_ms(scheduler, [*rows, *([deepest] * m), k])
            alone = _token_ms(scheduler, [*rows, k])
            bias = float(getattr(scheduler, "bias", 1.0))
            paces.append(now_pace + max(grown - alone, 0.0) * bias)
        pace[k] = tuple(paces)
    return LoadPicture(
        replica=replica,
        taken_at=time.time() if now is None else now,
        ready=ready,
        draining=draining,
        running=running,
        waiting=waiting,
        inflight=inflight,
        max_slots=max_slots,
        exits=exits,
        batch_exits=tuple(rows),
        headroom=float(snapshot.get("headroom", 1.0)),
        base_ms=base,
        prefill_ms_per_token=prefill,
        pace_ms=pace,
        latency=snapshot,
    )


def _token_ms(scheduler: Any, row_exits: list[int]) -> float:
    """Per-token time of a batch with these rows: the scheduler's corrected latency model, or
    the measured profile's step time when the model is not reachable."""
    try:
        return float(scheduler.latency.token_ms(row_exits))
    except AttributeError:
        return float(scheduler.profile.step_ms(row_exits))
