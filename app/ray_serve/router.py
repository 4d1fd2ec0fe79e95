"""Ray Serve request routers for the engine deployment.

:class:`BudgetAwareRouter` ranks the replicas with :func:`app.ray_serve.ranking.rank` on the load
pictures they publish (``RunningReplica.routing_stats``), counting the requests it sent each
replica after its picture was taken. It returns one replica per rank, so that Ray's own queue-length
check only moves a request on when the best replica is full.

:class:`PowerOfTwoRouter` (Ray's default policy) and :class:`RoundRobinRouter` are here to compare
against (``--router``). All three honour the ingress's fan-out keys: a call with ``fanout_exclude``
goes to a replica not in that list (or, once all were visited, to any), which is how the ingress
reaches every replica for ``/ready`` and ``/metrics``.
"""

from __future__ import annotations

import itertools
import logging
import random
import time
from dataclasses import dataclass
from typing import Any

from ray.serve._private.request_router.pow_2_router import PowerOfTwoChoicesRequestRouter
from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from app.ray_serve.picture import LoadPicture
from app.ray_serve.ranking import RequestShape, rank

logger = logging.getLogger(__name__)

SHAPE_KWARG = "shape"
FANOUT_KWARG = "fanout_exclude"
_FORGET_AFTER_S = 600.0  # a routed request never reported complete is dropped after this


def fanout_choice(
    candidates: list[RunningReplica], pending: PendingRequest | None
) -> list[list[RunningReplica]] | None:
    """The ranks for a fan-out call (``None`` for an ordinary request)."""
    if pending is None or FANOUT_KWARG not in pending.kwargs:
        return None
    seen = set(pending.kwargs[FANOUT_KWARG] or ())
    fresh = [r for r in candidates if r.replica_id.unique_id not in seen]
    return [fresh] if fresh else [candidates]


def request_shape(pending: PendingRequest | None) -> RequestShape | None:
    if pending is None:
        return None
    return RequestShape.from_dict(pending.kwargs.get(SHAPE_KWARG))


@dataclass
class _Sent:
    replica: str
    at: float  # time.time()


class BudgetAwareRouter(RequestRouter):
    """The deepest exit within the budget, across replicas."""

    def initialize_state(self, **kwargs: Any) -> None:
        self._sent: dict[str, _Sent] = {}
        self._rng = random.Random(kwargs.get("seed"))
        self.decisions = 0

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        fan = fanout_choice(candidate_replicas, pending_request)
        if fan is not None:
            return fan
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        pictures = {rid: LoadPicture.from_stats(r.routing_stats) for rid, r in by_id.items()}
        order = rank(pictures, request_shape(pending_request), self._unseen(pictures), self._rng)
        self.decisions += 1
        if order and pending_request is not None:
            # counted at once: a request routed meanwhile must see this one (on_request_routed
            # corrects the replica if Ray's queue check moves it on)
            key = pending_request.metadata.internal_request_id
            self._sent[key] = _Sent(order[0], time.time())
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("routing %s: %s", request_shape(pending_request), order)
        return [[by_id[rid]] for rid in order]

    def _unseen(self, pictures: dict[str, LoadPicture | None]) -> dict[str, int]:
        """Requests sent to each replica after its picture was taken (still in flight)."""
        now = time.time()
        counts: dict[str, int] = {}
        for key, sent in list(self._sent.items()):
            if now - sent.at > _FORGET_AFTER_S:
                del self._sent[key]
                continue
            picture = pictures.get(sent.replica)
            if picture is None or sent.at > picture.taken_at:
                counts[sent.replica] = counts.get(sent.replica, 0) + 1
        return counts

    def on_request_routed(
        self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any
    ) -> None:
        if FANOUT_KWARG in pending_request.kwargs:
            return
        key = pending_request.metadata.internal_request_id
        self._sent[key] = _Sent(replica_id.unique_id, time.time())

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        self._sent.pop(internal_request_id, None)


class PowerOfTwoRouter(PowerOfTwoChoicesRequestRouter):
    """Ray Serve's default (power of two choices on queue length), plus the fan-out keys."""

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        fan = fanout_choice(candidate_replicas, pending_request)
        if fan is not None:
            return fan
        return await super().choose_replicas(candidate_replicas, pending_request)


class RoundRobinRouter(RequestRouter):
    """Each request to the next replica, whatever its load."""

    def initialize_state(self, **kwargs: Any) -> None:
        self._turn = itertools.count()

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        fan = fanout_choice(candidate_replicas, pending_request)
        if fan is not None:
            return fan
        ordered = sorted(candidate_replicas, key=lambda r: r.replica_id.unique_id)
        if not ordered:
            return []
        start = next(self._turn) % len(ordered)
        return [[r] for r in ordered[start:] + ordered[:start]]


ROUTERS: dict[str, type[RequestRouter]] = {
    "budget": BudgetAwareRouter,
    "pow2": PowerOfTwoRouter,
    "round_robin": RoundRobinRouter,
}


def router_import_path(name: str) -> str:
    cls = ROUTERS[name]
    return f"{cls.__module__}:{cls.__name__}"
