"""What the console shows and does, independent of the web framework: the queue, one case, its draft report and
plot, and the actions (through pipeline/cases/actions.py, the CLI's own core, so validation and audit are the CLI's).

Every read takes the viewer's role; for `analyst` the result goes through pipeline/web/redact.py before it leaves
this module, so templates, the JSON API and the PDF all get the same redacted data.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipeline.cases.actions import CaseActions, policy_of
from pipeline.cases.core import CaseError, IllegalTransition, UnknownCase
from pipeline.cases.report import draft_report, utc
from pipeline.store import Store
from pipeline.web import plot
from pipeline.web.config import Role
from pipeline.web.redact import identity_values, redact_case, redact_report, scrub
from schemas.case import Case
from schemas.policy import Policy

DAY = 86_400.0
#: Statuses whose report is still to be filed: the ones a deadline applies to.
PENDING = ("open", "needs_review", "acknowledged")
STATUSES = ("open", "needs_review", "acknowledged", "reported", "dismissed", "monitored")
SOON_DAYS = 3.0

#: action -> (statuses it applies to, the text field it requires, what the text is)
ACTIONS: dict[str, tuple[tuple[str, ...], str, str]] = {
    "acknowledge": (("open",), "reason", "why you take the case"),
    "review": (("needs_review",), "reason", "what the review found"),
    "report": (("open", "needs_review", "acknowledged"), "reference", "the filing's reference number"),
    "dismiss": (("open", "needs_review", "acknowledged", "monitored"), "reason", "why it is not reportable"),
}


#: Filing and dismissing are decisions on the foreign person's report, which only `compliance` sees in full;
#: analysts can take a case and decide a classifier review (a technical finding).
ACTION_ROLES: dict[str, tuple[Role, ...]] = {
    "acknowledge": ("analyst", "compliance"), "review": ("analyst", "compliance"),
    "report": ("compliance",), "dismiss": ("compliance",),
}


class ActionRejected(Exception):
    """An action the case rules refuse (message is the one-line reason); `status` is the HTTP status to answer."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class NotFound(Exception):
    pass


@dataclass(frozen=True)
class Viewer:
    name: str
    role: Role

    @property
    def sees_identity(self) -> bool:
        return self.role == "compliance"


def urgency(case: Case, as_of: float) -> tuple[float | None, str]:
    """Days left to the due date and a class: overdue, soon (<= 3 days), ok, or none (no clock / not pending)."""
    if case.due_at is None:
        return None, "none"
    days = (case.due_at - as_of) / DAY
    if case.status not in PENDING:
        return days, "none"
    return days, "overdue" if days < 0 else "soon" if days <= SOON_DAYS else "ok"


