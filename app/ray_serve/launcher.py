"""Start ``python -m app serve-ray`` in a subprocess and wait until ``/ready`` (tests, benchmarks).

Like :class:`app.api.launcher.ServerProcess` (a black box spoken to over HTTP, stopped with
SIGTERM), for the Ray Serve application: the process starts a local Ray cluster, and stopping it
stops the application and the cluster.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from app.api.launcher import ServerProcess


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

    name = "serve-ray"
    ready_timeout_s = 300.0
    probe_timeout_s = 10.0

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "app", "serve-ray", "--model", str(self.model)]
        cmd += ["--replicas", str(self.replicas), "--host", "127.0.0.1", "--port", str(self.port)]
        return [*cmd, *self.args]

    def stop(self, timeout_s: float = 90.0) -> int | None:
        return super().stop(timeout_s)
