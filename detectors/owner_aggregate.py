"""Owner aggregation (case semantics rule 4): one foreign beneficial owner's runs summed across its accounts.

The engine describes each run of an account with foreign owners as a *contribution* per owner: the run's latest
cumulative figures (replacing, never adding to, what the owner had for that run, so a replay is harmless), plus
what the detection needs about the account (its foreign-person determination and CIP notes). `OwnerAggregator`
applies contributions and retractions (the CIP no longer names the owner) to per-owner state and emits the
owner-aggregate detection when the sum first crosses. In process the engine calls it directly; on Kafka the
contributions travel on a topic keyed by owner to an agent that holds the owners (pipeline/detect/faust_app.py),
so accounts of one owner on different partitions are summed all the same.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from detectors.base import DetectContext, Detector, inquiry_text
from detectors.foreign_person import ForeignDetermination
from detectors.state import RUN_IDS_K, AccountState, OwnerState
from schemas.detection import Detection
from schemas.policy import Policy


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


def contribution(owner_id: str, account_id: str, run_id: str, entry: dict[str, Any], *, t: float,
                 start: float | None, foreign_since: float | None, determination: dict[str, Any],
                 cip_notes: list[dict[str, Any]]) -> dict[str, Any]:
    """One run's latest cumulative figures (`entry`, as OwnerState.runs holds them) for one owner, as plain data."""
    return {"owner_id": owner_id, "account_id": account_id, "run_id": run_id, "entry": entry, "t": t,
            "start": start, "foreign_since": foreign_since, "determination": determination,
            "cip_notes": cip_notes}


def retraction(owner_id: str, account_id: str) -> dict[str, Any]:
    """The account no longer counts for the owner (its CIP stopped naming it as a foreign owner)."""
    return {"owner_id": owner_id, "account_id": account_id, "run_id": None}


class OwnerAggregator:
    """Per-owner sums of contributions; the owner-aggregate detection when one first crosses. Pure, event time."""

    def __init__(self, policy: Policy, window_s: float = 60.0, detector: Detector | None = None,
                 errors: dict[str, int] | None = None) -> None:
        self.policy = policy
        self.window_s = window_s
        self.detector = detector  # None: owner sums are kept, no detection (the detector is not configured)
        self.owners: dict[str, OwnerState] = {}
        self.errors = errors if errors is not None else {}

    def apply(self, c: Mapping[str, Any]) -> list[Detection]:
        """Apply one contribution or retraction; the detection when this owner's sum first crosses."""
        oid, aid = c["owner_id"], c["account_id"]
        if c.get("run_id") is None:
            owner = self.owners.get(oid)
            if owner is not None and aid in owner.accounts:
                owner.accounts.remove(aid)
                owner.runs = {k: r for k, r in owner.runs.items() if r["account_id"] != aid}
            return []
        th = self.policy.thresholds
        owner = self.owners.get(oid)
        if owner is None:
            owner = self.owners[oid] = OwnerState(oid)
        if aid not in owner.accounts:
            owner.accounts.append(aid)
            owner.accounts.sort()
        before = sum(r["used"] for r in owner.runs.values() if not r.get("own_case"))
        owner.runs[c["run_id"]] = dict(c["entry"])
        if owner.crossed is not None:
            return []
        end, start = c["t"], c.get("start")
        x = owner_crossing(owner, threshold=th.training_ops, count_projected=th.count_projected, t=end,
                           account_id=aid)
        if x is None:
            return []
        if x["basis"] == "used" and start is not None and x["used"] > before:
            frac = min(1.0, max(0.0, (th.training_ops - before) / (x["used"] - before)))
            x["at"] = start + frac * (end - start)
        if c.get("foreign_since") is not None:
            x["at"] = max(x["at"], c["foreign_since"])
        owner.crossed = x
        if self.detector is None:
            return []
        ctx = DetectContext(self.policy, self.window_s, aid, ForeignDetermination(**c["determination"]),
                            account=AccountState(aid, cip_notes=list(c.get("cip_notes") or [])), owner=owner,
                            knowledge_floor=c.get("foreign_since"))
        try:
            return self.detector.detect(ctx, None)
        except Exception:  # errors are data, as in the engine: count it, never stop the stream
            self.errors[self.detector.id] = self.errors.get(self.detector.id, 0) + 1
            return []

    def to_dict(self) -> dict[str, Any]:
        return {k: v.to_dict() for k, v in self.owners.items()}

    def load(self, d: Mapping[str, Any]) -> None:
        self.owners = {k: OwnerState.from_dict(v) for k, v in d.items()}
