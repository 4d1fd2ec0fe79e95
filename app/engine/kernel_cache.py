"""The on-disk and in-memory cache of :func:`app.engine.kernels.choose_kernel`'s timings.

The key names everything a timing depends on: format, device and its model (CPU name and flags, or
the CUDA device), torch, threads, dtype and the layer shapes. A mismatch or an unreadable file only
means timing again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from app.engine.kernels import KernelChoice

logger = logging.getLogger(__name__)

CACHE_VERSION = 1

_MEMORY: dict[str, KernelChoice] = {}


def cache_key(
    fmt: str,
    device: torch.device,
    dtype: torch.dtype,
    shapes: Sequence[tuple[int, int]],
    num_layers: int,
) -> dict[str, Any]:
    return {
        "version": CACHE_VERSION,
        "weights": fmt,
        "device": str(device),
        "machine": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_id(),
        "platform": platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "dtype": str(dtype),
        "shapes": [list(s) for s in shapes],
        "num_layers": num_layers,
    }


def _cpu_id() -> str:
    """The CPU model and its flags (what the kernels' speed depends on), from /proc/cpuinfo."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    name = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "")
    flags = next((ln.split(":", 1)[1] for ln in lines if ln.startswith(("flags", "Features"))), "")
    return f"{name} {hashlib.sha256(flags.encode()).hexdigest()[:12]}"


def _digest(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]


def load_choice(cache_dir: Path | None, key: dict[str, Any]) -> KernelChoice | None:
    digest = _digest(key)
    if digest in _MEMORY:
        return _MEMORY[digest]
    if cache_dir is None:
        return None
    path = cache_dir / f"kernels-{digest}.json"
    try:
        data = json.loads(path.read_text())
        if data.get("key") != key:
            return None
        from app.engine.kernels import KernelChoice

        choice = KernelChoice(**{**data["choice"], "source": "cache"})
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        logger.warning("ignoring the unreadable kernel cache %s: %s", path, exc)
        return None
    _MEMORY[digest] = choice
    return choice


def save_choice(cache_dir: Path | None, key: dict[str, Any], choice: KernelChoice) -> None:
    digest = _digest(key)
    _MEMORY[digest] = type(choice)(**{**choice.to_json(), "source": "cache"})
    if cache_dir is None:
        return
    path = cache_dir / f"kernels-{digest}.json"
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"key": key, "choice": choice.to_json()}, indent=1) + "\n")
        tmp.replace(path)
    except OSError as exc:
        logger.warning("could not write the kernel cache in %s: %s", cache_dir, exc)
