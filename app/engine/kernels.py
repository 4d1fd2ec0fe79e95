"""Which library kernel serves each weight format here: checked, then timed, at start-up.

A weight format (``--weights``) is how the linear layers' weights are stored: ``float32``,
``bfloat16``, ``int8`` (symmetric, one scale per output row) or ``int4`` (asymmetric, one scale and
offset per group of 32 inputs, as GGUF's Q4_1). Activations keep the model's dtype. Each format has
candidate kernels (:mod:`app.engine.linear`): torch's own packed weight-only ops, fed bfloat16 or
the model's activations. Which of them is fast depends on the CPU (AVX-512 BF16 or not, ...) and
the torch build, so nothing is assumed:

1. each candidate runs once on a small matrix and must match ``x @ dequantized(W).T``; one that
   raises or disagrees is unusable (and says why);
2. where more than one is usable, each is timed at one row over a set of the model's own layer
   shapes large enough to leave the CPU caches (as a decode step does), with float32 beside them;
   the fastest serves the format.

The result is cached in memory and, given a folder, on disk next to the latency profiles, keyed by
everything it depends on. A format without a usable kernel is an error naming what is missing and
which formats work here: never a silent fallback.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from app.engine.kernel_cache import cache_key, load_choice, save_choice
from app.engine.linear import (
    Linear,
    cast_linear,
    int4_linear,
    int8_linear,
    onednn_cast_linear,
)

logger = logging.getLogger(__name__)

WEIGHT_FORMATS = ("float32", "bfloat16", "int8", "int4")
WORKING_SET_BYTES = 64 << 20  # timed weights per candidate, in its own format: beyond the caches
TIME_BUDGET_S = 0.25  # per candidate, after one untimed pass
BYTES_PER_WEIGHT = {"float32": 4.0, "bfloat16": 2.0, "float16": 2.0, "int8": 1.0, "int4": 0.625}

# (weight [out, in] on the device, bias, keep the dequantized weight, input scale) -> Linear; the
# layer computes (x * in_scale) @ weight.T: float formats fold the scale into the weight, int
# formats quantize the weight without it (a norm weight would distort the groups' ranges)
Make = Callable[[torch.Tensor, torch.Tensor | None, bool, torch.Tensor | None], Linear]


class WeightFormatError(ValueError):
    """A weight format this device or torch build cannot run (one sentence, for the CLI)."""


@dataclass(frozen=True)
class Candidate:
    name: str  # the op and the dtype it is fed, e.g. "_weight_int4pack_mm_for_cpu/bfloat16"
    make: Make


@dataclass(frozen=True)
class KernelChoice:
    weights: str
    kernel: str
    source: str  # "measured", "cache" or "only" (a single usable candidate: nothing to time)
    ms_per_layer: dict[str, float] = field(default_factory=dict)  # candidates and float32, 1 row
    unusable: dict[str, str] = field(default_factory=dict)  # candidate -> why

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def resolve_format(weights: str, dtype: torch.dtype) -> str:
    """``auto`` stores the weights in the activation dtype (the behaviour before formats)."""
    if weights == "auto":
        return str(dtype).removeprefix("torch.")
    if weights not in WEIGHT_FORMATS:
        raise WeightFormatError(
            f"--weights must be auto or one of {', '.join(WEIGHT_FORMATS)}, got {weights!r}"
        )
    return weights


def candidates(fmt: str, device: torch.device, dtype: torch.dtype, pack: bool) -> list[Candidate]:
    """The kernels that could serve ``fmt`` for a model computing in ``dtype`` on ``device``."""
    native = str(dtype).removeprefix("torch.")
    if fmt == native:
        return [
            Candidate(f"mm/{fmt}", lambda w, b, keep, s: Linear(_fold(w, s).to(dtype), b, pack))
        ]
    if fmt in ("float32", "bfloat16"):
        store = getattr(torch, fmt)
        found = [
            Candidate(f"mm/{fmt}", lambda w, b, keep, s: cast_linear(_fold(w, s), b, store, keep))
        ]
        if device.type == "cpu" and torch.backends.mkldnn.is_available():
            found.append(
                Candidate(
                    f"mkldnn._linear_pointwise/{fmt}",
                    lambda w, b, keep, s: onednn_cast_linear(_fold(w, s), b, store, keep),
                )
            )
        return found
    if device.type != "cpu":  # torch's packed int8/int4 weight-only ops used here are CPU ops
        return []
    acts = list(dict.fromkeys([torch.bfloat16, dtype]))
    build = int8_linear if fmt == "int8" else int4_linear
    op = "_weight_int8pack_mm" if fmt == "int8" else "_weight_int4pack_mm_for_cpu"
    return [
        Candidate(
            f"{op}/{str(act).removeprefix('torch.')}",
            lambda w, b, keep, s, act=act: build(w, b, act, keep, s),
        )
        for act in acts
    ]


def _fold(weight: torch.Tensor, in_scale: torch.Tensor | None) -> torch.Tensor:
    return weight if in_scale is None else weight * in_scale


def check(candidate: Candidate, device: torch.device, dtype: torch.dtype) -> str | None:
    """None if ``candidate`` runs here and matches its dequantized weight, else why not."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(48, 64, generator=generator).to(device)
    x = torch.randn(3, 64, generator=generator).to(device, dtype)
    try:
        linear = candidate.make(weight, None, True, None)
        got = linear(x).float()
        want = x.float() @ linear.dequantized().to(device).t()
        error = (got - want).abs().max().item() / max(want.abs().max().item(), 1e-6)
    except Exception as exc:  # a build or device without the op: say which op and what it said
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return f"{candidate.name} fails here ({first})"
    if not error <= 0.03:  # bfloat16 activations round to ~0.4 %; NaN fails too
        return (
            f"{candidate.name} disagrees with its dequantized weight (relative error {error:.3g})"
        )
    return None


