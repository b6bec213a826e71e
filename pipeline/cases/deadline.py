"""The deadline monitor, in event time: reminders before a case's due date and one overdue escalation at it.

`now` is the pipeline's event-time watermark, never the wall clock, so a replay of a week of telemetry fires the
same reminders at the same event times. Each milestone has a deterministic event id over (case, milestone,
due_at) and fires once: the monitor remembers what it emitted (seed it with the store's existing ids at start)
and the store's case_events table collapses any repeat by event_id anyway. A due date that moves (a late
detection with an earlier event time, a reopened case) gets its own milestones.

Only cases that still owe a report get milestones: open, needs_review, acknowledged — not monitored, reported or
dismissed. A milestone that would fall before knowledge_at (a window shorter than a lead time) is skipped.
When `now` jumps past several milestones at once, each fires, stamped with its own scheduled time.
"""

from __future__ import annotations

from collections.abc import Iterable

from schemas.case import Case, CaseEvent
from schemas.ids import content_id
from schemas.policy import Policy

REMINDER = "deadline_reminder"
OVERDUE = "deadline_overdue"
#: Statuses with a report still to file.
PENDING_STATUSES: tuple[str, ...] = ("open", "needs_review", "acknowledged")
MONITOR_ACTOR = "deadline-monitor"


def milestones(case: Case, lead_days: Iterable[float]) -> list[tuple[str, float | None, float]]:
    """(action, lead days or None for overdue, event time) of a case's milestones, earliest first."""
    if case.due_at is None:
        return []
    out: list[tuple[str, float | None, float]] = []
    for lead in sorted(set(lead_days), reverse=True):
        at = case.due_at - lead * 86_400.0
        if case.knowledge_at is None or at >= case.knowledge_at:
            out.append((REMINDER, lead, at))
    out.append((OVERDUE, None, case.due_at))
    return out


def milestone_event_id(case_id: str, action: str, lead: float | None, due_at: float) -> str:
    return content_id("cev", case_id, action, lead, due_at)


class DeadlineMonitor:
    """Emits each reminder / overdue event once, when event time reaches it."""

    def __init__(self, policy: Policy, emitted: Iterable[str] = ()):
        self.policy = policy
        self._emitted: set[str] = set(emitted)

    def due(self, cases: Iterable[Case], now: float, recorded_at: float) -> list[CaseEvent]:
        """Milestones reached by event time `now` and not emitted before, in event-time order."""
        out: list[CaseEvent] = []
        for case in cases:
            if case.status not in PENDING_STATUSES or case.due_at is None:
                continue
            for action, lead, at in milestones(case, self.policy.reporting.reminder_lead_days):
                if at > now:
                    break
                event_id = milestone_event_id(case.case_id, action, lead, case.due_at)
                if event_id in self._emitted:
                    continue
                self._emitted.add(event_id)
                details = {"due_at": case.due_at, "knowledge_at": case.knowledge_at, "status": case.status}
                if lead is not None:
                    details["lead_days"] = lead
                out.append(
                    CaseEvent(
                        event_id=event_id,
                        case_id=case.case_id,
                        at=at,
                        recorded_at=recorded_at,
                        actor=MONITOR_ACTOR,
                        action=action,
                        from_status=case.status,
                        to_status=case.status,
                        details=details,
                    )
                )
        return sorted(out, key=lambda e: (e.at, e.case_id))
