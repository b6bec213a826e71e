"""The case book: detections in, case versions and audit events out. Pure: no I/O, no clock reads.

Processing time (`now`, an analyst's `at`) is passed in; knowledge and due dates come from event time only.

Rules (ARCHITECTURE.md "Case semantics" 6-7):

- **Identity of a case.** case_id = content_id over (policy id, subject, run): subject = the beneficial owner for
  an owner case (the detection names one), else the account; run = the detection's run_id, or its reason for
  run-less cases (special measures, owner aggregates). Every detector's finding on one run lands on one case.
- **Opening.** reportable -> open, needs_review -> needs_review, monitored -> monitored; `info` never opens a case
  (it is recorded as evidence on a case that exists).
- **Knowledge.** knowledge_at = the earliest event_time of any applied detection that met the standard: outcome
  reportable, or needs_review when `policy.uncertainty.needs_review_is_knowledge`. A late, out-of-order detection
  with an earlier event time moves it earlier, and gives the case its reason (the case's reason is the finding
  that dates it, in any arrival order; a tie keeps the earlier). due_at follows from knowledge_at (`due_at()` below).
- **Re-decided detections.** The engine re-emits a detection it re-decided on corrected figures under the same id
  with other content. There is no version field: versions of an id are ordered by arrival (the detections topic is
  keyed by account, so one id's versions stay in order), and a version already received is a redelivery. The new
  version replaces the old in the evidence; when the old one dated the case, knowledge_at is taken again from the
  latest version of each finding counted since the clock started, so it can move later (due_at with it): the
  event is `redecided` with knowledge_at / due_at from -> to, `why` and `supersedes` (the replaced version). A
  detection the corrected history no longer makes is not withdrawn by the engine: it stands. A finding dated by
  its first event (special measures, `Detector.dated_by_first_event`) is the exception: a version dated later is
  kept as received and changes nothing, so its date is the earliest of its versions in any arrival order (after a
  restart the engine can make the later dating again before the earlier event is read again).
- **Upgrades.** needs_review + reportable -> open ("confirmed"); monitored + needs_review/reportable -> that status
  ("escalated", e.g. a CIP update showed a foreign owner). The pipeline never downgrades a case (but see
  Revisions): only an analyst dismisses. acknowledged and reported cases take new evidence without a status change.
- **Revisions.** The one change the pipeline makes downwards: a case opened (open / needs_review) only while the
  customer was unknown and counted as foreign, when a CIP record that arrived late shows a U.S. person: a run over
  the threshold becomes `monitored` (action `revised`) unless it was judged not training (a U.S. person's run is
  monitored then, `outcome_for`); findings that open no case for a U.S. person (that not_training verdict, a
  reservation) are withdrawn (action `withdrawn`, dismissed by the pipeline); knowledge_at and due_at are cleared.
  The record may reach the book before such a finding (on Kafka the identity update and the detections travel
  apart): the finding is then revised as it is applied, so both orders end the same. Owner cases and acknowledged
  or reported cases only record the new evidence.
- **Dismissed cases reopen only on new, stronger evidence**: a detection not applied before, whose outcome ranks
  above every outcome the analyst saw when dismissing (info < monitored < needs_review < reportable), or that has
  the top outcome seen with a reason not seen then (e.g. compute_used after a dismissed compute_projected).
  Updated figures of a detector and reason already seen are kept as evidence but reopen nothing. A reopened
  case's clock restarts at the reopening detection's event time (the dismissal said the earlier evidence was not
  knowledge).
- **Idempotence.** The case keeps, per detection id, the fingerprints of the versions of it received
  (`evidence.versions`: id -> fingerprints in arrival order, the latest last; at most MAX_VERSIONS_PER_ID per id).
  A replayed detection, or a redelivery of any version of its id already received, is skipped however many other
  findings the case took since (the bound is per id, not per case: only an id re-decided more than
  MAX_VERSIONS_PER_ID times forgets its oldest versions; versions superseded within one batch are kept as received
  too), so replays yield no new version and no event; any new content (a new detection, or new figures under an old
  detection id) bumps the version once per batch. Cases stored before kept one list for the whole case
  (`evidence.applied`, the newest 512 fingerprints): it is still read, no longer grown. **Bound:** versions carry
  no order but arrival, so the engine re-deciding a finding back to the exact content of an earlier version (A, B,
  then A again) is taken for a redelivery of A: the case keeps B until the id's next version. A redelivery (Kafka
  re-reading from a committed offset, a replay) cannot be told from that by content; only a version order carried
  by the detection could.
- **Business days** (`reporting.day_kind = "business"`): UTC calendar, Saturdays and Sundays skipped, no public
  holidays; knowledge on a weekend starts counting at the next Monday 00:00 UTC; the due time keeps the time of
  day of knowledge. Reminders are in calendar days before that due time.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import cache
from typing import Any

from detectors.foreign_person import determine
from detectors.registry import registered
from schemas import serde
from schemas.case import LABEL_REASON_CODES, REPORTABLE_STATUSES, Case, CaseEvent, CaseLabel
from schemas.cip import CipRecord
from schemas.detection import Detection
from schemas.errors import TrainwatchError
from schemas.ids import content_id
from schemas.policy import Policy, Reporting

#: How strong an outcome is, for "stronger evidence" and for upgrades.
OUTCOME_RANK: dict[str, int] = {"info": 0, "monitored": 1, "needs_review": 2, "reportable": 3}
_STATUS_FOR_OUTCOME: dict[str, str] = {"reportable": "open", "needs_review": "needs_review", "monitored": "monitored"}
#: Fingerprints kept per detection id (evidence.versions) to tell a redelivery from a new version; a version older
#: than this many versions of its own id, redelivered, would apply again. The engine emits a new version of an id only
#: for a correction inside its re-decide journal (20 windows), so ids have few: at most 3 in the scope replay at 4
#: telemetry partitions (70 ids, 14 re-decided), 2 in the demo's.
MAX_VERSIONS_PER_ID = 64
PIPELINE_ACTOR = "pipeline"
INQUIRY_SENT = "inquiry_sent"
INQUIRY_ESCALATED = "inquiry_escalated"
DEFAULT_INQUIRY = (
    "Telemetry alone cannot tell whether this workload trains a model. Ask the customer what the workload on "
    "account {account} does (training, fine-tuning, inference, other) and, if it trains a model, its planned "
    "total compute."
)


class CaseError(TrainwatchError):
    """A case action could not be carried out."""


class UnknownCase(CaseError):
    """No case with that id."""


class IllegalTransition(CaseError):
    """The action is not allowed from the case's current status."""


