"""Special measures (case semantics rule 5): a customer or owner in a named jurisdiction, or a named person."""

from __future__ import annotations

from typing import Any

from detectors.base import DetectContext, Detector
from schemas.allocation import AllocationEvent
from schemas.cip import CipRecord
from schemas.detection import Detection
from schemas.policy import Policy


def special_measures_hits(cip: CipRecord, policy: Policy) -> list[str]:
    """Why this customer falls under special measures (empty: it does not)."""
    sm = policy.special_measures
    juris, persons = set(sm.jurisdictions), set(sm.persons)
    hits = []
    if cip.country in juris:
        hits.append(f"customer_country:{cip.country}")
    if cip.account_id in persons:
        hits.append(f"named_customer:{cip.account_id}")
    for o in cip.beneficial_owners:
        for what, v in (("nationality", o.nationality), ("residence", o.residence)):
            if v in juris:
                hits.append(f"owner_{what}:{o.owner_id}:{v}")
        if o.owner_id in persons:
            hits.append(f"named_owner:{o.owner_id}")
    return hits


def first_event_after(state: DetectContext, event: Any, after: float) -> float | None:
    """Event time of the account's first allocation or telemetry event at or after the CIP record, if seen."""
    if isinstance(event, AllocationEvent):
        return event.ts if event.ts >= after else None
    if hasattr(event, "window_start") and hasattr(event, "window_end"):
        return max(float(event.window_start), after) if float(event.window_end) > after else None
    # Re-evaluation (the CIP record came after the telemetry): the first remembered event after it.
    return state.account.first_active_after(after, state.window_s) if state.account is not None else None


class SpecialMeasures(Detector):
    id = "special_measures"
    version = 1
    severity = "critical"
    maturity = "test"
    description = "Account of a customer or owner in a jurisdiction (or a person) named under special measures."
    dated_by_first_event = True  # knowledge from the first event after the record, in whatever order events came

    def detect(self, state: DetectContext, event: Any) -> list[Detection]:
        if state.cip is None:
            return []
        hits = special_measures_hits(state.cip, state.policy)
        if not hits:
            return []
        at = first_event_after(state, event, state.cip.updated_at)
        if at is None:
            return []
        evidence = {"matches": hits, "cip_updated_at": state.cip.updated_at,
                    "jurisdictions": list(state.policy.special_measures.jurisdictions),
                    "knowledge_note": "knowledge_at = the account's first allocation or telemetry event after the "
                                      "CIP record that names the jurisdiction or person"}
        return [self.detection(state, outcome="reportable", reason="special_measures", event_time=at,
                               summary=f"account {state.account_id} under special measures: {', '.join(hits)}",
                               evidence=evidence)]
