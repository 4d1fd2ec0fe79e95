"""Shared plumbing of the engine benchmarks: common flags, machine info, tables, JSON results."""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

DEFAULT_MODEL = Path("model_store/default")
RESULTS_DIR = Path("bench/results")
PROMPT_INSTRUCTION = "Write a short story about a little girl who finds a lost puppy in the park."


def add_engine_arguments(p: argparse.ArgumentParser, name: str, rounds: int = 3) -> None:
    p.add_argument(
        "--model",
        type=Path,
        default=DEFAULT_MODEL,
        help=f"checkpoint folder (default {DEFAULT_MODEL})",
    )
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default auto)")
    p.add_argument(
        "--dtype", default="auto", help="auto (float32 on CPU, bfloat16 on CUDA), float32, bfloat16"
    )
    p.add_argument(
        "--torch-threads",
        type=int,
        default=None,
        help="CPU threads for torch, set once for the whole process (default: torch's)",
    )
    p.add_argument(
        "--max-new-tokens", type=int, default=128, help="tokens generated per request (default 128)"
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=rounds,
        help=f"interleaved repetitions; medians are reported (default {rounds})",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=RESULTS_DIR / f"{name}.json",
        help=f"JSON results file (default {RESULTS_DIR / (name + '.json')})",
    )


def load_engine(model: Path, config: Any) -> Any:
    """The engine (in ``config.weights``), or ``None`` after logging why the checkpoint cannot be
    served (or the weight format cannot run here)."""
    from app.engine import Engine
    from app.engine.kernels import WeightFormatError
    from app.model_store import ModelStoreError

    try:
        return Engine.from_pretrained(model, config)
    except (ModelStoreError, WeightFormatError) as exc:
        logger.error("%s", exc)
        return None


def bench_prompt() -> str:
    from app.training.prompting import alpaca_prompt

    return alpaca_prompt(PROMPT_INSTRUCTION)


def machine_info(load_at_start: tuple[float, ...] | None = None) -> dict[str, Any]:
    import torch
    import transformers

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu": _cpu_name(),
        "cpu_flags": _cpu_flags(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": load_at_start,
        "load_average_at_end": load_average(),
        "git_commit": _git_commit(),
    }
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def load_average() -> tuple[float, ...] | None:
    return os.getloadavg() if hasattr(os, "getloadavg") else None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


SIMD_PREFIXES = ("avx", "amx", "fma", "f16c", "sse4", "neon", "sve")


def _cpu_flags() -> list[str]:
    """The SIMD flags that decide kernel speed (AVX2, AVX-512, AMX, ...), from /proc/cpuinfo."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = line.split(":", 1)[1].split()
                return sorted(f for f in flags if f.startswith(SIMD_PREFIXES))
    except OSError:
        pass
    return []


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def write_results(path: Path, payload: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"created": datetime.now(UTC).isoformat(timespec="seconds"), **payload}
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(path)
    return path


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    line = "  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True))
    sep = "  ".join("-" * w for w in widths)
    body = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join([line, sep, *body])


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


class Timer:
    """Wall-clock seconds and this process's CPU seconds (all threads) of a block.

    On a shared machine the CPU time is the steadier measure: it leaves out the time the process
    waited for a core (it still includes slowdowns from cache and memory contention).
    """

    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        self.cpu_start = time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start
        self.cpu_seconds = time.process_time() - self.cpu_start
