"""The dynamic-depth inference engine: load a checkpoint once, serve requests at any exit.

``Engine`` and ``EngineConfig`` are the public entry points; the plain-data types that cross the
boundary live in :mod:`app.engine.types`. Importing this package does not import torch: ``Engine``
is loaded on first use (PEP 562), so the API layer can use the types and the config for free.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from app.engine.config import EngineConfig
from app.engine.types import (
    Alternative,
    Downgrade,
    EngineClosedError,
    EngineProtocol,
    EngineStats,
    FinalEvent,
    GenerationRequest,
    ModelInfo,
    ProfilePoint,
    RowState,
    SamplingParams,
    StepHook,
    StepReport,
    TokenEvent,
    TokenLogprob,
)

if TYPE_CHECKING:
    from app.engine.engine import Engine

__all__ = [
    "Alternative",
    "Downgrade",
    "Engine",
    "EngineClosedError",
    "EngineConfig",
    "EngineProtocol",
    "EngineStats",
    "FinalEvent",
    "GenerationRequest",
    "ModelInfo",
    "ProfilePoint",
    "RowState",
    "SamplingParams",
    "StepHook",
    "StepReport",
    "TokenEvent",
    "TokenLogprob",
]


def __getattr__(name: str) -> Any:
    if name == "Engine":
        from app.engine.engine import Engine

        return Engine
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
