"""A foreign account's reservation whose maximum possible compute crosses the training threshold.

Maximum possible compute = accelerators reserved x catalog BF16 dense peak x reserved duration. A reservation
says nothing of purpose, so it is 'info' (it raises the watch level and feeds change in scope) unless the policy
says `reservation_opens_case`, when it opens a needs_review case.
"""

from __future__ import annotations

from typing import Any

from detectors.base import DetectContext, Detector
from detectors.catalog import resolve
from schemas.allocation import AllocationEvent
from schemas.detection import Detection

RESERVATION_KINDS = ("reserved", "reservation_changed")


def reservation_potential(event: AllocationEvent) -> tuple[float, float] | None:
    """(maximum possible FLOP, BF16 peak per device) of a reservation event; None when unknowable."""
    acc = resolve(event.accelerator)
    if event.kind not in RESERVATION_KINDS or event.reserved_until is None or acc is None \
            or "bf16" not in acc.peak_flops:
        return None
    peak = acc.peak_flops["bf16"]
    return event.count * peak * max(0.0, event.reserved_until - event.ts), peak


class ReservationPotential(Detector):
    id = "reservation_potential"
    version = 1
    severity = "low"
    maturity = "test"
    description = "A foreign account reserves capacity whose maximum possible compute reaches the training threshold."

    def detect(self, state: DetectContext, event: Any) -> list[Detection]:
        if not isinstance(event, AllocationEvent) or not state.determination.is_foreign:
            return []
        got = reservation_potential(event)
        t = state.policy.thresholds
        if got is None or got[0] < t.training_ops:
            return []
        potential, peak = got
        outcome = "needs_review" if t.reservation_opens_case else "info"
        evidence = {"threshold_ops": t.training_ops, "max_possible_flop": potential, "accelerator": event.accelerator,
                    "count": event.count, "bf16_peak_flops": peak, "reserved_from": event.ts,
                    "reserved_until": event.reserved_until, "allocation_event_id": event.event_id,
                    "reservation_opens_case": t.reservation_opens_case}
        summary = (f"account {state.account_id} reserved {event.count} x {event.accelerator} until "
                   f"{event.reserved_until:.0f}: up to {potential:.3g} FLOP >= {t.training_ops:.3g} -> {outcome}")
        return [self.detection(state, outcome=outcome, reason="reservation_potential", event_time=event.ts,
                               summary=summary, evidence=evidence,
                               workload_ids=[event.workload_id] if event.workload_id else [],
                               severity="medium" if outcome == "needs_review" else "low")]
