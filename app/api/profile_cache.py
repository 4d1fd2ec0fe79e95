"""A JSON cache of measured latency profiles, so that a restart on the same machine is fast.

The key names everything the numbers depend on: the checkpoint (path, and size and mtime of its
weight files), the device and dtype, the CPU threads, the batch sizes and the slot count. A key
mismatch, a corrupt file or an unwritable folder only means measuring again (with a warning).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from app.scheduler import LatencyProfile, ProfileError

logger = logging.getLogger(__name__)

CACHE_VERSION = 2  # 2: profiles measured at a few exits, the rest fitted


def profile_key(
    model_dir: Path,
    device: str,
    dtype: str,
    torch_threads: int | None,
    batch_sizes: tuple[int, ...],
    max_slots: int,
    depths: int = 0,
) -> dict[str, Any]:
    model_dir = model_dir.resolve()
    weights = sorted(model_dir.glob("*.safetensors")) or sorted(model_dir.glob("*.bin"))
    return {
        "version": CACHE_VERSION,
        "checkpoint": str(model_dir),
        "weights": [[w.name, w.stat().st_size, w.stat().st_mtime_ns] for w in weights],
        "device": device,
        "dtype": dtype,
        "torch_threads": torch_threads or f"default/{os.cpu_count()}",
        "batch_sizes": list(batch_sizes),
        "max_slots": max_slots,
        "profile_depths": depths,
    }


def cache_path(cache_dir: Path, key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return cache_dir / f"profile-{digest}.json"


def load_profile(cache_dir: Path, key: dict[str, Any]) -> LatencyProfile | None:
    path = cache_path(cache_dir, key)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        if data.get("key") != key:
            logger.warning("ignoring the profile cache %s: it is for other settings", path)
            return None
        return LatencyProfile.from_json(data["profile"])
    except (OSError, ValueError, KeyError, TypeError, ProfileError) as exc:
        logger.warning("ignoring the unreadable profile cache %s: %s", path, exc)
        return None


def save_profile(cache_dir: Path, key: dict[str, Any], profile: LatencyProfile) -> Path | None:
    path = cache_path(cache_dir, key)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        payload = json.dumps({"key": key, "profile": profile.to_json()}, indent=1)
        # write-then-rename: a concurrent reader never sees half a file
        with tempfile.NamedTemporaryFile("w", dir=cache_dir, suffix=".tmp", delete=False) as f:
            f.write(payload)
        os.replace(f.name, path)
        return path
    except OSError as exc:
        logger.warning("could not write the profile cache in %s: %s", cache_dir, exc)
        return None
