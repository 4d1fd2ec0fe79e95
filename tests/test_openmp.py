"""``release_thread_pool`` frees the calling thread's OpenMP helper threads, and only those."""

from __future__ import annotations

import os
import threading

import pytest
import torch

from app.engine.openmp import _pause, release_thread_pool


def _threads() -> int:
    return len(os.listdir(f"/proc/{os.getpid()}/task"))


def _parallel_op() -> None:
    x = torch.randn(1 << 22)
    (x * 2.0).sum()  # above torch's grain size: a parallel region on every thread allowed


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads through /proc")
def test_release_frees_this_threads_team_and_not_the_others() -> None:
    if _pause() is None:
        pytest.skip("torch does not run on libgomp here: nothing to release")
    if (os.cpu_count() or 1) < 2:
        pytest.skip("one CPU: torch runs no helper threads to free")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # (another test may have set 1; new threads take this value)
    try:
        _check_release()
    finally:
        torch.set_num_threads(threads)


def _check_release() -> None:
    other_started, finish = threading.Event(), threading.Event()
    counts: dict[str, int] = {}

    def other() -> None:  # a second thread with a team of its own, kept throughout
        _parallel_op()
        other_started.set()
        finish.wait(30)

    def worker() -> None:
        counts["before"] = _threads()
        _parallel_op()
        counts["with team"] = _threads()
        counts["released"] = int(release_thread_pool())
        counts["after"] = _threads()
        _parallel_op()  # the team comes back on the next parallel region
        counts["again"] = _threads()

    keeper = threading.Thread(target=other)
    keeper.start()
    assert other_started.wait(30)
    thread = threading.Thread(target=worker)
    thread.start()
    thread.join(30)
    helpers = counts["with team"] - counts["before"]
    assert counts["released"] == 1 and helpers >= 1
    # exactly this thread's helpers went (the other thread's team is counted in "before")
    assert counts["after"] == counts["before"]
    assert counts["again"] == counts["with team"]
    finish.set()
    keeper.join(30)
