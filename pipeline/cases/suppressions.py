"""Suppressions: known-good activity silenced for a time, with an audit trail (issue 16).

A suppression has a scope (an account, a beneficial owner — every account the owner holds per the CIP record, and
owner cases — or a run), optionally one detector within it, a reason, who added it and when, and an expiry no
later than the policy's `suppressions.max_days`. Its window is in event time, like every clock here.

- **Held.** A finding whose event time is in [starts_at, end) and that matches the scope is recorded in
  `suppression_hits` with the suppression id (and a `held` audit event) and opens or changes no case.
- **Never held:** info findings (they open nothing anyway); special-measures findings, and every finding of an
  account with a special-measures case standing; findings of a case already reportable (open, needs_review,
  acknowledged, reported) unless that case was itself opened by this suppression's release.
- **Released.** When the suppression ends (expiry reached by the event-time watermark, or ended early with
  `suppress end`), the findings it held are applied to the case book in their original order, so whatever still
  holds then (CaseBook's rules: a later U.S.-person revision, a dismissal, ...) opens or updates the case. Each
  applied copy keeps its detection id and carries `evidence.suppression` = {suppression_id, held_event_time,
  released_at}. knowledge_at = the later of the finding's event time and the suppression's end under
  `suppressions.knowledge_at = "end"` (default), or the finding's own event time under `"detection"`.
  ARCHITECTURE.md ("Suppressions and knowledge") says why and how the audit shows it.
- **Idempotent.** Ids are content hashes; a replayed finding already held is held again (same row, same event),
  even after the release, so a replay never dates a case differently; a released hit stays released (the hits
  table keeps the higher state), and the released copy's fingerprint is among its id's `versions` in the case. A
  new version of a held detection (the engine re-decided it; same id, other content) is held in turn and marks the
  older one's hit `SUPERSEDED`: only the latest version received is released.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pipeline.cases.core import CaseBook, CaseChanges, CaseError, case_id_for, fingerprint
from schemas import serde
from schemas.case import REPORTABLE_STATUSES, Case, Suppression, SuppressionEvent, SuppressionScope
from schemas.cip import CipRecord
from schemas.detection import Detection
from schemas.ids import content_id
from schemas.policy import Policy

#: hit states; the hits table keeps the highest: a released hit stays released, a superseded one superseded
HELD, RELEASED, SUPERSEDED = 0, 1, 2
PIPELINE_ACTOR = "pipeline"
SCOPES: tuple[str, ...] = ("account", "owner", "run")


class SuppressionError(CaseError):
    """A suppression could not be added or ended (the message says why)."""


def new_suppression(policy: Policy, *, scope: str, subject: str, reason: str, created_by: str, created_at: float,
                    starts_at: float, expires_at: float, detector_id: str | None = None) -> Suppression:
    """A validated suppression with its deterministic id (adding the same one twice is one suppression)."""
    if scope not in SCOPES:
        raise SuppressionError(f"scope {scope!r}: choose one of {', '.join(SCOPES)}")
    for name, value in (("subject", subject), ("--reason", reason), ("--actor", created_by)):
        if not value or not value.strip():
            raise SuppressionError(f"{name} must not be blank")
    for name, t in (("--from", starts_at), ("--until", expires_at)):
        if not math.isfinite(t):
            raise SuppressionError(f"{name} {t!r}: must be a finite time")
    if expires_at <= starts_at:
        raise SuppressionError("a suppression must expire after it starts")
    longest = policy.suppressions.max_days * 86_400.0
    if expires_at - starts_at > longest:
        raise SuppressionError(f"a suppression may run at most {policy.suppressions.max_days:g} days under policy "
                               f"{policy.id} (suppressions.max_days); this one runs "
                               f"{(expires_at - starts_at) / 86_400.0:.1f}")
    detector = detector_id.strip() if detector_id and detector_id.strip() else None
    if detector == "special_measures":
        raise SuppressionError("special-measures findings can never be suppressed")
    sid = content_id("sup", scope, subject.strip(), detector, starts_at, expires_at, reason.strip(), created_by.strip())
    return Suppression(suppression_id=sid, scope=scope, subject=subject.strip(), detector_id=detector,  # type: ignore[arg-type]
                       reason=reason.strip(), created_by=created_by.strip(), created_at=created_at,
                       starts_at=starts_at, expires_at=expires_at)


def sup_event(sup_id: str, action: str, at: float, recorded_at: float, actor: str, key: object,
              details: dict[str, Any]) -> SuppressionEvent:
    return SuppressionEvent(event_id=content_id("sev", sup_id, action, key), suppression_id=sup_id, at=at,
                            recorded_at=recorded_at, actor=actor, action=action, details=details)


def matches(sup: Suppression, det: Detection, cip: CipRecord | None) -> bool:
    """The finding is in the suppression's scope and event-time window."""
    if sup.detector_id is not None and det.detector_id != sup.detector_id:
        return False
    if not sup.starts_at <= det.event_time < sup.ends_at:
        return False
    scope: SuppressionScope = sup.scope
    if scope == "account":
        return det.account_id == sup.subject
    if scope == "run":
        return det.run_id == sup.subject
    if det.beneficial_owner_id == sup.subject:
        return True
    return cip is not None and any(o.owner_id == sup.subject for o in cip.beneficial_owners)


