"""Latency-budget depth scheduling (pure Python; see depth_scheduler.py and profile.py)."""

from app.scheduler.depth_scheduler import Decision, DepthScheduler, SchedulerConfig, SchedulingError
from app.scheduler.profile import ExitCost, LatencyProfile, ProfileError, fill_exits

__all__ = [
    "Decision",
    "DepthScheduler",
    "ExitCost",
    "LatencyProfile",
    "ProfileError",
    "SchedulerConfig",
    "SchedulingError",
    "fill_exits",
]
