"""Which replica should serve a request: the budget-aware ranking (pure Python, no Ray).

For each replica with a published :class:`~app.ray_serve.picture.LoadPicture`, the request's
prospect is what that replica's depth scheduler would give it: the deepest trained exit whose
prediction fits ``budget_ms × headroom`` (else the shallowest, flagged as not fitting), with its
predicted finish time. Requests the router sent after the picture was taken count as extra rows.

- With a budget: replicas where it fits first, then the deeper exit, then the earlier finish.
- With ``exit_layer``: the earlier predicted finish at that exit.
- Without either: the least-loaded replica (admitted requests, plus the unseen ones), then the
  earlier finish at full depth.

Replicas without a picture yet, or not ready, or draining, come last (least unseen load first).
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass

from app.ray_serve.picture import LoadPicture


@dataclass(frozen=True)
class RequestShape:
    """What the router knows of a request before it runs."""

    prompt_tokens: int
    max_new_tokens: int
    budget_ms: float | None = None
    exit_layer: int | None = None

    def to_dict(self) -> dict[str, float | int | None]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "max_new_tokens": self.max_new_tokens,
            "budget_ms": self.budget_ms,
            "exit_layer": self.exit_layer,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, object] | None) -> RequestShape | None:
        if not data:
            return None
        try:
            budget = data.get("budget_ms")
            exit_layer = data.get("exit_layer")
            return cls(
                prompt_tokens=int(data["prompt_tokens"]),  # type: ignore[call-overload]
                max_new_tokens=int(data["max_new_tokens"]),  # type: ignore[call-overload]
                budget_ms=None if budget is None else float(budget),  # type: ignore[arg-type]
                exit_layer=None if exit_layer is None else int(exit_layer),  # type: ignore[call-overload]
            )
        except (KeyError, TypeError, ValueError):
            return None


@dataclass(frozen=True)
class Prospect:
    replica: str
    exit_layer: int
    predicted_ms: float
    fits: bool  # within budget × headroom (True without a budget)
    load: int  # admitted requests plus the ones sent since the picture


def prospect(picture: LoadPicture, shape: RequestShape, extra_rows: int = 0) -> Prospect:
    """What ``picture``'s replica would give ``shape`` now, ``extra_rows`` requests later."""
    load = picture.load + extra_rows

    def predict(k: int) -> float:
        return picture.predict_ms(k, shape.prompt_tokens, shape.max_new_tokens, extra_rows)

    if shape.exit_layer is not None and shape.exit_layer in picture.exits:
        k = shape.exit_layer
        return Prospect(picture.replica, k, predict(k), True, load)
    if shape.budget_ms is None:
        k = picture.exits[-1]
        return Prospect(picture.replica, k, predict(k), True, load)
    target = shape.budget_ms * picture.headroom
    for k in reversed(picture.exits):
        predicted = predict(k)
        if predicted <= target:
            return Prospect(picture.replica, k, predicted, True, load)
    k = picture.exits[0]
    return Prospect(picture.replica, k, predict(k), False, load)


def _key(p: Prospect, shape: RequestShape) -> tuple[float, ...]:
    if shape.exit_layer is not None:
        return (p.predicted_ms, p.load)
    if shape.budget_ms is None:
        return (p.load, p.predicted_ms)
    return (0 if p.fits else 1, -p.exit_layer, p.predicted_ms)


def rank(
    pictures: Mapping[str, LoadPicture | None],
    shape: RequestShape | None,
    extra_rows: Mapping[str, int] | None = None,
    rng: random.Random | None = None,
) -> list[str]:
    """Replica ids, best first. ``pictures`` maps every candidate to its picture (or ``None``);
    ``extra_rows`` counts the requests sent to each since its picture was taken. Exact ties
    (idle replicas) are broken at random with ``rng`` (by id without one)."""
    extra = extra_rows or {}
    known: list[tuple[tuple[float, ...], float, str]] = []
    unknown: list[tuple[int, float, str]] = []
    for replica_id, picture in pictures.items():
        tie = rng.random() if rng is not None else 0.0
        usable = picture is not None and picture.ready and not picture.draining
        if picture is None or not usable or shape is None:
            load = (picture.load if picture is not None else 0) + extra.get(replica_id, 0)
            shunned = picture is not None and not usable  # loading or draining: last resort
            unknown.append((load + (10**6 if shunned else 0), tie, replica_id))
            continue
        p = prospect(picture, shape, extra.get(replica_id, 0))
        known.append((_rounded(_key(p, shape)), tie, replica_id))
    known.sort()
    unknown.sort()
    return [r for *_, r in known] + [r for *_, r in unknown]


def _rounded(key: tuple[float, ...]) -> tuple[float, ...]:
    """Finish times within 0.1 ms are a tie (the pictures' noise), for the random break."""
    return tuple(round(x, 1) for x in key)


def explain(
    pictures: Mapping[str, LoadPicture | None],
    shape: RequestShape,
    extra_rows: Mapping[str, int] | None = None,
) -> dict[str, Prospect]:
    """Each known replica's prospect for ``shape`` (logs, tests, benchmarks)."""
    extra = extra_rows or {}
    return {
        r: prospect(p, shape, extra.get(r, 0))
        for r, p in pictures.items()
        if p is not None and p.ready and not p.draining
    }
