"""The requests the scheduler tracks, and the engine's batch as its last step report showed it.

Pure Python. Admitted requests are :class:`Plan` s in arrival order. Which of them run, and how
many tokens they have made, is read from the engine's step report (its ``rows``); the ones it
reported as ``finished`` are gone from the batch until :meth:`Tracked.pop` forgets them. Every
other plan is waiting for a slot.
"""

from __future__ import annotations

from app.scheduler.online import RowLike, StepReportLike
from app.scheduler.plans import Plan


class Tracked:
    def __init__(self) -> None:
        self.plans: dict[str, Plan] = {}  # insertion order = arrival order
        self._rows: dict[str, RowLike] = {}
        self._left: set[str] = set()

    def __contains__(self, request_id: str) -> bool:
        return request_id in self.plans

    def __len__(self) -> int:
        return len(self.plans)

    def add(self, plan: Plan) -> None:
        self.plans[plan.request_id] = plan

    def pop(self, request_id: str) -> Plan | None:
        self._rows.pop(request_id, None)
        self._left.discard(request_id)
        return self.plans.pop(request_id, None)

    def observe(self, report: StepReportLike) -> None:
        self._rows = {row.request_id: row for row in report.rows}
        self._left.update(row.request_id for row in report.finished)
        for request_id, row in self._rows.items():
            plan = self.plans.get(request_id)
            if plan is not None:  # the engine may lag one step behind a lowering
                plan.exit_layer = min(plan.exit_layer, row.exit_layer)

    @property
    def running_count(self) -> int:
        return len(self._rows)

    def is_running(self, plan: Plan) -> bool:
        return plan.request_id in self._rows

    def running(self) -> list[Plan]:
        return [p for p in self.plans.values() if p.request_id in self._rows]

    def waiting(self) -> list[Plan]:
        """Admitted, and neither running nor gone from the engine's batch."""
        return [
            p
            for p in self.plans.values()
            if p.request_id not in self._rows and p.request_id not in self._left
        ]

    def generated(self, plan: Plan) -> int:
        row = self._rows.get(plan.request_id)
        return row.generated if row is not None else 0
