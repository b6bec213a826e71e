"""The detector base class, its declared hooks, and the read-only context the engine hands every detector.

A detector is a small class with one job: `__init__` stores parameters only; class attributes carry a stable id,
version, severity, maturity and a one-line description; `detect(state, event)` returns a list of Detections
(empty for nothing), never None, and never raises on odd-but-valid input. Everything the engine may call is
declared on `Detector` with a no-op default (`update`, `claims_run`) or a class attribute (`owner_level`,
`reevaluates_runs_on_cip`), so the engine never asks for a detector by name and a new one needs no engine change.
Which detectors exist is the explicit tuple `detectors.registry.DETECTORS`; which run, and with what parameters,
is configuration (`registry.build`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from detectors.classifier_base import Verdict
from detectors.foreign_person import ForeignDetermination
from detectors.state import WORKLOAD_IDS_K, AccountState, OwnerState, RunState
from schemas.cip import CipRecord
from schemas.detection import Detection, Outcome, Severity
from schemas.ids import content_id
from schemas.policy import Policy


@dataclass(frozen=True, slots=True)
class DetectContext:
    """Everything a detector may read about one account at one event. Built by the engine; detectors never mutate."""

    policy: Policy
    window_s: float
    account_id: str
    determination: ForeignDetermination
    cip: CipRecord | None = None
    account: AccountState | None = None
    run: RunState | None = None
    run_workloads: list[str] = field(default_factory=list)
    run_stitching: list[dict[str, Any]] = field(default_factory=list)
    owner: OwnerState | None = None
    verdict: Verdict | None = None
    knowledge_floor: float | None = None  # no knowledge before this event time (e.g. the CIP that made them foreign)


class Detector:
    """Base of every detector. The engine (detectors/engine.py) calls, per input (window, CIP record, allocation):
    for each configured detector that is not `owner_level`, `update(ctx, event)` then `detect(ctx, event)`; one
    detector's exception is counted in `engine.errors[id]` and the others still run."""

    id: ClassVar[str] = ""
    version: ClassVar[int] = 1
    severity: ClassVar[Severity] = "medium"
    maturity: ClassVar[str] = "experimental"  # experimental | test | stable
    description: ClassVar[str] = ""
    example_params: ClassVar[dict[str, Any]] = {}
    #: True: the engine never runs it on an account's input; the owner aggregator (detectors/owner_aggregate.py)
    #: calls `detect(ctx, None)` once, when a foreign owner's summed runs first cross, with `ctx.owner` set.
    owner_level: ClassVar[bool] = False
    #: True: on a CIP record the engine also calls `update` / `detect` once per live run of the account, with that
    #: run's context (for a detector whose outcome depends on the customer's foreign status, which may come late).
    reevaluates_runs_on_cip: ClassVar[bool] = False
    #: True: its detection is dated by the first qualifying event the account has seen, so one re-found dated
    #: earlier (that event was fetched late: topics are read in fetch order) supersedes the one emitted under its id,
    #: as the replay, which read it in order, would have dated it; one dated later is the same finding, not emitted.
    dated_by_first_event: ClassVar[bool] = False
    #: True: its `detect` reads a run's crossing (`ctx.run.crossed`), so when a reservation read late re-dates the
    #: crossing (DetectEngine._late_reservation) the engine calls `detect(ctx, None)` again (not `update`: the
    #: reservation was folded in already) with the run's context, once per verdict the run has had since then.
    reads_run_crossing: ClassVar[bool] = False

    def update(self, state: DetectContext, event: Any) -> None:
        """Fold `event` into state this detector keeps (in `state.account`); `detect` then only reads it.

        Called by the engine just before `detect` with the same (state, event), every time `detect` is called on an
        account's input (not for `owner_level` detectors). Default: the detector keeps no state.
        """

    def detect(self, state: DetectContext, event: Any) -> list[Detection]:
        """The detections `event` (a window, CIP record or allocation; None from the owner aggregator, or for a run
        whose crossing was re-dated: `reads_run_crossing`) causes."""
        raise NotImplementedError

    def claims_run(self, det: Detection) -> bool:
        """Whether `det` (one of this detector's detections, with a run id) opens a case of its own for its run.

        Called by the engine on every detection of a run's window or CIP re-evaluation: a claimed run is marked
        `own_case` and leaves its foreign owners' sums (case semantics rule 4). Default: no claim.
        """
        return False

    def detection(self, ctx: DetectContext, *, outcome: Outcome, reason: str, event_time: float, summary: str,
                  evidence: dict[str, Any], run_id: str | None = None, beneficial_owner_id: str | None = None,
                  workload_ids: list[str] | None = None, source_windows: list[str] | None = None,
                  severity: Severity | None = None, workloads_total: int | None = None) -> Detection:
        """A Detection with a content-derived id and the provenance every detection carries. At most
        `WORKLOAD_IDS_K` workload ids are listed (the first); with more (`workloads_total`, when the caller knows
        more than it lists) the evidence says how many (`workload_ids_total`)."""
        p = ctx.policy
        ids = list(workload_ids or [])
        total = max(len(ids), workloads_total or 0)
        did = content_id("det", self.id, p.id, p.version, ctx.account_id, beneficial_owner_id, run_id, outcome,
                         reason)
        ev = {"detector": {"id": self.id, "version": self.version, "maturity": self.maturity},
              "policy": {"id": p.id, "version": p.version, "demo": p.demo},
              "foreign_person": ctx.determination.to_dict(), **evidence}
        if total > WORKLOAD_IDS_K or total > len(ids):
            ev["workload_ids_total"] = total
        if ctx.verdict is not None:
            ev.setdefault("classifier", ctx.verdict.to_dict())
        if ctx.account is not None and ctx.account.cip_notes:
            ev.setdefault("cip_notes", list(ctx.account.cip_notes))
        return Detection(detection_id=did, detector_id=self.id, detector_version=self.version,
                         severity=severity or self.severity, policy_id=p.id, policy_version=p.version,
                         outcome=outcome, reason=reason, account_id=ctx.account_id,
                         beneficial_owner_id=beneficial_owner_id, run_id=run_id, workload_ids=ids[:WORKLOAD_IDS_K],
                         event_time=float(event_time), summary=summary, evidence=ev,
                         source_windows=source_windows or [])


def inquiry_text(account_id: str, run_id: str | None, used: float, projected: float | None) -> str:
    """Suggested customer inquiry for a workload of uncertain type: an attestation of its purpose."""
    proj = f" and is projected to reach {projected:.3g} FLOP under the current reservation" if projected else ""
    return (f"Account {account_id}: workload {run_id or ''} has used about {used:.3g} operations{proj}. Please attest "
            "to the purpose of this workload: is it, or could it result in, the training of an AI model (including "
            "fine-tuning)? If so, state the model's intended use and the total compute planned for the run; "
            "if not, describe the workload (e.g. inference serving, simulation, rendering, data processing).")