def released_by(case: Case, suppression_id: str) -> bool:
    """The case holds a finding this suppression released (so it was opened or changed by that release)."""
    return any((e.get("evidence") or {}).get("suppression", {}).get("suppression_id") == suppression_id
               for e in case.evidence.get("detections", {}).values())


def protected(det: Detection, book: CaseBook) -> str | None:
    """Why this finding can never be held (None: it can)."""
    if det.outcome == "info":
        return "info"
    if det.reason == "special_measures" or det.detector_id == "special_measures":
        return "special_measures"
    sm = book.get(content_id("case", det.policy_id, f"account:{det.account_id}", "reason:special_measures"))
    if sm is not None and sm.status != "dismissed":
        return "account_under_special_measures"
    return None


@dataclass
class Split:
    passed: list[Detection] = field(default_factory=list)
    held: list[tuple[Suppression, Detection]] = field(default_factory=list)


def split(dets: Iterable[Detection], sups: Sequence[Suppression], book: CaseBook,
          cips: Mapping[str, CipRecord], held_before: Mapping[str, str]) -> Split:
    """Which findings a suppression holds. `held_before`: fingerprint -> suppression id of findings already held
    (a replay is held again by the same suppression, whatever the case became since)."""
    out = Split()
    by_id = {s.suppression_id: s for s in sups}
    for det in dets:
        holder: Suppression | None = None
        fp = fingerprint(det)
        if held_before.get(fp) in by_id:
            holder = by_id[held_before[fp]]
        elif protected(det, book) is None:
            case = book.get(case_id_for(det))
            for sup in sups:
                if matches(sup, det, cips.get(det.account_id)):
                    # a reportable case already opened: no suppression hides it (unless this one's release opened it)
                    if case is None or case.status not in REPORTABLE_STATUSES or released_by(case, sup.suppression_id):
                        holder = sup
                    break
        if holder is None:
            out.passed.append(det)
        else:
            out.held.append((holder, det))
    return out


def hit_row(sup: Suppression, det: Detection, recorded_at: float, state: int = HELD,
            released_at: float | None = None) -> dict[str, Any]:
    return {"suppression_id": sup.suppression_id, "fingerprint": fingerprint(det), "detection_id": det.detection_id,
            "case_id": case_id_for(det), "account_id": det.account_id, "event_time": det.event_time,
            "recorded_at": recorded_at, "detection": serde.encode(det).decode(), "state": state,
            "released_at": released_at}


def released_copy(det: Detection, sup: Suppression, policy: Policy) -> Detection:
    """The held finding as applied at the suppression's end (module docstring: knowledge)."""
    end = sup.ends_at
    t = max(det.event_time, end) if policy.suppressions.knowledge_at == "end" else det.event_time
    evidence = {**det.evidence, "suppression": {"suppression_id": sup.suppression_id, "held_event_time": det.event_time,
                                                "released_at": end, "reason": sup.reason,
                                                "knowledge_from": policy.suppressions.knowledge_at}}
    return det.model_copy(update={"event_time": t, "evidence": evidence})


def release(book: CaseBook, sup: Suppression, held: Sequence[Detection], cips: Mapping[str, CipRecord],
            now: float) -> CaseChanges:
    """Apply the findings `sup` held, in their original order, as released copies; the case events name it.
    `held` in the order they were held: of several versions of one detection id (re-decided by the engine) only the
    last held is released, as the case book counts versions in arrival order."""
    out = CaseChanges()
    latest = {d.detection_id: d for d in held}
    for det in sorted(latest.values(), key=lambda d: (d.event_time, d.detection_id)):
        copy = released_copy(det, sup, book.policy)
        changes = book.apply([copy], cips, now)
        for i, ev in enumerate(changes.events):
            if ev.details.get("detection_id") == det.detection_id:
                changes.events[i] = ev.model_copy(update={"details": {
                    **ev.details, "suppression_id": sup.suppression_id, "held_event_time": det.event_time}})
        out.extend(changes)
    return out
