"""One OpenMP thread team at a time: free a thread's helper threads when it hands torch work on.

torch's CPU kernels run their parallel regions on OpenMP (GNU libgomp in the Linux wheels). Every
thread that runs one gets a team of helper threads of its own, kept for the life of the thread.
libgomp keeps its helpers spinning between regions, which is what makes a decode step's ~150
short parallel regions cheap, but only while it manages no more threads than there are CPUs;
beyond that it spins ~100 times and then sleeps, and each region pays a futex wake-up. So once the
engine's worker thread decodes while the thread that loaded the model (or ran HF ``generate``)
still holds its team, every op is slower: measured on the 2-core machine, one int4 decode step of
Sorted SmolLM2 took 27 ms in the worker against 12 ms in the thread that loaded it, and 11.8 ms in
the worker once the loading thread's team was freed (``python -m app bench step`` times the step
in the loading thread; docs/performance.md).

:func:`release_thread_pool` frees the calling thread's team through OpenMP 5.0's
``omp_pause_resource_all(omp_pause_hard)``; libgomp implements it per thread (the team comes back
at that thread's next parallel region). The engine calls it when a thread is done with torch for a
while: the loading thread in ``Engine.start`` and after ``measure_profile``, the worker when it
goes idle. With any other OpenMP runtime (Intel's, LLVM's: there a hard pause stops every thread's
team) it does nothing.
"""

from __future__ import annotations

import ctypes
import functools
import logging
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger(__name__)

OMP_PAUSE_HARD = 2


@functools.cache
def _pause() -> Callable[[int], int] | None:
    """libgomp's ``omp_pause_resource_all``, if torch runs on libgomp here."""
    import torch  # noqa: F401  (loads the OpenMP runtime torch was built with)

    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:  # not Linux: nothing to do
        return None
    paths = {line.split()[-1] for line in maps.splitlines() if "/libgomp" in line}
    if len(paths) != 1:
        logger.debug("OpenMP runtime not found as one libgomp (%s): teams are left alone", paths)
        return None
    try:
        pause = ctypes.CDLL(paths.pop()).omp_pause_resource_all
    except (OSError, AttributeError) as exc:  # a libgomp older than OpenMP 5.0 (GCC 9)
        logger.debug("libgomp has no omp_pause_resource_all (%s)", exc)
        return None
    pause.argtypes = [ctypes.c_int]
    pause.restype = ctypes.c_int
    return pause


def release_thread_pool() -> bool:
    """Free the calling thread's OpenMP helper threads; False where that is not possible here.

    Call it only between parallel regions (never from inside a torch op)."""
    pause = _pause()
    return pause is not None and pause(OMP_PAUSE_HARD) == 0
