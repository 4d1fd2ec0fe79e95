"""Start ``python -m app serve`` in a subprocess and wait until it is ready (tests, benchmarks).

A black-box harness: it only speaks HTTP to the server it starts, and stops it with SIGTERM (the
server drains, then exits 0). The server's output goes to a log file whose tail is shown when the
server fails to come up.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

import httpx

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerError(RuntimeError):
    """The server did not come up (the message ends with the tail of its log)."""


class ServerProcess:
    def __init__(
        self,
        model: str | Path,
        log_path: str | Path,
        env: Mapping[str, str] | None = None,
        args: Sequence[str] = (),
        port: int | None = None,
    ) -> None:
        self.model = Path(model)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_path)
        self.env = {**os.environ, **(env or {})}
        self.args = list(args)
        self.proc: subprocess.Popen[bytes] | None = None

    name = "the server"  # in error messages
    ready_timeout_s = 180.0
    probe_timeout_s = 2.0  # one /ready probe

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "app", "serve", "--model", str(self.model)]
        return [*cmd, "--host", "127.0.0.1", "--port", str(self.port), *self.args]

    def start(self, timeout_s: float | None = None) -> ServerProcess:
        timeout_s = self.ready_timeout_s if timeout_s is None else timeout_s
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                self.command(), cwd=REPO_ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerError(f"{self.name} exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if httpx.get(f"{self.url}/ready", timeout=self.probe_timeout_s).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise ServerError(f"{self.name} was not ready within {timeout_s:.0f} s:\n{self.tail()}")

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM (a graceful drain), then SIGKILL if it does not exit in time."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            logger.warning("the server did not stop within %.0f s; killing it", timeout_s)
            self.proc.kill()
            return self.proc.wait()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def __enter__(self) -> ServerProcess:
        return self.start() if self.proc is None else self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
