"""Engine configuration: the knobs the service passes in, and their resolution against the hardware.

This module imports torch only inside :func:`resolve_device`, so the API layer can build an
``EngineConfig`` from ``Settings`` without paying for the import.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

logger = logging.getLogger(__name__)

DTYPES = ("float32", "bfloat16", "float16")
WEIGHTS = ("auto", "float32", "bfloat16", "int8", "int4")  # see app.engine.kernels


@dataclass(frozen=True)
class EngineConfig:
    """How the engine runs. ``auto`` picks CUDA (bfloat16) when present, else CPU (float32)."""

    device: str = "auto"  # auto, cpu, cuda, cuda:N
    dtype: str = "auto"  # auto, float32, bfloat16, float16
    max_slots: int = 16  # KV-cache slots: requests decoding at once
    max_seq_len: int | None = None  # per-request context (prompt + new); None: min(model, 2048)
    torch_threads: int | None = None  # CPU threads for torch; None leaves torch's default
    weights: str = "auto"  # linear weights' format; auto: the dtype's (see app.engine.kernels)
    prefill_chunk: int = 256  # most prompt tokens per loop iteration while others decode; 0: off
    prefill_stall: float = 1.5  # a chunk may take this many decode steps' time (chunking.py)
    kernel_cache_dir: str | None = None  # where the weight-kernel choice is cached; None: memory

    def __post_init__(self) -> None:
        if self.max_slots < 1:
            raise ValueError(f"max_slots must be at least 1, got {self.max_slots}")
        if self.max_seq_len is not None and self.max_seq_len < 2:
            raise ValueError(f"max_seq_len must be at least 2, got {self.max_seq_len}")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            allowed = ", ".join(DTYPES)
            raise ValueError(f"dtype must be auto or one of {allowed}, got {self.dtype!r}")
        if self.prefill_chunk < 0:
            raise ValueError(f"prefill_chunk must be 0 (off) or more, got {self.prefill_chunk}")
        if not self.prefill_stall > 0:
            raise ValueError(f"prefill_stall must be > 0, got {self.prefill_stall}")
        if self.weights not in WEIGHTS:
            allowed = ", ".join(WEIGHTS)
            raise ValueError(f"weights must be one of {allowed}, got {self.weights!r}")
        if self.torch_threads is not None and self.torch_threads < 1:
            raise ValueError(f"torch_threads must be at least 1, got {self.torch_threads}")


DEFAULT_MAX_SEQ_LEN = 2048


def resolve_device(config: EngineConfig) -> tuple[str, str]:
    """The concrete ``(device, dtype)`` names for ``config`` on this machine."""
    import torch

    device = config.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for but CUDA is not available")
    if not (device == "cpu" or device.startswith("cuda")):
        raise ValueError(f"device must be auto, cpu or cuda[:N], got {device!r}")
    dtype = config.dtype
    if dtype == "auto":
        dtype = "float32" if device == "cpu" else "bfloat16"
    return device, dtype
