"""``python -m app serve``: flags, then ``SORTEDSERVE_*`` variables, then defaults; run uvicorn.

The first SIGTERM/SIGINT drains: ``/ready`` and new requests get 503 while admitted requests
finish (up to ``--drain-timeout``), then the server stops and the process exits 0. A second signal
stops at once. A checkpoint that cannot be served is reported in one line, with exit status 1.
Heavy imports (uvicorn, the app, torch) happen inside :func:`run` so that ``--help`` is fast.
The draining itself lives in app/api/server.py.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# flag → (Settings field, type, help)
_FLAGS: dict[str, tuple[str, Any, str]] = {
    "--model": (
        "model",
        Path,
        "HF or adapter folder, .gguf file, or pkg:<dist>/<file> (default: model_store/default)",
    ),
    "--host": ("host", str, "interface to listen on (default: 0.0.0.0)"),
    "--port": ("port", int, "TCP port (default: 8000)"),
    "--device": ("device", str, "auto, cpu or cuda[:N] (default: auto)"),
    "--dtype": ("dtype", str, "auto, float32, bfloat16 or float16 (default: auto)"),
    "--threads": ("torch_threads", int, "CPU threads for torch (default: torch's choice)"),
    "--weights": (
        "weights",
        str,
        "linear weights: auto (the dtype's), float32, bfloat16, int8 or int4 (default: auto)",
    ),
    "--max-batch-size": ("max_batch_size", int, "requests decoding at once (default: 16)"),
    "--max-queue": ("max_queue", int, "requests waiting for a slot before 429 (default: 64)"),
    "--max-seq-len": ("max_seq_len", int, "context per request, prompt + new tokens"),
    "--prefill-chunk": (
        "prefill_chunk",
        int,
        "most prompt tokens prefilled between decode steps, so long prompts do not stall "
        "streams (default: 256; 0: whole prompts)",
    ),
    "--prefill-stall": (
        "prefill_stall",
        float,
        "a prefill chunk may take at most this many decode steps' time (default: 1.5)",
    ),
    "--max-new-tokens-limit": ("max_new_tokens_limit", int, "largest max_new_tokens accepted"),
    "--drain-timeout": ("drain_timeout_s", float, "seconds in-flight requests may finish on stop"),
    "--profile-cache-dir": ("profile_cache_dir", Path, "where measured latency profiles are kept"),
    "--profile-depths": (
        "profile_depths",
        int,
        "exits timed at start-up, the others fitted (default: 3; 0 times every exit)",
    ),
    "--profile-max-s": ("profile_max_s", float, "cap on the start-up profile's seconds (15)"),
    "--budget-headroom": ("budget_headroom", float, "choose exits predicted within budget × this"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = (
        "Flags win over the SORTEDSERVE_* environment variables named in each help line, "
        "which win over the defaults. "
        "SORTEDSERVE_API_KEY=<key> makes the /v1/ routes require 'Authorization: Bearer <key>'."
    )
    for flag, (field, kind, help_text) in _FLAGS.items():
        env = f"SORTEDSERVE_{field.upper()}"
        parser.add_argument(flag, type=kind, default=None, help=f"{help_text}; env {env}")
    parser.add_argument(
        "--reprofile",
        action="store_true",
        default=None,
        help="measure the latency profile again even if a cached one matches; "
        "env SORTEDSERVE_REPROFILE",
    )
    parser.add_argument(
        "--no-access-log", action="store_true", help="do not log one line per HTTP request"
    )


def settings_from_args(args: argparse.Namespace) -> Any:
    from app.settings import Settings

    overrides = {
        field: getattr(args, flag.lstrip("-").replace("-", "_"))
        for flag, (field, _, _) in _FLAGS.items()
        if getattr(args, flag.lstrip("-").replace("-", "_"), None) is not None
    }
    if getattr(args, "reprofile", None):
        overrides["reprofile"] = True
    return Settings(**overrides)


def run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from app.model_check import check_servable
    from app.model_store import ModelStoreError

    try:
        settings = settings_from_args(args)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        logger.error("invalid settings: %s", problems)
        return 2
    try:  # the cheap checks first, before uvicorn and torch
        check_servable(settings.model)
    except (ModelStoreError, ValueError) as exc:
        logger.error("cannot serve %s: %s", settings.model, exc)
        return 1
    return _serve(settings, access_log=not args.no_access_log)


def _serve(settings: Any, access_log: bool) -> int:
    import uvicorn

    from app.api.main import create_app
    from app.api.server import DrainingServer

    app = create_app(settings)
    state = app.state.core
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,  # keep the app's logging set-up
        access_log=access_log,
        timeout_graceful_shutdown=5,  # after our own drain: only stragglers are left
        lifespan="on",
    )
    server = DrainingServer(config, state)
    state.on_fatal = lambda _message: setattr(server, "should_exit", True)
    server.run()
    return 1 if state.load_error else 0
