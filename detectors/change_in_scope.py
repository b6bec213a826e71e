"""Change in scope (15 CFR 7.308): an account's use moves from below the threshold to above it.

Two developments count: a reservation that grows from below to past the threshold potential, and a run that
crosses while the account's earlier use was below (inference, small or non-training work). The detection says
what changed and when; it explains a case rather than opening one (outcome 'info'), except that a grown
reservation of a foreign account opens needs_review when the policy says `reservation_opens_case`.
"""

from __future__ import annotations

from typing import Any

from detectors.base import DetectContext, Detector
from schemas.allocation import AllocationEvent
from schemas.detection import Detection


class ChangeInScope(Detector):
    id = "change_in_scope"
    version = 1
    severity = "medium"
    maturity = "experimental"
    description = "An account's use grows from below the training threshold to above it."

    def detect(self, state: DetectContext, event: Any) -> list[Detection]:
        acct = state.account
        if acct is None:
            return []
        th = state.policy.thresholds.training_ops
        if isinstance(event, AllocationEvent):
            if not (0.0 < acct.potential_prev < th <= acct.potential):
                return []
            opens = state.policy.thresholds.reservation_opens_case and state.determination.is_foreign
            evidence = {"what": "reservation grew past the threshold potential",
                        "before": {"max_possible_flop": acct.potential_prev},
                        "after": {"max_possible_flop": acct.potential, "at": acct.potential_at},
                        "reservations": dict(acct.reservations), "threshold_ops": th}
            return [self.detection(state, outcome="needs_review" if opens else "info", reason="reservation_grew",
                                   event_time=event.ts, evidence=evidence,
                                   summary=f"account {state.account_id}: reservation potential "
                                           f"{acct.potential_prev:.3g} -> {acct.potential:.3g} FLOP (threshold "
                                           f"{th:.3g})")]
        run = state.run
        if run is None or not run.crossed or (run.verdict or {}).get("band", "uncertain") == "not_training":
            return []
        prior = [p for rid, p in acct.activity.get("runs", {}).items()
                 if rid != run.run_id and not p.get("crossed") and p.get("first", 0.0) < run.crossed["at"]]
        own_before = {b: n for b, n in run.bands_seen.items() if b != "training"}
        if not prior and not own_before:
            return []
        evidence = {"what": "use moved from below the threshold to a run over it",
                    "before": {"runs": prior, "this_run_bands_before": own_before,
                               "first_activity_at": acct.first_event},
                    "after": {"run_id": run.run_id, "crossing": dict(run.crossed), "used_flop": run.used,
                              "band": (run.verdict or {}).get("band")},
                    "threshold_ops": th}
        return [self.detection(state, outcome="info", reason="scope_grew", event_time=run.crossed["at"],
                               evidence=evidence, run_id=run.run_id, workload_ids=list(state.run_workloads),
                               summary=f"account {state.account_id}: from {len(prior)} earlier run(s) below the "
                                       f"threshold to run {run.run_id} crossing it")]
