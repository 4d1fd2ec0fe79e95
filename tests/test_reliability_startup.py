"""Bad start-up inputs: ``python -m app serve`` on a checkpoint it cannot serve must say why in one
clear line on stderr (no traceback) and exit non-zero, promptly.

The start-ups run in parallel (one module fixture), since the corrupted-weights cases import torch
and begin to load before they fail.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from app.api.launcher import free_port
from tests.reliability_support import REPO_ROOT, record_figures

pytestmark = pytest.mark.integration

TIMEOUT_S = 180.0


def _edit_json(path: Path, edit: Callable[[dict], None]) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _overwrite_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[8:72] = bytes(range(192, 256))  # inside the JSON header: now not even UTF-8
    path.write_bytes(bytes(data))


def _no_config(folder: Path) -> None:
    (folder / "config.json").unlink()


def _config_not_json(folder: Path) -> None:
    (folder / "config.json").write_text("{not json")


def _gpt2(folder: Path) -> None:
    _edit_json(folder / "config.json", lambda c: c.update(model_type="gpt2"))


def _exits_beyond(folder: Path) -> None:
    _edit_json(folder / "sorted.json", lambda m: m.update(exits=[2, 4, 8]))


def _sorted_malformed(folder: Path) -> None:
    _edit_json(folder / "sorted.json", lambda m: m.pop("exits"))


# name → (how to break a copy of the tiny checkpoint, words the error line must contain)
CASES: dict[str, tuple[Callable[[Path], None] | None, tuple[str, ...]]] = {
    "missing-folder": (None, ("does not exist",)),
    "no-config": (_no_config, ("config.json",)),
    "config-not-json": (_config_not_json, ("config.json", "not valid JSON")),
    "unsupported-architecture": (_gpt2, ("gpt2", "not supported")),
    "exits-beyond-the-model": (_exits_beyond, ("sorted.json", "[8]")),
    "sorted-json-malformed": (_sorted_malformed, ("sorted.json",)),
    "truncated-weights": (
        lambda f: _truncate(f / "model.safetensors"),
        ("model.safetensors",),
    ),
    "overwritten-weights-header": (
        lambda f: _overwrite_header(f / "model.safetensors"),
        ("model.safetensors",),
    ),
}


@dataclass
class StartUp:
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float


def serve(model: Path, cache: Path) -> StartUp:
    env = {
        **os.environ,
        "SORTEDSERVE_PROFILE_CACHE_DIR": str(cache),
        "SORTEDSERVE_DEVICE": "cpu",
        "SORTEDSERVE_TORCH_THREADS": "1",
        "SORTEDSERVE_API_KEY": "",
    }
    cmd = [sys.executable, "-m", "app", "serve", "--model", str(model)]
    cmd += ["--host", "127.0.0.1", "--port", str(free_port())]
    started = time.monotonic()
    proc = subprocess.Popen(
        cmd,
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its own process group, killed as a whole on a timeout
    )
    try:
        out, err = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        return StartUp(None, out.decode(errors="replace"), err.decode(errors="replace"), TIMEOUT_S)
    elapsed = time.monotonic() - started
    return StartUp(
        proc.returncode, out.decode(errors="replace"), err.decode(errors="replace"), elapsed
    )


@pytest.fixture(scope="module")
def start_ups(
    tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, StartUp]:
    root = tmp_path_factory.mktemp("bad-checkpoints")
    folders = {}
    for name, (breaker, _) in CASES.items():
        folder = root / name
        if breaker is not None:
            shutil.copytree(tiny_checkpoint, folder)
            breaker(folder)
        folders[name] = folder
    cache = root / "profile-cache"
    with ThreadPoolExecutor(len(CASES)) as pool:
        futures = {name: pool.submit(serve, folder, cache) for name, folder in folders.items()}
        results = {name: f.result() for name, f in futures.items()}
    record_figures(
        "bad_startup",
        {
            name: {
                "exit_code": r.returncode,
                "seconds": round(r.seconds, 2),
                "error": [
                    line.split(" ", 3)[-1].replace(str(root), "<tmp>")
                    for line in error_lines(r.stderr)
                ],
            }
            for name, r in results.items()
        },
    )
    return results


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if " ERROR " in line or " CRITICAL " in line]


@pytest.mark.parametrize("name", list(CASES))
def test_bad_checkpoint_is_one_clear_line_and_a_nonzero_exit(
    start_ups: dict[str, StartUp], name: str
) -> None:
    r = start_ups[name]
    output = r.stdout + r.stderr
    assert r.returncode is not None, f"still running after {TIMEOUT_S} s:\n{output[-2000:]}"
    assert r.returncode != 0, output[-2000:]
    assert "Traceback" not in output, output[-4000:]
    lines = error_lines(r.stderr)
    assert len(lines) == 1, r.stderr[-4000:]
    message = lines[0].split(": ", 1)[-1]
    assert "cannot serve" in lines[0], lines[0]
    for words in CASES[name][1]:
        assert words in message, (words, message)
