"""Start ``python -m app serve-ray`` in a subprocess and wait until ``/ready`` (tests, benchmarks).

Like :class:`app.api.launcher.ServerProcess` (a black box spoken to over HTTP, stopped with
SIGTERM), for the Ray Serve application: the process starts a local Ray cluster, and stopping it
stops the application and the cluster.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import httpx

from app.api.launcher import REPO_ROOT, ServerError, ServerProcess


class RayServerProcess(ServerProcess):
    def __init__(
        self,
        model: str | Path,
        log_path: str | Path,
        replicas: int = 2,
        env: Mapping[str, str] | None = None,
        args: Sequence[str] = (),
        port: int | None = None,
    ) -> None:
        super().__init__(model, log_path, env=env, args=args, port=port)
        self.replicas = replicas

    def start(self, timeout_s: float = 300.0) -> RayServerProcess:
        cmd = [sys.executable, "-m", "app", "serve-ray", "--model", str(self.model)]
        cmd += ["--replicas", str(self.replicas), "--host", "127.0.0.1", "--port", str(self.port)]
        cmd += self.args
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                cmd, cwd=REPO_ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerError(f"serve-ray exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if httpx.get(f"{self.url}/ready", timeout=10).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise ServerError(f"serve-ray was not ready within {timeout_s:.0f} s:\n{self.tail()}")

    def stop(self, timeout_s: float = 90.0) -> int | None:
        return super().stop(timeout_s)