@dataclass
class CaseChanges:
    """What to write: the new version of each changed case, and the audit events in event-time order."""

    cases: list[Case] = field(default_factory=list)
    events: list[CaseEvent] = field(default_factory=list)
    labels: list[CaseLabel] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.cases or self.events or self.labels)

    def extend(self, other: CaseChanges) -> None:
        self.cases += other.cases
        self.events += other.events
        self.labels += other.labels


# ---- pure helpers ------------------------------------------------------------------------------------------------


def case_id_for(det: Detection) -> str:
    """The case a detection belongs to (see module docstring)."""
    subject = f"owner:{det.beneficial_owner_id}" if det.beneficial_owner_id else f"account:{det.account_id}"
    run = f"run:{det.run_id}" if det.run_id else f"reason:{det.reason}"
    return content_id("case", det.policy_id, subject, run)


def fingerprint(det: Detection) -> str:
    """Content hash of a whole detection: equal for a replay, different for any new figure."""
    return content_id("det", serde.dumps(det.model_dump(mode="json"), sort_keys=True).decode())


@cache
def _dated_by_first_event(detector_id: str) -> bool:
    """Its detector dates it by the first qualifying event (Detector.dated_by_first_event): its versions' earliest
    date holds, in whatever order they come (special measures; detectors/engine.py re-emits one only earlier)."""
    cls = registered().get(detector_id)
    return cls is not None and cls.dated_by_first_event


def due_at(knowledge_at: float | None, reporting: Reporting) -> float | None:
    """knowledge_at + the policy's window, in calendar days or business days (module docstring)."""
    if knowledge_at is None:
        return None
    if reporting.day_kind == "calendar":
        return knowledge_at + reporting.window_days * 86_400.0
    return add_business_days(knowledge_at, reporting.window_days)


def add_business_days(t: float, days: float) -> float:
    """Add `days` business days (Mon-Fri, UTC, no holidays) to epoch time t; a fraction is added as hours after."""
    dt = datetime.fromtimestamp(t, UTC)
    if dt.weekday() >= 5:  # knowledge on a weekend: count from the next Monday 00:00
        dt = (dt + timedelta(days=7 - dt.weekday())).replace(hour=0, minute=0, second=0, microsecond=0)
    whole = int(days)
    for _ in range(whole):
        dt += timedelta(days=1)
        while dt.weekday() >= 5:
            dt += timedelta(days=1)
    return dt.timestamp() + (days - whole) * 86_400.0


def identity_snapshot(cip: CipRecord | None, owner_id: str | None = None) -> dict[str, Any]:
    """The report's identity block from the latest CIP record: customer, owners, reseller, and for an owner case the
    owner the case is about. Missing fields stay None / empty and are listed under `missing`."""
    if cip is None:
        return {"cip_on_file": False, "missing": ["cip_record"]}
    snap: dict[str, Any] = {
        "cip_on_file": True,
        "cip_updated_at": cip.updated_at,
        "account_id": cip.account_id,
        "name": cip.customer_name,
        "customer_type": cip.customer_type,
        "country": cip.country,
        "address": cip.address,
        "us_person": cip.us_person,
        "payment_means": cip.payment_means,
        "payment_source": cip.payment_source,
        "emails": list(cip.emails),
        "phones": list(cip.phones),
        "ip_addresses": [ip.model_dump(mode="json") for ip in cip.ip_addresses],
        "national_id": cip.national_id,
        "beneficial_owners": [o.model_dump(mode="json") for o in cip.beneficial_owners],
        "reseller": cip.reseller.model_dump(mode="json") if cip.reseller else None,
        "verification_status": cip.verification_status,
        "verified_at": cip.verified_at,
    }
    if owner_id is not None:
        owner = next((o for o in cip.beneficial_owners if o.owner_id == owner_id), None)
        snap["subject_owner"] = owner.model_dump(mode="json") if owner else {"owner_id": owner_id}
    required = ("name", "address", "payment_means", "payment_source", "emails", "phones", "ip_addresses")
    snap["missing"] = [k for k in required if snap[k] in (None, [], "")]
    return snap


