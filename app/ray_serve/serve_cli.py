"""``python -m app serve-ray``: the same HTTP API from N engine replicas on Ray Serve.

Joins the Ray cluster at ``--address`` (e.g. ``auto``, ``ray://head:10001``) or starts a local
one, deploys ``SortedServeIngress`` and ``--replicas`` ``SortedServeEngine`` replicas (each loads
the checkpoint once), and serves on ``--host``:``--port`` through Ray Serve's proxy. Requests go to
the replica where they get the deepest exit within their ``budget_ms`` (``--router budget``; also
``pow2``, Ray's default, and ``round_robin``, to compare). ``/ready`` answers 200 once every replica
is ready. SIGTERM/SIGINT delete the application (replicas drain), then stop the local cluster (a
joined cluster keeps running).
Needs the ``[ray]`` extra: ``pip install -e '.[ray]'``.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# flag -> (Settings field, type, help): passed to every replica
_REPLICA_FLAGS: dict[str, tuple[str, Any, str]] = {
    "--device": ("device", str, "auto, cpu or cuda[:N] (default: auto)"),
    "--dtype": ("dtype", str, "auto, float32, bfloat16 or float16 (default: auto)"),
    "--threads": ("torch_threads", int, "CPU threads for torch in each replica"),
    "--max-batch-size": ("max_batch_size", int, "requests decoding at once per replica"),
    "--max-queue": ("max_queue", int, "requests waiting per replica before 429"),
    "--max-new-tokens-limit": ("max_new_tokens_limit", int, "largest max_new_tokens accepted"),
    "--drain-timeout": ("drain_timeout_s", float, "seconds in-flight requests may finish on stop"),
    "--profile-cache-dir": ("profile_cache_dir", str, "where measured latency profiles are kept"),
    "--budget-headroom": ("budget_headroom", float, "choose exits predicted within budget × this"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="model_store/default", help="checkpoint to serve")
    parser.add_argument("--replicas", type=int, default=2, help="engine replicas (default: 2)")
    parser.add_argument("--host", default="0.0.0.0", help="interface (default: 0.0.0.0)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port (default: 8000)")
    parser.add_argument(
        "--address", default=None, help="Ray cluster to join (e.g. auto); default: start one"
    )
    parser.add_argument(
        "--router",
        choices=["budget", "pow2", "round_robin"],
        default="budget",
        help="request router: budget-aware (default), Ray's power of two choices, round-robin",
    )
    parser.add_argument(
        "--replica-cpus", type=float, default=1.0, help="Ray CPUs per replica (default: 1)"
    )
    parser.add_argument("--replica-gpus", type=float, default=0.0, help="Ray GPUs per replica")
    parser.add_argument(
        "--stats-period", type=float, default=0.2, help="seconds between load pictures (0.2)"
    )
    parser.add_argument(
        "--health-check-period", type=float, default=2.0, help="seconds between health checks"
    )
    parser.add_argument("--min-replicas", type=int, default=None, help="autoscale: at least")
    parser.add_argument("--max-replicas", type=int, default=None, help="autoscale: at most")
    parser.add_argument(
        "--met-target", type=float, default=0.9, help="autoscale up below this share of budgets met"
    )
    parser.add_argument(
        "--upscale-delay", type=float, default=5.0, help="autoscale: seconds before adding (5)"
    )
    parser.add_argument(
        "--downscale-delay", type=float, default=60.0, help="autoscale: seconds before removing"
    )
    for flag, (_, kind, help_text) in _REPLICA_FLAGS.items():
        parser.add_argument(flag, type=kind, default=None, help=help_text)


def app_args(args: argparse.Namespace) -> Any:
    from app.ray_serve.builder import RayAppArgs

    settings = {
        field: getattr(args, flag.lstrip("-").replace("-", "_"))
        for flag, (field, _, _) in _REPLICA_FLAGS.items()
        if getattr(args, flag.lstrip("-").replace("-", "_"), None) is not None
    }
    model = str(args.model)
    if not model.startswith("pkg:") and Path(model).exists():
        model = str(Path(model).resolve())  # replicas may not share our working directory
    return RayAppArgs(
        model=model,
        replicas=args.replicas,
        router=args.router,
        settings=settings,
        replica_cpus=args.replica_cpus,
        replica_gpus=args.replica_gpus,
        routing_stats_period_s=args.stats_period,
        health_check_period_s=args.health_check_period,
        min_replicas=args.min_replicas,
        max_replicas=args.max_replicas,
        met_target=args.met_target,
        upscale_delay_s=args.upscale_delay,
        downscale_delay_s=args.downscale_delay,
    )


def run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    try:
        import ray
        from ray import serve
    except ImportError:
        logger.error("serve-ray needs Ray: pip install -e '.[ray]'")
        return 2
    from app.model_check import check_servable
    from app.model_store import ModelStoreError
    from app.ray_serve.builder import APP_NAME, build_app

    try:
        a = app_args(args)
        a.replica_settings()
    except (ValidationError, ValueError) as exc:
        logger.error("invalid settings: %s", exc)
        return 2
    try:
        check_servable(Path(a.model) if not a.model.startswith("pkg:") else a.model)
    except (ModelStoreError, ValueError) as exc:
        logger.error("cannot serve %s: %s", a.model, exc)
        return 1
    stop = threading.Event()
    started = time.perf_counter()
    if args.address:
        ray.init(address=args.address, namespace="sortedserve")
    else:
        most = a.max_replicas or a.replicas
        cpus = max(os.cpu_count() or 1, math.ceil(most * a.replica_cpus))
        ray.init(num_cpus=cpus, namespace="sortedserve", include_dashboard=False)
    for sig in (signal.SIGTERM, signal.SIGINT):  # after ray.init, which installs its own
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(build_app(a), name=APP_NAME, route_prefix="/", blocking=False)
        logger.info(
            "serving %s from %d replica(s) on http://%s:%d (router %s); ready in %.1f s",
            a.model,
            a.replicas,
            args.host,
            args.port,
            a.router,
            time.perf_counter() - started,
        )
        while not stop.wait(0.5):
            pass
        logger.info("stopping: the replicas drain, then the cluster stops")
        return 0
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        logger.error("cannot serve on Ray: %s", first)
        return 1
    finally:
        try:
            if args.address:  # a shared cluster: remove our application, leave Serve running
                serve.delete(APP_NAME)
            else:
                serve.shutdown()
        finally:
            ray.shutdown()