def choose_kernel(
    fmt: str,
    device: torch.device,
    dtype: torch.dtype,
    shapes: Sequence[tuple[int, int]],
    num_layers: int,
    pack: bool,
    cache_dir: Path | None = None,
) -> tuple[KernelChoice, Candidate]:
    """The kernel for ``fmt``: the fastest usable candidate at one row over ``shapes`` (one
    layer's ``(out, in)`` weights). Raises :class:`WeightFormatError` when none is usable."""
    options = candidates(fmt, device, dtype, pack)
    unusable = {c.name: why for c in options if (why := check(c, device, dtype)) is not None}
    usable = [c for c in options if c.name not in unusable]
    if not usable:
        raise WeightFormatError(_no_kernel(fmt, device, dtype, unusable))
    if len(usable) == 1:
        return KernelChoice(fmt, usable[0].name, "only", unusable=unusable), usable[0]
    key = cache_key(fmt, device, dtype, shapes, num_layers)
    cached = load_choice(cache_dir, key)
    if cached is not None and cached.kernel in {c.name for c in usable}:
        return cached, next(c for c in usable if c.name == cached.kernel)
    reference = [] if fmt == "float32" else candidates("float32", device, dtype, pack)[:1]
    times = {
        c.name: time_per_layer(c, device, dtype, shapes, num_layers, fmt)
        for c in [*usable, *reference]
    }
    best = min(usable, key=lambda c: times[c.name])
    choice = KernelChoice(fmt, best.name, "measured", times, unusable)
    logger.info(
        "weights %s: %s (ms per layer at one row: %s)",
        fmt,
        best.name,
        ", ".join(f"{name} {ms:.3f}" for name, ms in times.items()),
    )
    save_choice(cache_dir, key, choice)
    return choice, best


def time_per_layer(
    candidate: Candidate,
    device: torch.device,
    dtype: torch.dtype,
    shapes: Sequence[tuple[int, int]],
    num_layers: int,
    fmt: str,
) -> float:
    """Median ms for one row through one layer's weights, over enough layer copies to leave the
    caches (random weights of the model's shapes)."""
    generator = torch.Generator().manual_seed(0)
    per_layer = sum(o * i for o, i in shapes) * BYTES_PER_WEIGHT.get(fmt, 4.0)
    copies = max(1, min(num_layers, math.ceil(WORKING_SET_BYTES / max(per_layer, 1))))
    weights = [(torch.randn(o, i, generator=generator) * 0.02).to(device) for o, i in shapes]
    layers = [[candidate.make(w, None, False, None) for w in weights] for _ in range(copies)]
    inputs = [torch.randn(1, i, generator=generator).to(device, dtype) for _, i in shapes]
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def one_pass() -> float:
        start = time.perf_counter()
        for layer in layers:
            for linear, x in zip(layer, inputs, strict=True):
                linear(x)
        synchronize()
        return time.perf_counter() - start

    with torch.inference_mode():
        one_pass()
        samples: list[float] = []
        deadline = time.perf_counter() + TIME_BUDGET_S
        while len(samples) < 3 or time.perf_counter() < deadline:
            samples.append(one_pass())
    return statistics.median(samples) * 1000 / copies


def usable_formats(device: torch.device, dtype: torch.dtype) -> list[str]:
    """The formats with at least one kernel that passes :func:`check` here."""
    return [
        fmt
        for fmt in WEIGHT_FORMATS
        if any(check(c, device, dtype) is None for c in candidates(fmt, device, dtype, False))
    ]


def _no_kernel(fmt: str, device: torch.device, dtype: torch.dtype, why: dict[str, str]) -> str:
    missing = "; ".join(why.values()) or (
        f"no {fmt} kernel is offered for {device.type} (the packed int8/int4 ops used are torch's "
        "CPU ones)"
    )
    works = ", ".join(usable_formats(device, dtype)) or "none"
    return (
        f"--weights {fmt} cannot run on {device.type}: {missing}. Formats that work here: {works}"
    )