def _dismissal_allows_reopen(dismissal: Mapping[str, Any], det: Detection) -> bool:
    rank = OUTCOME_RANK[det.outcome]
    seen_rank = int(dismissal.get("max_rank", -1))
    return rank > seen_rank or (rank == seen_rank and det.reason not in dismissal.get("reasons", []))


def _stood_on_unknown(case: Case) -> bool:
    """Every finding that opened or upgraded this (non-owner, pipeline-set open / needs_review) case was made while
    the customer was unknown and counted as foreign."""
    if case.beneficial_owner_id or case.status not in ("open", "needs_review"):
        return False
    strong = [e for e in case.evidence.get("detections", {}).values() if e["outcome"] in ("reportable", "needs_review")]
    return bool(strong) and all((e.get("evidence", {}).get("foreign_person") or {}).get("status") == "unknown"
                                for e in strong)


def _revised_to_us_person(case: Case, det: Detection) -> bool:
    """A late CIP record revises (rule "Revisions" in the module docstring): a `monitored` finding on a pipeline-set
    open / needs_review case, made under a complete U.S.-person determination, where every finding that opened or
    upgraded the case was made while the customer was unknown (counted as foreign by the policy)."""
    if det.outcome != "monitored" or case.status not in ("open", "needs_review"):
        return False
    return (det.evidence.get("foreign_person") or {}).get("status") == "us_person" and _stood_on_unknown(case)


def _entry_fp(case: Case, detection_id: str) -> str | None:
    """The fingerprint of the version of a detection the case holds now (None: not in its evidence)."""
    entry = case.evidence.get("detections", {}).get(detection_id)
    return entry.get("fingerprint") if entry else None


def received(case: Case, det: Detection, fp: str) -> bool:
    """This version of `det` reached the case before (a replay or a redelivery: it changes nothing): among the
    versions kept for its id, the one the case holds, or (cases stored before evidence.versions) the case's list."""
    return (fp in case.evidence.get("versions", {}).get(det.detection_id, ())
            or _entry_fp(case, det.detection_id) == fp or fp in case.evidence.get("applied", ()))


def holds_event(case: Case, event: CaseEvent) -> bool:
    """Whether the stored `case` reflects `event`. A finding's event is written before its case (CaseService._write),
    so a crash between the two leaves the event without the case version it made: its input is read again and
    re-derives both, under the same event id. False only for such a finding event: its id is made from a version
    (fingerprint) the case does not hold. Events of other kinds (actions, deadlines) are always held."""
    det_id = event.details.get("detection_id")
    if event.actor != PIPELINE_ACTOR or not isinstance(det_id, str):
        return True
    ev = case.evidence
    fps = {*ev.get("versions", {}).get(det_id, ()), _entry_fp(case, det_id), *ev.get("applied", ())} - {None}
    return any(content_id("cev", case.case_id, event.action, event.at, fp) == event.event_id for fp in fps)


def _with_version(versions: Mapping[str, list[str]], detection_id: str, fp: str) -> dict[str, list[str]]:
    """`versions` with `fp` received as the latest version of `detection_id` (the newest MAX_VERSIONS_PER_ID kept)."""
    seen = [v for v in versions.get(detection_id, []) if v != fp]
    return {**versions, detection_id: [*seen, fp][-MAX_VERSIONS_PER_ID:]}


def _fold(versions: dict[str, list[str]], detection_id: str, before: Sequence[str]) -> None:
    """Record in place versions of `detection_id` received before the latest one `versions` holds for it."""
    have = versions.get(detection_id, [])
    head, last = have[:-1], have[-1:]
    kept = [v for v in head if v not in before] + [v for v in before if v not in last]
    versions[detection_id] = (kept + last)[-MAX_VERSIONS_PER_ID:]


def _detection_entry(det: Detection, fp: str) -> dict[str, Any]:
    return {
        "detector_id": det.detector_id,
        "detector_version": det.detector_version,
        "severity": det.severity,
        "outcome": det.outcome,
        "reason": det.reason,
        "event_time": det.event_time,
        "summary": det.summary,
        "workload_ids": list(det.workload_ids),
        "source_windows": list(det.source_windows),
        "policy_version": det.policy_version,
        "evidence": det.evidence,
        "fingerprint": fp,
    }


def _content(case: Case) -> dict[str, Any]:
    # What counts as a change: everything but the bookkeeping a change itself sets.
    return case.model_dump(exclude={"updated_at", "version"})


#: (label, reason code) an analyst gives when closing a case; None = the default for the closing action.
Label = tuple[str, str] | None
_DEFAULT_LABELS: dict[str, tuple[str, str]] = {
    "reported": ("true_positive", "reported"),
    "dismissed": ("false_positive", "other"),
    "review_not_training": ("false_positive", "not_training"),
    "attested": ("false_positive", "customer_attested_not_training"),
}


def check_label(label: Label) -> Label:
    """A label the store accepts, or a CaseError naming the choices."""
    if label is None:
        return None
    value, code = label
    if value not in ("true_positive", "false_positive"):
        raise CaseError(f"label {value!r}: choose true_positive or false_positive")
    if code not in LABEL_REASON_CODES:
        raise CaseError(f"reason code {code!r}: choose from {', '.join(LABEL_REASON_CODES)}")
    return value, code


