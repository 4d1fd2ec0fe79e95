"""Hands engine events to the asyncio side from a small relay thread.

Waking an event loop (``call_soon_threadsafe`` writes to its self-pipe) releases the GIL, and the
woken loop usually takes it before the writer gets it back. Done from the engine thread, that
stalls the decode loop for as long as the event loop runs Python, once per step; on a busy CPU
this was the largest single cost of a batch-1 step. So the engine only puts a batch on a
``SimpleQueue`` (no GIL release, no syscall on the engine's side), and this thread does the
waking, overlapping with the engine's next step. Batches that pile up while the relay waits are
merged, which wakes each loop once for all of them; per request, events keep their order.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

Batch = dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, Any]]]


def deliver(items: list[tuple[asyncio.Queue, Any]]) -> None:
    """Runs in the event loop: put each event into its request's queue."""
    for q, event in items:
        q.put_nowait(event)


class EventRelay:
    def __init__(self, name: str = "sortedserve-events") -> None:
        self._queue: queue.SimpleQueue[Batch | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def post(self, batch: Batch) -> None:
        if batch:
            self._queue.put(batch)

    def close(self, timeout_s: float = 5.0) -> None:
        """Deliver what is queued, then stop."""
        self._queue.put(None)
        self._thread.join(timeout_s)

    def _run(self) -> None:
        closing = False
        while not closing:
            merged: Batch = {}
            batch = self._queue.get()
            while True:
                if batch is None:
                    closing = True
                else:
                    for loop, items in batch.items():
                        merged.setdefault(loop, []).extend(items)
                try:
                    batch = self._queue.get_nowait()
                except queue.Empty:
                    break
            for loop, items in merged.items():
                _call(loop, deliver, items)


def _call(loop: asyncio.AbstractEventLoop, fn: Callable[..., Any], *args: Any) -> None:
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # the caller's event loop is closed: nobody is listening
        logger.debug("dropped events for a closed event loop")
