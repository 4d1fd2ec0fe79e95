"""Open an engine with its weight format applied and reported.

``Engine`` builds its model with :func:`app.engine.weights.build_model` but does not pass
``EngineConfig.weights`` to it yet, nor put the format in ``ModelInfo``. Until it does, this is how
the server and the benchmarks open an engine: the format travels to ``build_model`` in a
:class:`~app.engine.weights.WeightPlan`, and the choice it made is written into ``engine.info``.
(``resolve_device`` refuses a non-default format outside a plan, so it is never silently ignored.)
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from app.engine.config import EngineConfig


def open_engine(
    model_dir: str | Path,
    config: EngineConfig,
    step_hook: Any = None,
    kernel_cache: Path | None = None,
) -> Any:
    """``Engine.from_pretrained`` with ``config.weights``; raises ``ModelStoreError`` for a bad
    checkpoint and ``WeightFormatError`` (a ``ValueError``) for a format this machine cannot run."""
    from app.engine.engine import Engine
    from app.engine.weights import WeightPlan, weight_plan

    with weight_plan(WeightPlan(config.weights, kernel_cache)) as plan:
        engine = Engine.from_pretrained(model_dir, config, step_hook=step_hook)
    if plan.choice is not None:
        engine.info = replace(
            engine.info, weights=plan.choice.weights, weight_kernel=plan.choice.kernel
        )
    return engine
