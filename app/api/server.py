"""uvicorn's server with a graceful drain: the first SIGTERM/SIGINT stops new work, waits for the
admitted requests (up to ``drain_timeout_s``), then stops; the exit status stays 0."""

from __future__ import annotations

import logging
import threading
import time
from types import FrameType

import uvicorn

from app.api.lifespan import drained, start_draining
from app.api.state import AppState

logger = logging.getLogger(__name__)


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state: AppState) -> None:
        super().__init__(config)
        self.state = state
        self._drain_started = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Not calling super(): uvicorn would re-raise the signal after shutdown (exit status 143),
        # and sse-starlette's patched handler would cut every open stream at once.
        if self._drain_started:
            logger.warning("second signal: stopping now")
            self.should_exit = True
            self.force_exit = True
            return
        self._drain_started = True
        start_draining(self.state)
        threading.Thread(target=self._stop_when_drained, name="drain", daemon=True).start()

    def _stop_when_drained(self) -> None:
        while not drained(self.state):
            time.sleep(0.05)
        if self.state.inflight > 0:
            logger.warning("drain timeout: stopping with %d request(s) left", self.state.inflight)
        self.should_exit = True
