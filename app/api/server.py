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

_FAREWELL_S = 3.0  # after the drain timeout, how long cancelled requests get to send their end


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
            logger.warning("drain timeout: cancelling %d request(s)", self.state.inflight)
            self._cancel_stragglers()
        self.should_exit = True

    def _cancel_stragglers(self) -> None:
        """Cancel what is left in the engine and let the final events reach the clients.

        Without this, setting ``should_exit`` cuts open streams mid-body (sse-starlette cancels
        them when it sees the flag): a client would get a broken connection instead of a ``done``
        event with ``finish_reason: cancelled`` (``abort`` on the OpenAI routes).
        """
        if self.state.engine is not None:
            self.state.engine.shutdown(0.0)  # every request left ends now, as cancelled
        deadline = time.monotonic() + _FAREWELL_S
        while self.state.inflight > 0 and time.monotonic() < deadline:
            time.sleep(0.05)
