"""What one app instance holds while it serves (``app.state.core``); no module-level globals.

The engine and scheduler appear once the background loader has finished; until then (and while
draining) ``ready`` is False and inference routes answer 503.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from app.api.metrics import Metrics
from app.engine.types import EngineProtocol
from app.settings import Settings

if TYPE_CHECKING:
    from app.scheduler import DepthScheduler


@dataclass
class AppState:
    settings: Settings
    metrics: Metrics
    engine: EngineProtocol | None = None  # app.engine.Engine, or a test double
    scheduler: DepthScheduler | None = None
    model_id: str = ""
    profile_source: str = ""  # "measured" or "cache"
    ready: bool = False
    draining: bool = False
    drain_deadline: float | None = None  # time.monotonic() after which stragglers are cancelled
    load_error: str | None = None
    inflight: int = 0  # admitted generation requests not yet finished
    created: int = field(default_factory=lambda: int(time.time()))
    # the Ray Serve replica serving this app (``sortedserve.replica``); None outside Ray
    replica: str | None = None
    # called when loading fails, so that the server process can exit (set by serve_cli)
    on_fatal: Callable[[str], None] | None = None

    @property
    def capacity(self) -> int:
        """Admitted requests allowed at once: the batch slots plus the bounded queue."""
        slots = self.engine.stats().max_slots if self.engine is not None else 0
        return slots + self.settings.max_queue