def case_label(case: Case, label: tuple[str, str], actor: str, at: float, recorded_at: float) -> CaseLabel:
    """The label row of a closed case: what the flag was, from which detectors, in which classifier bands."""
    entries = list(case.evidence.get("detections", {}).values())
    bands = sorted({b for e in entries if (b := ((e.get("evidence") or {}).get("classifier") or {}).get("band"))})
    workloads = sorted({w for e in entries for w in e.get("workload_ids", [])})
    return CaseLabel(case_id=case.case_id, label=label[0], reason_code=label[1], actor=actor,  # type: ignore[arg-type]
                     at=at, recorded_at=recorded_at, policy_id=case.policy_id, account_id=case.account_id,
                     run_id=case.run_id, detectors=list(case.detectors), bands=bands, workload_ids=workloads)


# ---- the book ----------------------------------------------------------------------------------------------------


_PENDING_INFO_PER_CASE = 16
_PENDING_INFO_CASES = 10_000


class CaseBook:
    """Holds the latest version of each case and turns detections and analyst actions into CaseChanges.

    Every method returns the changes and also keeps them, so the book stays the state the caller is writing.
    """

    def __init__(self, policy: Policy, cases: Iterable[Case] = ()):
        self.policy = policy
        self._cases: dict[str, Case] = {}
        self._pending_info: dict[str, list[Detection]] = {}  # case id -> info detections awaiting their case
        #: case id -> detection id -> fingerprints of the versions of a pending info detection received (as
        #: evidence.versions, so a redelivered older version neither replaces the newer while it waits nor after).
        #: In memory: after a restart only the stored (latest) version is known (CaseService re-derives it), and an
        #: older one redelivered before the case opens replaces it until the next version comes
        self._pending_versions: dict[str, dict[str, list[str]]] = {}
        self.load(cases)

    def load(self, cases: Iterable[Case]) -> None:
        """Replace the book's copy of these cases (e.g. the store's latest, which an analyst may have changed)."""
        for c in cases:
            self._cases[c.case_id] = c

    def hold_info(self, detections: Iterable[Detection]) -> None:
        """Hold info detections whose case does not exist yet (as `apply` does; e.g. re-derived after a restart)."""
        for det in sorted(detections, key=lambda d: (d.event_time, d.detection_id)):
            cid = case_id_for(det)
            if det.outcome == "info" and cid not in self._cases:
                self._hold(cid, det, fingerprint(det))

    def _hold(self, cid: str, det: Detection, fp: str) -> None:
        pending = self._pending_info.setdefault(cid, [])
        versions = self._pending_versions.setdefault(cid, {})
        if fp not in versions.get(det.detection_id, ()):
            # a newer version of a held detection replaces it (arrival order, as in `apply`)
            pending[:] = [*(p for p in pending if p.detection_id != det.detection_id), det][-_PENDING_INFO_PER_CASE:]
            versions.update(_with_version(versions, det.detection_id, fp))
            for gone in versions.keys() - {p.detection_id for p in pending}:
                del versions[gone]
        while len(self._pending_info) > _PENDING_INFO_CASES:
            evicted = next(iter(self._pending_info))
            self._pending_info.pop(evicted)
            self._pending_versions.pop(evicted, None)

    def get(self, case_id: str) -> Case | None:
        return self._cases.get(case_id)

    @property
    def cases(self) -> list[Case]:
        return list(self._cases.values())

    def _knowledge(self, det: Detection) -> bool:
        return self._counts(det.outcome)

    def _counts(self, outcome: str) -> bool:
        """An outcome that meets the knowledge standard under this policy."""
        return outcome == "reportable" or (
            outcome == "needs_review" and self.policy.uncertainty.needs_review_is_knowledge
        )

    # ---- detections ----------------------------------------------------------------------------------------------

    def apply(self, detections: Iterable[Detection], cips: Mapping[str, CipRecord], now: float) -> CaseChanges:
        """Apply detections (any order; sorted by event time for determinism). `cips`: latest record per account."""
        working: dict[str, Case] = {}
        events: list[CaseEvent] = []
        # Versions of one detection id are ordered by arrival (the engine re-emits a re-decided detection under its
        # id and carries no version field): within a batch only the last one received counts. The ones before it were
        # received too: they are kept with it, so that a later redelivery of one of them does not read as new.
        batch = list(detections)
        latest = {d.detection_id: d for d in batch}
        earlier: dict[str, list[str]] = {}
        for d in batch if len(latest) < len(batch) else ():
            if d is not latest[d.detection_id]:
                earlier.setdefault(d.detection_id, []).append(fingerprint(d))
        # Info after the detections that open cases at the same event time, so it can attach to them.
        for det in sorted(latest.values(), key=lambda d: (d.event_time, d.outcome == "info", d.detection_id)):
            cid = case_id_for(det)
            current = working.get(cid) or self._cases.get(cid)
            fp = fingerprint(det)
            if current is None:
                if det.outcome == "info":
                    # Info never opens a case, but it explains one that opens later: keep it until then, so a
                    # replay (which finds the case already open) attaches exactly what the first run did.
                    self._hold(cid, det, fp)
                    if det.detection_id in earlier and cid in self._pending_versions:
                        _fold(self._pending_versions[cid], det.detection_id, earlier[det.detection_id])
                    continue
                case, event = self._open(cid, det, fp, cips.get(det.account_id), now)
                for info in self._pending_info.pop(cid, []):
                    working[cid] = case
                    events.append(event)
                    case, event = self._merge(case, info, fingerprint(info), now)
                # the versions of those info detections received while they waited count as received
                for did, fps in self._pending_versions.pop(cid, {}).items():
                    _fold(case.evidence["versions"], did, fps)
            elif received(current, det, fp):
                continue  # a replay, or a redelivery of a version of this id already received (module docstring)
            else:
                case, event = self._merge(current, det, fp, now)
            if det.detection_id in earlier:  # (case's evidence is this change's own copy)
                _fold(case.evidence["versions"], det.detection_id, earlier[det.detection_id])
            working[cid] = case
            events.append(event)
        for cid, case in working.items():
            # A finding made while the customer was unknown, applied after the book learnt the CIP record that shows
            # a U.S. person (on Kafka the identity update and the detections travel apart): the revision that
            # record makes when it comes after (`refresh_identity`), so either arrival order ends the same
            cip = cips.get(case.account_id)
            if cip is not None and _stood_on_unknown(case) and determine(cip, self.policy).status == "us_person":
                working[cid], event = self._revision(case, cip, now)
                events.append(event)
        out = CaseChanges(events=events)
        for cid, case in working.items():
            case = self._with_inquiry(case, events, now)
            prior = self._cases.get(cid)
            if prior is not None and _content(prior) == _content(case):
                continue
            case = case.model_copy(update={"version": prior.version + 1 if prior else 1, "updated_at": now})
            self._cases[cid] = case
            out.cases.append(case)
        return out

    def _open(
        self, cid: str, det: Detection, fp: str, cip: CipRecord | None, now: float
    ) -> tuple[Case, CaseEvent]:
        status = _STATUS_FOR_OUTCOME[det.outcome]
        knowledge = det.event_time if self._knowledge(det) else None
        case = Case(
            case_id=cid,
            account_id=det.account_id,
            beneficial_owner_id=det.beneficial_owner_id,
            run_id=det.run_id,
            policy_id=det.policy_id,
            policy_version=det.policy_version,
            reason=det.reason,
            status=status,
            knowledge_at=knowledge,
            detected_at=now,
            due_at=due_at(knowledge, self.policy.reporting),
            updated_at=now,
            detectors=[det.detector_id],
            evidence={"detections": {det.detection_id: _detection_entry(det, fp)},
                      "versions": {det.detection_id: [fp]}},
            identity=identity_snapshot(cip, det.beneficial_owner_id),
            suggested_inquiry=self._inquiry(det) if status == "needs_review" else None,
        )
        event = self._event(case, det, fp, "opened", None, status, now, {"knowledge_at": knowledge})
        return case, event

    def _merge(self, case: Case, det: Detection, fp: str, now: float) -> tuple[Case, CaseEvent]:
        evidence = copy.deepcopy(case.evidence)
        # A detection id seen before with other content: the engine re-decided it; this version replaces the other.
        prev = evidence.setdefault("detections", {}).get(det.detection_id)
        if prev is not None and _dated_by_first_event(det.detector_id) and det.event_time >= prev["event_time"]:
            # A finding dated by its first event is never dated later by another version: one made again after a
            # restart, from state before the earlier event was read, is its first dating again (received, kept out)
            evidence["versions"] = _with_version(evidence.get("versions", {}), det.detection_id, fp)
            new = case.model_copy(update={"evidence": evidence})
            return new, self._event(new, det, fp, "evidence_added", case.status, case.status, now,
                                    {"kept": {"event_time": prev["event_time"], "why": "dated_by_first_event"}})
        evidence["detections"][det.detection_id] = _detection_entry(det, fp)
        evidence["versions"] = _with_version(evidence.get("versions", {}), det.detection_id, fp)
        status, knowledge, action = case.status, case.knowledge_at, "evidence_added"
        updates: dict[str, Any] = {}
        if case.status == "dismissed":
            if det.outcome != "info" and _dismissal_allows_reopen(evidence.get("dismissal", {}), det):
                status, action = _STATUS_FOR_OUTCOME[det.outcome], "reopened"
                knowledge = None  # the dismissal said the earlier evidence was not knowledge
                updates["dismiss_reason"] = None
        elif case.status == "needs_review" and det.outcome == "reportable":
            status, action = "open", "confirmed"
        elif case.status == "monitored" and det.outcome in ("reportable", "needs_review"):
            status, action = _STATUS_FOR_OUTCOME[det.outcome], "escalated"
        elif _revised_to_us_person(case, det):
            # The case stood only on "unknown counts as foreign"; a CIP record now shows a U.S. person: the standard
            # was never met. Not an analyst's downgrade: the pipeline's own earlier premise was wrong.
            status, action, knowledge = "monitored", "revised", None
            updates["suggested_inquiry"] = None
        if (prev is not None and action in ("evidence_added", "confirmed") and status in REPORTABLE_STATUSES
                and knowledge is not None and prev["event_time"] == knowledge and self._counts(prev["outcome"])):
            # The superseded version dated the case: date it again from the latest version of each finding counted
            # in this spell of the clock (not those before a dismissal or an earlier start: they never counted).
            counted = [e["event_time"] for did, e in case.evidence.get("detections", {}).items()
                       if did != det.detection_id and self._counts(e["outcome"]) and e["event_time"] >= knowledge]
            if counted or self._knowledge(det):
                knowledge = min(counted, default=float("inf"))
            # else the new version no longer meets the standard and nothing else does: the date stands (the pipeline
            # never downgrades a case; an analyst decides)
        if status in REPORTABLE_STATUSES and self._knowledge(det):
            knowledge = det.event_time if knowledge is None else min(knowledge, det.event_time)
            if det.reason != case.reason and (case.knowledge_at is None or det.event_time < case.knowledge_at) and (
                    knowledge == det.event_time):
                # The case's reason is the finding that dates it, whatever order the findings came in (on Kafka a
                # run's used crossing can arrive before the projected crossing a correction re-decides earlier)
                updates["reason"] = det.reason
        if status == "needs_review" and case.suggested_inquiry is None:
            updates["suggested_inquiry"] = self._inquiry(det)
        new = case.model_copy(
            update={
                **updates,
                "status": status,
                "knowledge_at": knowledge,
                "due_at": due_at(knowledge, self.policy.reporting),
                "detectors": sorted({*case.detectors, det.detector_id}),
                "evidence": evidence,
            }
        )
        details: dict[str, Any] = {}
        if knowledge != case.knowledge_at:
            details["knowledge_at"] = {"from": case.knowledge_at, "to": knowledge}
        if "reason" in updates:
            details["reason"] = {"from": case.reason, "to": updates["reason"]}
        if prev is not None:
            details["supersedes"] = {"fingerprint": prev.get("fingerprint"), "event_time": prev["event_time"],
                                     "outcome": prev["outcome"]}
            if "knowledge_at" in details:
                # the case's clock moved because the engine re-decided this finding on corrected figures
                action = "redecided" if action == "evidence_added" else action
                details["why"] = "detection_redecided"
                details["due_at"] = {"from": case.due_at, "to": new.due_at}
        return new, self._event(new, det, fp, action, case.status, status, now, details)

    def _with_inquiry(self, case: Case, events: list[CaseEvent], now: float) -> Case:
        """A case that has just become needs_review sends its customer inquiry through the feed: an `inquiry_sent`
        event (the text and the answer's deadline, `inquiry.respond_days` after) and `evidence.inquiry`, which the
        deadline tick escalates when no attestation comes by then. One inquiry per spell of needs_review."""
        if case.status != "needs_review" or (case.evidence.get("inquiry") or {}).get("open"):
            return case
        mine = [e for e in events if e.case_id == case.case_id]
        moved = [e.at for e in mine if e.to_status == "needs_review" and e.from_status != "needs_review"]
        # when it became needs_review; a case stored before inquiries existed: the event time that touches it now
        sent_at = max(moved or [e.at for e in mine] or [case.knowledge_at or case.detected_at])
        respond_by = sent_at + self.policy.inquiry.respond_days * 86_400.0
        inquiry = {"open": True, "sent_at": sent_at, "respond_by": respond_by, "text": case.suggested_inquiry}
        case = case.model_copy(update={"evidence": {**case.evidence, "inquiry": inquiry}})
        events.append(CaseEvent(
            event_id=content_id("cev", case.case_id, INQUIRY_SENT, sent_at), case_id=case.case_id, at=sent_at,
            recorded_at=now, actor=PIPELINE_ACTOR, action=INQUIRY_SENT, from_status="needs_review",
            to_status="needs_review", details={"inquiry": case.suggested_inquiry, "respond_by": inquiry["respond_by"]}))
        return case

    def _inquiry(self, det: Detection) -> str:
        return str(det.evidence.get("suggested_inquiry") or DEFAULT_INQUIRY.format(account=det.account_id))

    @staticmethod
    def _event(
        case: Case, det: Detection, fp: str, action: str, from_status: str | None, to_status: str, now: float,
        extra: dict[str, Any],
    ) -> CaseEvent:
        return CaseEvent(
            event_id=content_id("cev", case.case_id, action, det.event_time, fp),
            case_id=case.case_id,
            at=det.event_time,
            recorded_at=now,
            actor=PIPELINE_ACTOR,
            action=action,
            from_status=from_status,
            to_status=to_status,
            details={
                "detection_id": det.detection_id,
                "detector_id": det.detector_id,
                "outcome": det.outcome,
                "reason": det.reason,
                "summary": det.summary,
                **extra,
            },
        )

    def refresh_identity(self, cip: CipRecord, now: float) -> CaseChanges:
        """A newer CIP record updates the identity snapshot of the account's cases not yet reported or dismissed."""
        out = CaseChanges()
        us_person = determine(cip, self.policy).status == "us_person"
        for case in list(self._cases.values()):
            if case.account_id != cip.account_id or case.status in ("reported", "dismissed"):
                continue
            if us_person and _stood_on_unknown(case):
                out.extend(self._withdraw(case, cip, now))
                case = self._cases[case.case_id]
            if (case.identity.get("cip_updated_at") or float("-inf")) >= cip.updated_at:
                continue
            snap = identity_snapshot(cip, case.beneficial_owner_id)
            new = case.model_copy(update={"identity": snap, "version": case.version + 1, "updated_at": now})
            self._cases[case.case_id] = new
            out.cases.append(new)
            out.events.append(self._action_event(new, PIPELINE_ACTOR, cip.updated_at, now, "identity_updated",
                                                 case.status, case.status, {"cip_updated_at": cip.updated_at}))
        return out

    def _withdraw(self, case: Case, cip: CipRecord, now: float) -> CaseChanges:
        """Revisions (module docstring), as a new version of the stored case."""
        new, event = self._revision(case, cip, now)
        new = new.model_copy(update={"version": case.version + 1, "updated_at": now})
        self._cases[case.case_id] = new
        return CaseChanges([new], [event])

    def _revision(self, case: Case, cip: CipRecord, now: float) -> tuple[Case, CaseEvent]:
        """A case that stood only on "unknown counts as foreign", the customer now a U.S. person: what the detectors
        make of its findings for a U.S. person (`outcome_for`). A run over the threshold judged training or not
        judged not training becomes `monitored` (action `revised`); findings that open no case for a U.S. person (a
        not_training verdict that only a foreign customer's policy kept open, a reservation) are withdrawn (dismissed
        by the pipeline). The case, not yet versioned, and its audit event."""
        monitored = any(e["outcome"] == "reportable" or (
            e.get("detector_id") == "compute_threshold"
            and ((e.get("evidence") or {}).get("classifier") or {}).get("band") != "not_training")
            for e in case.evidence.get("detections", {}).values() if e["outcome"] in ("reportable", "needs_review"))
        to, action = ("monitored", "revised") if monitored else ("dismissed", "withdrawn")
        updates: dict[str, Any] = {"status": to, "knowledge_at": None, "due_at": None, "suggested_inquiry": None}
        if to == "dismissed":
            updates["dismiss_reason"] = f"withdrawn: the CIP record of {cip.updated_at} shows a U.S. person"
            updates["evidence"] = self._with_dismissal(case, cip.updated_at)
        new = case.model_copy(update=updates)
        details = {"cip_updated_at": cip.updated_at, "knowledge_at": {"from": case.knowledge_at, "to": None},
                   "why": "cip_shows_us_person"}
        return new, self._action_event(new, PIPELINE_ACTOR, cip.updated_at, now, action, case.status, to, details)

    # ---- analyst actions -----------------------------------------------------------------------------------------

    def ack(self, case_id: str, actor: str, at: float, note: str = "") -> CaseChanges:
        """An analyst takes the case: open -> acknowledged (the note, why, goes into the audit event)."""
        return self._transition(case_id, actor, at, "acknowledged", ("open",), "acknowledged", {},
                                note if note.strip() else None)

    def report(self, case_id: str, actor: str, at: float, filing_reference: str, label: Label = None) -> CaseChanges:
        """The report was filed: open | needs_review | acknowledged -> reported, with the filing reference."""
        if not filing_reference.strip():
            raise CaseError(f"{case_id}: a filing reference is required to mark a case reported")
        return self._transition(
            case_id, actor, at, "reported", ("open", "needs_review", "acknowledged"), "reported",
            {"filing_reference": filing_reference}, label=label,
        )

    def dismiss(self, case_id: str, actor: str, at: float, reason: str, label: Label = None) -> CaseChanges:
        """Not a reportable matter: any status but reported/dismissed -> dismissed, with the reason."""
        if not reason.strip():
            raise CaseError(f"{case_id}: a reason is required to dismiss a case")
        return self._transition(
            case_id, actor, at, "dismissed", ("open", "needs_review", "acknowledged", "monitored"), "dismissed",
            {"dismiss_reason": reason}, label=label,
        )

    def decide_review(self, case_id: str, actor: str, at: float, is_training: bool, note: str,
                      label: Label = None) -> CaseChanges:
        """Close a needs_review case: training -> open (knowledge at the latest now, if not counted before), not
        training -> dismissed (a later stronger detection reopens it)."""
        if is_training:
            case = self._require(case_id)
            knowledge = case.knowledge_at if case.knowledge_at is not None else at
            return self._transition(
                case_id, actor, at, "review_training", ("needs_review",), "open",
                {"knowledge_at": knowledge, "due_at": due_at(knowledge, self.policy.reporting)}, note=note,
            )
        return self._transition(
            case_id, actor, at, "review_not_training", ("needs_review",), "dismissed",
            {"dismiss_reason": f"review: not training: {note}"}, note=note, label=label,
        )

    def attest(self, case_id: str, actor: str, at: float, is_training: bool, document: str,
               label: Label = None) -> CaseChanges:
        """Record the customer's answer to a needs_review inquiry (the document is the signed answer's reference):
        training -> open, knowledge_at at the attestation unless the policy already counted the uncertain finding
        as knowledge (the clock never moves later); not training -> dismissed (stronger evidence reopens it)."""
        if not document.strip():
            raise CaseError(f"{case_id}: a document reference is required to record an attestation")
        case = self._require(case_id)
        inquiry = {**(case.evidence.get("inquiry") or {}), "open": False, "answered_at": at,
                   "training": is_training, "document": document}
        evidence = {**case.evidence, "inquiry": inquiry}
        details = {"training": is_training, "document": document, "inquiry_sent_at": inquiry.get("sent_at")}
        if is_training:
            knowledge = case.knowledge_at if case.knowledge_at is not None else at
            return self._transition(case_id, actor, at, "attested", ("needs_review",), "open",
                                    {"knowledge_at": knowledge, "due_at": due_at(knowledge, self.policy.reporting),
                                     "evidence": evidence}, extra=details)
        return self._transition(case_id, actor, at, "attested", ("needs_review",), "dismissed",
                                {"dismiss_reason": f"customer attested not training (document {document})",
                                 "evidence": evidence}, extra=details, label=label)

    def relabel(self, case_id: str, actor: str, at: float, label: tuple[str, str]) -> CaseChanges:
        """Change the label of a closed (reported or dismissed) case; audited as `labelled`."""
        value, code = check_label(label) or label
        case = self._require(case_id)
        if case.status not in ("reported", "dismissed"):
            raise IllegalTransition(f"{case_id}: only a closed (reported or dismissed) case takes a label; it is "
                                    f"{case.status}")
        if not actor.strip():
            raise CaseError(f"{case_id}: an actor is required")
        new = case.model_copy(update={"version": case.version + 1, "updated_at": at})
        self._cases[case_id] = new
        event = self._action_event(new, actor, at, at, "labelled", case.status, case.status,
                                   {"label": value, "reason_code": code})
        return CaseChanges([new], [event], [case_label(new, (value, code), actor, at, at)])

    def escalate_inquiries(self, cases: Iterable[Case], event_now: float, recorded_at: float,
                           emitted: set[str]) -> CaseChanges:
        """needs_review cases whose inquiry went unanswered past its `respond_by` (event time): one escalation each
        (`inquiry.on_timeout`: "escalate" = an audit event and a feed message; "open" = also open the case as
        training, knowledge at the deadline unless already counted)."""
        out = CaseChanges()
        for case in cases:
            inquiry = case.evidence.get("inquiry") or {}
            if case.status != "needs_review" or not inquiry.get("open") or inquiry["respond_by"] > event_now:
                continue
            event_id = content_id("cev", case.case_id, INQUIRY_ESCALATED, inquiry["respond_by"])
            if event_id in emitted:
                continue
            emitted.add(event_id)
            at = float(inquiry["respond_by"])
            details = {"inquiry_sent_at": inquiry["sent_at"], "respond_by": at,
                       "on_timeout": self.policy.inquiry.on_timeout}
            to, updates = "needs_review", {}
            if self.policy.inquiry.on_timeout == "open":
                knowledge = case.knowledge_at if case.knowledge_at is not None else at
                to = "open"
                updates = {"knowledge_at": knowledge, "due_at": due_at(knowledge, self.policy.reporting),
                           "evidence": {**case.evidence, "inquiry": {**inquiry, "open": False, "escalated_at": at}}}
            self._cases[case.case_id] = new = case.model_copy(
                update={**updates, "status": to, "version": case.version + 1, "updated_at": recorded_at})
            out.cases.append(new)
            out.events.append(CaseEvent(event_id=event_id, case_id=case.case_id, at=at, recorded_at=recorded_at,
                                        actor=PIPELINE_ACTOR, action=INQUIRY_ESCALATED, from_status=case.status,
                                        to_status=to, details=details))
        return out

    def _require(self, case_id: str) -> Case:
        case = self._cases.get(case_id)
        if case is None:
            raise UnknownCase(f"{case_id}: no such case")
        return case

    def _transition(
        self, case_id: str, actor: str, at: float, action: str, allowed: tuple[str, ...], to: str,
        updates: dict[str, Any], note: str | None = None, extra: dict[str, Any] | None = None,
        label: Label = None,
    ) -> CaseChanges:
        case = self._require(case_id)
        if not actor.strip():
            raise CaseError(f"{case_id}: an actor is required")
        if case.status not in allowed:
            raise IllegalTransition(
                f"{case_id}: action '{action}' is not allowed on a case that is {case.status} "
                f"(allowed from: {', '.join(allowed)})"
            )
        if to == "dismissed":
            base = case.model_copy(update={"evidence": updates["evidence"]}) if "evidence" in updates else case
            updates = {**updates, "evidence": self._with_dismissal(base, at)}
        new = case.model_copy(update={**updates, "status": to, "version": case.version + 1, "updated_at": at})
        self._cases[case_id] = new
        details = {k: v for k, v in updates.items() if k != "evidence"}
        if note is not None:
            details["note"] = note
        details.update(extra or {})
        labels = []
        if to in ("reported", "dismissed"):  # closing records the analyst's verdict on the flag (issue 16)
            chosen = check_label(label) or _DEFAULT_LABELS.get(action, _DEFAULT_LABELS[to])
            details["label"], details["reason_code"] = chosen
            labels.append(case_label(new, chosen, actor, at, at))
        return CaseChanges([new], [self._action_event(new, actor, at, at, action, case.status, to, details)], labels)

    @staticmethod
    def _with_dismissal(case: Case, at: float) -> dict[str, Any]:
        # The baseline "stronger evidence" is measured against: everything applied up to the dismissal.
        entries = case.evidence.get("detections", {}).values()
        evidence = copy.deepcopy(case.evidence)
        evidence["dismissal"] = {
            "at": at,
            "max_rank": max((OUTCOME_RANK[e["outcome"]] for e in entries), default=-1),
            "reasons": sorted({e["reason"] for e in entries}),
        }
        return evidence

    @staticmethod
    def _action_event(
        case: Case, actor: str, at: float, recorded_at: float, action: str, from_status: str, to_status: str,
        details: dict[str, Any],
    ) -> CaseEvent:
        return CaseEvent(
            event_id=content_id("cev", case.case_id, action, at, actor, case.version),
            case_id=case.case_id,
            at=at,
            recorded_at=recorded_at,
            actor=actor,
            action=action,
            from_status=from_status,
            to_status=to_status,
            details=details,
        )
