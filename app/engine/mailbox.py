"""The one place where the asyncio side and the engine's worker thread meet.

Callers submit requests and cancel them; the worker takes what arrived. Everything here is guarded
by one condition variable; nothing else in the engine is shared between threads.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from app.engine.request_state import RequestState
from app.engine.types import EngineClosedError


@dataclass
class Mail:
    arrivals: list[RequestState]
    cancels: list[str]
    stopping: bool


class Mailbox:
    def __init__(self) -> None:
        self.cv = threading.Condition()
        self._arrivals: list[RequestState] = []
        self._cancels: list[str] = []
        self._live: set[str] = set()  # request ids submitted and not finished
        self.closing = False
        self._stop = False

    def submit(self, state: RequestState) -> None:
        with self.cv:
            if self.closing:
                raise EngineClosedError("the engine is shutting down")
            if state.request_id in self._live:
                raise ValueError(f"request id {state.request_id!r} is already in use")
            self._live.add(state.request_id)
            self._arrivals.append(state)
            self.cv.notify_all()

    def cancel(self, request_id: str) -> None:
        with self.cv:
            self._cancels.append(request_id)
            self.cv.notify_all()

    def take(self, busy: bool) -> Mail:
        """What arrived since the last call; waits for something unless the worker is busy."""
        with self.cv:
            self.cv.wait_for(lambda: busy or self._stop or self._arrivals or self._cancels)
            mail = Mail(self._arrivals, self._cancels, self._stop)
            self._arrivals, self._cancels = [], []
            return mail

    def done(self, request_id: str) -> None:
        """A request sent its final event."""
        with self.cv:
            self._live.discard(request_id)
            if not self._live:
                self.cv.notify_all()

    @property
    def live(self) -> int:
        return len(self._live)

    @property
    def arrived(self) -> int:
        return len(self._arrivals)

    def close(self, timeout_s: float | None) -> None:
        """Refuse new requests; wait up to ``timeout_s`` for the live ones to finish (not at all
        for None), then tell the worker to stop."""
        with self.cv:
            self.closing = True
            if timeout_s is not None:
                self.cv.wait_for(lambda: not self._live, timeout=max(0.0, timeout_s))
            self._stop = True
            self.cv.notify_all()
