"""Compute used and projected by one run vs the policy's training threshold (case semantics rules 3 and 6)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from detectors.base import DetectContext, Detector, inquiry_text
from detectors.classifier_base import Verdict
from detectors.state import seen_window_start
from schemas.detection import Detection, Outcome


def crossing(used_before: float, used: float, window_start: float, window_end: float, *, latest: bool, rate: float,
             reserved_until: float | None, threshold: float, count_projected: bool,
             last_end: float) -> dict[str, Any] | None:
    """The first crossing this window causes, or None.

    Used: the crossing time is interpolated within the window (uniform rate), so it lies within one window of the
    exact sample; a late window for an earlier time counts from the latest window end seen (that is when the sum
    was first known). Projected ("could result in"): at a window end t, used + rate x (reserved_until - t).
    """
    if used >= threshold:
        if latest and used > used_before:
            frac = min(1.0, max(0.0, (threshold - used_before) / (used - used_before)))
            at = window_start + frac * (window_end - window_start)
        else:
            at = last_end
        return {"at": at, "reason": "compute_used", "used": used, "projected": None, "window_end": window_end,
                "basis_of_time": "interpolated within the crossing window" if latest else "late window"}
    if count_projected and latest and reserved_until is not None:
        projected = used + rate * max(0.0, reserved_until - window_end)
        if projected >= threshold:
            return {"at": window_end, "reason": "compute_projected", "used": used, "projected": projected,
                    "rate_flops": rate, "reserved_until": reserved_until, "window_end": window_end,
                    "basis_of_time": "window end"}
    return None


def projected_after(seen: Mapping[str, Sequence[float]], used: float, after: float,
                    reservations: Iterable[Mapping[str, Any]], *, threshold: float,
                    window_s: float) -> dict[str, Any] | None:
    """The projected crossing an in-order run makes once a reservation at `after` is known: at the first window end
    t > after (a record at t acts after the windows ending by t) where used(t) + rate(t) x (reserved until - t)
    reaches the threshold, the reservations known by then counted, as `crossing` would have found it; None when the
    run's used compute reaches it first, or never. From the windows the run still remembers (`RunState.seen`,
    "workload|start" -> [flop, ...]): used(t) is the run's total less what came after t."""
    by_end: dict[float, float] = {}
    for key, flop in seen.items():
        end = seen_window_start(key) + window_s
        by_end[end] = by_end.get(end, 0.0) + float(flop[0])
    resv = [(float(r["ts"]), float(r["until"])) for r in reservations if r.get("until") is not None]
    later = 0.0
    used_at: dict[float, float] = {}
    for end in sorted(by_end, reverse=True):
        used_at[end] = used - later
        later += by_end[end]
    for end in sorted(e for e in by_end if e > after):
        if used_at[end] >= threshold:
            return None  # the used crossing comes first here, as it does in `crossing`
        until = max((u for ts, u in resv if ts < end), default=None)
        if until is None:
            continue
        rate = by_end[end] / window_s
        projected = used_at[end] + rate * max(0.0, until - end)
        if projected >= threshold:
            return {"at": end, "reason": "compute_projected", "used": used_at[end], "projected": projected,
                    "rate_flops": rate, "reserved_until": until, "window_end": end, "basis_of_time": "window end"}
    return None


def outcome_for(is_foreign: bool, band: str, unmet: Sequence[str] = ()) -> Outcome | None:
    """Case outcome for a run over the threshold. `unmet`: the policy's `uncertainty.not_training_needs` that a
    `not_training` verdict failed (Verdict.closes_not_training); for a foreign customer such a verdict does not
    close the question, since a missed training run is the costlier error: the case opens as needs_review."""
    if band == "not_training" and not (is_foreign and unmet):
        return None  # non-training workloads never open a compute case
    if not is_foreign:
        return "monitored"
    return "reportable" if band == "training" else "needs_review"


def not_training_check(verdict: Verdict | None, needs: Sequence[str]) -> dict[str, Any] | None:
    """What the policy asked of a not_training verdict and what it lacked; None when the band is another."""
    if verdict is None or verdict.band != "not_training":
        return None
    closes, unmet = verdict.closes_not_training(needs)
    return {"needs": list(needs), "unmet": unmet, "closes": closes, "reasons": list(verdict.reasons),
            "out_features": list(verdict.out_features), "missing": list(verdict.missing),
            "in_distribution": verdict.in_distribution}


class ComputeThreshold(Detector):
    id = "compute_threshold"
    version = 1
    severity = "high"
    maturity = "test"
    description = "A run's used or projected compute reaches the policy's training threshold ('could result in')."
    reevaluates_runs_on_cip = True  # a late CIP record can make a crossed run's customer foreign (rule 6)
    reads_run_crossing = True

    def claims_run(self, det: Detection) -> bool:
        """A reportable or needs_review run case is the run's own: it leaves its owners' sums (rule 4)."""
        return det.run_id is not None and det.outcome in ("reportable", "needs_review")

    def detect(self, state: DetectContext, event: Any) -> list[Detection]:
        run = state.run
        if run is None or not run.crossed:
            return []
        verdict = state.verdict or (Verdict.from_dict(run.verdict) if run.verdict else None)
        band = verdict.band if verdict else "uncertain"
        det = state.determination
        check = not_training_check(verdict, state.policy.uncertainty.not_training_needs)
        outcome = outcome_for(det.is_foreign, band, check["unmet"] if check else ())
        if outcome is None:
            return []
        c = run.crossed
        times = {"crossing": c["at"]}
        if run.verdict and run.verdict.get("since") is not None and outcome == "reportable":
            times["classified_training"] = run.verdict["since"]
        if state.knowledge_floor is not None:
            times["foreign_status_known"] = state.knowledge_floor
        at = max(times.values())
        policy = state.policy
        projected = c.get("projected")
        evidence: dict[str, Any] = {
            "threshold_ops": policy.thresholds.training_ops,
            "used_flop": run.used, "used_flop_low": run.used_low, "used_flop_high": run.used_high,
            "basis": dict(run.basis), "rate_flops": run.rate, "projected_flop": projected,
            "reserved_until": c.get("reserved_until"),
            "crossing": dict(c), "knowledge_at_from": times,
            "knowledge_note": "knowledge_at = the latest of: the crossing, the classification as training, and the "
                              "time the CIP record made the customer foreign (the provider could not know earlier)",
            "run": {**run.describe(), "stitching": list(state.run_stitching)},
            "windows": list(run.source_windows),
            "needs_review_is_knowledge": policy.uncertainty.needs_review_is_knowledge,
        }
        if state.determination.cip_missing:
            evidence["flags"] = ["cip_missing"]
        if verdict is not None:
            evidence["classifier"] = verdict.to_dict()
        if check is not None:  # a not_training that did not close the question: say what it lacked
            evidence["not_training_not_closed"] = check
        if outcome == "needs_review":
            evidence["suggested_inquiry"] = inquiry_text(state.account_id, run.run_id, run.used, projected)
        verb = "used" if c["reason"] == "compute_used" else "is projected to use"
        summary = (f"run {run.run_id} of account {state.account_id} {verb} >= {policy.thresholds.training_ops:.3g} "
                   f"FLOP ({band}; customer {det.status}) -> {outcome}")
        return [self.detection(state, outcome=outcome, reason=c["reason"], event_time=at, summary=summary,
                               evidence=evidence, run_id=run.run_id, workload_ids=list(state.run_workloads),
                               source_windows=list(run.source_windows),
                               severity="high" if outcome != "monitored" else "low")]