class Console:
    """The console's reads and actions on one store. The store's client serialises calls itself; the lock keeps
    an action's read-validate-write from interleaving with another action's."""

    def __init__(self, store: Store, default_policy: str, clock: Any = time.time,
                 feed: Callable[[list[str]], dict[str, Any]] | None = None):
        self.store = store
        self.default_policy = default_policy
        self.clock = clock
        # After an action: publish the case's changes the compliance feed lacks (serve wires pipeline.cases.actions
        # .publish, as the CLI does) and return what became of them; None: the console only writes the store.
        self.feed = feed
        self._lock = threading.RLock()

    # ---- reads ---------------------------------------------------------------------------------------------------

    def latest_event_time(self) -> float | None:
        rows = self.store.query("SELECT max(window_end) AS t, count() AS n FROM windows")
        return float(rows[0]["t"]) if rows and rows[0]["n"] else None

    def queue(
        self, viewer: Viewer, as_of: float, status: list[str] | None = None, reason: str | None = None,
        policy: str | None = None, subject: str | None = None, due: str | None = None,
    ) -> dict[str, Any]:
        with self._lock:
            cases = self.store.list_cases()
        counts = Counter(c.status for c in cases)
        rows = []
        for c in cases:
            days, cls = urgency(c, as_of)
            subj = c.beneficial_owner_id or c.account_id
            if status and c.status not in status:
                continue
            if reason and c.reason != reason:
                continue
            if policy and c.policy_id != policy:
                continue
            if subject and subject.lower() not in f"{subj} {c.account_id}".lower():
                continue
            if (due == "overdue" and cls != "overdue") or (due == "soon" and cls not in ("overdue", "soon")):
                continue
            row = {
                "case_id": c.case_id, "status": c.status, "reason": c.reason, "account_id": c.account_id,
                "beneficial_owner_id": c.beneficial_owner_id, "subject": subj, "run_id": c.run_id,
                "policy_id": c.policy_id, "policy_version": c.policy_version, "knowledge_at": c.knowledge_at,
                "knowledge_at_utc": utc(c.knowledge_at), "due_at": c.due_at, "due_at_utc": utc(c.due_at),
                "days_left": None if days is None else round(days, 2), "urgency": cls, "version": c.version,
            }
            rows.append(scrub(row, identity_values(c.identity)) if not viewer.sees_identity else row)
        return {
            "as_of": as_of, "as_of_utc": utc(as_of), "cases": rows,
            "counts": {s: counts.get(s, 0) for s in STATUSES},
            "overdue": sum(1 for c in cases if urgency(c, as_of)[1] == "overdue"),
            "due_soon": sum(1 for c in cases if urgency(c, as_of)[1] == "soon"),
            "reasons": sorted({c.reason for c in cases}), "policies": sorted({c.policy_id for c in cases}),
        }

    def _case(self, case_id: str) -> Case:
        case = self.store.get_case(case_id)
        if case is None:
            raise NotFound(f"{case_id}: no such case")
        return case

    def policy_of(self, case: Case) -> Policy:
        """The policy that decided the case (shipped profile by id), else the configured one (as the CLI does)."""
        return policy_of(case, self.default_policy)

    def case(self, viewer: Viewer, case_id: str, as_of: float) -> dict[str, Any]:
        with self._lock:
            case = self._case(case_id)
            events = self.store.case_events(case_id)
        report = draft_report(case, self.policy_of(case))
        days, cls = urgency(case, as_of)
        entries = sorted(case.evidence.get("detections", {}).values(), key=lambda e: e["event_time"])
        latest = entries[-1].get("evidence", {}) if entries else {}
        verdicts = [
            {"event_time_utc": utc(e["event_time"]), "detector": e["detector_id"], **(e["evidence"].get("classifier"))}
            for e in entries if isinstance((e.get("evidence") or {}).get("classifier"), dict)
        ]
        out = {
            "case": case.model_dump(mode="json"),
            "as_of": as_of, "as_of_utc": utc(as_of), "days_left": None if days is None else round(days, 2),
            "urgency": cls,
            "report": report,
            "classifier": verdicts[-1] if verdicts else None,
            "foreign_person_test": latest.get("foreign_person"),
            "events": [e.model_dump(mode="json") | {"at_utc": utc(e.at), "recorded_at_utc": utc(e.recorded_at)}
                       for e in events],
            "actions": [a for a, (allowed, _, _) in ACTIONS.items()
                        if case.status in allowed and viewer.role in ACTION_ROLES[a]],
        }
        if viewer.sees_identity:
            return out
        values = identity_values(case.identity)
        out["case"] = redact_case(out["case"], values)
        out["report"] = redact_report(report, values)
        return scrub(out, values)

    def report(self, viewer: Viewer, case_id: str) -> dict[str, Any]:
        with self._lock:
            case = self._case(case_id)
        report = draft_report(case, self.policy_of(case))
        return report if viewer.sees_identity else redact_report(report, identity_values(case.identity))

    def events(self, viewer: Viewer, case_id: str) -> list[dict[str, Any]]:
        with self._lock:
            case = self._case(case_id)
            events = [e.model_dump(mode="json") for e in self.store.case_events(case_id)]
        return events if viewer.sees_identity else scrub(events, identity_values(case.identity))

    def series(self, case_id: str) -> plot.ComputeSeries:
        """The plot's data (no identity in it: times and FLOP only)."""
        with self._lock:
            case = self._case(case_id)
            report = draft_report(case, self.policy_of(case))
            return plot.compute_series(self.store, case.model_dump(mode="json"), report)

    # ---- actions -------------------------------------------------------------------------------------------------

    def act(self, viewer: Viewer, case_id: str, action: str, text: str, training: bool | None = None,
            ) -> dict[str, Any]:
        """Apply an action as `viewer`; returns the events it appended. Raises ActionRejected with the reason."""
        if action not in ACTIONS:
            raise ActionRejected(f"unknown action {action!r} (one of {', '.join(ACTIONS)})", 404)
        if viewer.role not in ACTION_ROLES[action]:
            raise ActionRejected(f"{action}: the {viewer.role} role may not {action} cases", 403)
        _, field, what = ACTIONS[action]
        text = (text or "").strip()
        if not text:
            raise ActionRejected(f"{action}: a {field} is required ({what})", 422)
        if action == "review" and training is None:
            raise ActionRejected("review: the finding is required (training or not training)", 422)
        # The CLI's validating core (pipeline/cases/actions.py): it re-reads the case, checks the actor, the text
        # and the time, applies the transition rules and appends the audit event; at = its clock (processing time).
        actions = CaseActions(self.store, self.default_policy, clock=self.clock)
        with self._lock:
            case = self.store.get_case(case_id)
            if case is None:
                raise ActionRejected(f"{case_id}: no such case", 404)
            try:
                if action == "acknowledge":
                    messages = actions.ack(case_id, viewer.name, None, text)
                elif action == "review":
                    messages = actions.review(case_id, viewer.name, None, bool(training), text)
                elif action == "report":
                    messages = actions.report(case_id, viewer.name, None, text)
                else:
                    messages = actions.dismiss(case_id, viewer.name, None, text)
            except UnknownCase as exc:
                raise ActionRejected(str(exc), 404) from exc
            except IllegalTransition as exc:
                raise ActionRejected(str(exc), 409) from exc
            except CaseError as exc:  # CaseActionError too: a bad argument, nothing written
                raise ActionRejected(str(exc), 422) from exc
        events = [m.change.model_dump(mode="json") for m in messages]
        new = messages[-1].case if messages else case
        result = {"case_id": case_id, "status": new.status, "version": new.version, "events": events,
                  "feed": self.feed([case_id]) if self.feed else None}
        return result if viewer.sees_identity else scrub(result, identity_values(case.identity))
