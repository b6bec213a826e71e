"""Owner aggregation (case semantics rule 4): one foreign beneficial owner's runs summed across its accounts."""

from __future__ import annotations

from typing import Any

from detectors.base import DetectContext, Detector, inquiry_text
from detectors.state import RUN_IDS_K, OwnerState
from schemas.detection import Detection


def owner_crossing(owner: OwnerState, *, threshold: float, count_projected: bool, t: float,
                   account_id: str) -> dict[str, Any] | None:
    """Sum the owner's training (or uncertain) runs that have no case of their own; the crossing, or None.

    Projection per run: rate x remaining reservation of that run's account, as for a single run (rule 3).
    """
    runs = {k: r for k, r in owner.runs.items() if not r.get("own_case") and r.get("band") != "not_training"}
    if len(owner.accounts) < 2 or not runs:
        return None
    used = sum(r["used"] for r in runs.values())
    projected = used + sum(r["rate"] * max(0.0, r["reserved_until"] - r["t"]) for r in runs.values()
                           if r.get("reserved_until") is not None)
    if used >= threshold:
        reason = "used"
    elif count_projected and projected >= threshold:
        reason = "projected"
    else:
        return None
    return {"at": t, "basis": reason, "account_id": account_id, "used": used,
            "used_low": sum(r["used_low"] for r in runs.values()),
            "used_high": sum(r["used_high"] for r in runs.values()),
            "projected": projected, "runs": {k: dict(r) for k, r in runs.items()},
            "all_training": all(r.get("band") == "training" for r in runs.values())}


def combined_run(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The owner's runs described as one (evidence key `run`): footprints add up (the runs may overlap in time),
    the span is first start to last end, the id lists are bounded."""
    descs = [r.get("run") or {} for r in runs.values()]
    accel: dict[str, int] = {}
    for d in descs:
        for m, n in (d.get("accelerators") or {}).items():
            accel[m] = accel.get(m, 0) + n
    starts = [d["start"] for d in descs if d.get("start") is not None]
    ends = [d["end"] for d in descs if d.get("end") is not None]
    return {"run_id": None, "run_ids": sorted(runs), "accelerators": accel,
            "device_count": sum(d.get("device_count") or 0 for d in descs) or None,
            "node_count": sum(d.get("node_count") or 0 for d in descs) or None,
            "start": min(starts) if starts else None, "end": max(ends) if ends else None,
            "job_ids": sorted({j for d in descs for j in d.get("job_ids") or []})[:RUN_IDS_K],
            "workload_ids": sorted({w for d in descs for w in d.get("workload_ids") or []})[:RUN_IDS_K]}


def combined_basis(runs: dict[str, dict[str, Any]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in runs.values():
        for b, n in (r.get("basis") or {}).items():
            out[b] = out.get(b, 0) + n
    return out


class OwnerAggregate(Detector):
    id = "owner_aggregate"
    version = 1
    severity = "high"
    maturity = "test"
    description = "A foreign beneficial owner's runs across several accounts together reach the training threshold."

    def detect(self, state: DetectContext, event: Any) -> list[Detection]:
        owner = state.owner
        if owner is None or not owner.crossed or owner.crossed.get("account_id") != state.account_id:
            return []
        c = owner.crossed
        outcome = "reportable" if c["all_training"] else "needs_review"
        evidence: dict[str, Any] = {
            "threshold_ops": state.policy.thresholds.training_ops, "beneficial_owner_id": owner.owner_id,
            "accounts": list(owner.accounts), "used_flop": c["used"], "used_flop_low": c["used_low"],
            "used_flop_high": c["used_high"], "projected_flop": c["projected"], "crossing": c["basis"],
            "basis": combined_basis(c["runs"]), "run": combined_run(c["runs"]), "runs": c["runs"],
        }
        if outcome == "needs_review":
            evidence["suggested_inquiry"] = inquiry_text(state.account_id, None, c["used"], c["projected"])
        workloads = sorted({w for r in c["runs"].values() for w in r.get("workloads", [])})
        summary = (f"beneficial owner {owner.owner_id}: {len(c['runs'])} runs over {len(owner.accounts)} accounts "
                   f"{'used' if c['basis'] == 'used' else 'are projected to use'} "
                   f">= {state.policy.thresholds.training_ops:.3g} FLOP -> {outcome}")
        return [self.detection(state, outcome=outcome, reason="owner_aggregate", event_time=c["at"], summary=summary,
                               evidence=evidence, beneficial_owner_id=owner.owner_id, workload_ids=workloads)]
