"""The dynamic-depth inference engine: load a checkpoint once, serve requests at any exit.

``Engine`` and ``EngineConfig`` are the public entry points; the plain-data types that cross the
boundary live in :mod:`app.engine.types`.
"""

from app.engine.config import EngineConfig
from app.engine.engine import Engine, EngineClosedError
from app.engine.types import (
    Downgrade,
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
)

__all__ = [
    "Downgrade",
    "Engine",
    "EngineClosedError",
    "EngineConfig",
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
]
