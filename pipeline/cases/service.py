"""Glue between the pure CaseBook / DeadlineMonitor and the ClickHouse store, used by the runner and the CLI.

The store is the source of truth: analysts change cases from other processes (the CLI), so before each batch
the cases it touches are re-read from the store, and the book never writes over an analyst's newer version.
At start every case and every deadline event id already stored is loaded, so a restart re-derives the same
ids and writes nothing twice.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from pipeline.cases import suppressions as sup_ops
from pipeline.cases.core import (
    INQUIRY_ESCALATED,
    CaseBook,
    CaseChanges,
    Label,
    UnknownCase,
    case_id_for,
    fingerprint,
)
from pipeline.cases.deadline import OVERDUE, PENDING_STATUSES, REMINDER, DeadlineMonitor
from pipeline.cases.feed import CaseFeedMessage, feed_messages
from pipeline.store import Store
from schemas import serde
from schemas.case import Case, Suppression
from schemas.cip import CipRecord
from schemas.detection import Detection
from schemas.policy import Policy


class CaseService:
    def __init__(self, store: Store, policy: Policy, *, preload: bool = True):
        """`preload=False` (the CLI's one-off actions) skips loading every case; actions re-read theirs anyway."""
        self.store = store
        self.policy = policy
        self.book = CaseBook(policy, store.list_cases() if preload else ())
        if preload:
            # Info detections wait in memory for their case to open (CaseBook): after a restart they are re-derived
            # from the stored detections (written before they are applied), or a case opening later would miss them.
            self.book.hold_info(d for d in store.list_detections() if d.outcome == "info")
        emitted = store.query(
            "SELECT DISTINCT event_id FROM case_events WHERE action IN {actions:Array(String)}",
            {"actions": [REMINDER, OVERDUE, INQUIRY_ESCALATED]},
        )
        self._escalated: set[str] = {r["event_id"] for r in emitted}
        self.monitor = DeadlineMonitor(policy, self._escalated)
        self._expired_seen: set[str] = set()

    def _write(self, changes: CaseChanges) -> list[CaseFeedMessage]:
        # Events first, then cases. A crash between the two leaves events whose case version is not stored yet;
        # the replayed input re-derives the same event ids (content ids), which the store's event dedup absorbs,
        # and writes the case. The other order lost events: the replay found the case updated and derived none.
        self.store.append_case_events(changes.events)
        self.store.upsert_cases(changes.cases)
        self.store.upsert_labels(changes.labels)
        touched = {e.case_id for e in changes.events}
        latest = [c for cid in touched if (c := self.book.get(cid)) is not None]
        return feed_messages(latest, changes.events, self.policy)

    def _refresh(self, case_ids: Iterable[str]) -> None:
        self.book.load(c for cid in set(case_ids) if (c := self.store.get_case(cid)) is not None)

    def process(
        self, detections: Iterable[Detection], now: float, cips: Mapping[str, CipRecord] | None = None
    ) -> list[CaseFeedMessage]:
        """Apply a batch of detections at processing time `now`; returns the feed messages to publish.
        `cips`: latest CIP record per account where the caller has it; the rest are read from the store."""
        # the last version received of each detection id (the engine re-emits a re-decided one under its id), so a
        # suppression holds, and the book applies, only that one (CaseBook: versions in arrival order); the book is
        # handed the earlier ones of a passed id too, to keep them as received (a later redelivery is no new version)
        batch = list(detections)
        dets = list({d.detection_id: d for d in batch}.values())
        if not dets:
            return []
        self._refresh(case_id_for(d) for d in dets)
        known = dict(cips or {})
        for acct in {d.account_id for d in dets} - known.keys():
            if (rec := self.store.get_cip(acct)) is not None:
                known[acct] = rec
        sups = self.store.list_suppressions()
        if sups:
            held_before = self._held_before(dets)
            parts = sup_ops.split(dets, sups, self.book, known, held_before)
            self._hold(parts.held, now, held_before)
            passed = {d.detection_id for d in parts.passed}
            batch = [d for d in batch if d.detection_id in passed]
        return self._write(self.book.apply(batch, known, now))

    # ---- suppressions (pipeline/cases/suppressions.py) -----------------------------------------------------------

    def _held_before(self, dets: list[Detection]) -> dict[str, str]:
        rows = self.store.query("SELECT fingerprint, suppression_id FROM suppression_hits FINAL "
                                "WHERE fingerprint IN {f:Array(String)}", {"f": [fingerprint(d) for d in dets]})
        return {r["fingerprint"]: r["suppression_id"] for r in rows}

    def _hold(self, held: list[tuple[Suppression, Detection]], now: float, held_before: Mapping[str, str]) -> None:
        if not held:
            return
        # A new version of a detection (re-decided by the engine) supersedes the versions of its id still held by the
        # same suppression: only the latest is released (SUPERSEDED is the hits table's highest state, so a replay of
        # an older version, held again, stays superseded).
        new = [(s, d) for s, d in held if fingerprint(d) not in held_before]
        older = self.store.query(
            "SELECT suppression_id, fingerprint, detection FROM suppression_hits FINAL WHERE state = {held:UInt8} AND "
            "detection_id IN {ids:Array(String)}", {"held": sup_ops.HELD, "ids": [d.detection_id for _, d in new]},
        ) if new else []
        latest = {(s.suppression_id, d.detection_id): fingerprint(d) for s, d in new}
        sups = {s.suppression_id: s for s, _ in held}
        superseded = []
        for r in older:
            det = serde.decode(Detection, r["detection"])
            fp = latest.get((r["suppression_id"], det.detection_id))
            if fp is not None and fp != r["fingerprint"]:
                row = sup_ops.hit_row(sups[r["suppression_id"]], det, now, sup_ops.SUPERSEDED)
                superseded.append({**row, "fingerprint": r["fingerprint"]})  # the stored row's key, as stored
        self.store.insert_suppression_hits([sup_ops.hit_row(s, d, now) for s, d in held] + superseded)
        self.store.append_suppression_events([
            sup_ops.sup_event(s.suppression_id, "held", d.event_time, now, sup_ops.PIPELINE_ACTOR, fingerprint(d),
                              {"detection_id": d.detection_id, "detector_id": d.detector_id, "outcome": d.outcome,
                               "reason": d.reason, "case_id": case_id_for(d), "account_id": d.account_id})
            for s, d in held])

    def release_ended(self, event_now: float, recorded_at: float, only: str | None = None) -> list[CaseFeedMessage]:
        """Apply what suppressions that ended by event time `event_now` held (this policy's findings only; another
        policy's are released by that policy's pipeline or `suppress end`)."""
        out: list[CaseFeedMessage] = []
        ended = [s for s in self.store.list_suppressions()
                 if (only is None or s.suppression_id == only) and s.ends_at <= event_now]
        if not ended:
            return out
        # One read per tick for every ended suppression's findings still held (late ones arrive after the end too).
        waiting: dict[str, list[Detection]] = {}
        for r in self.store.query("SELECT suppression_id, detection FROM suppression_hits FINAL WHERE state = 0 AND "
                                  "suppression_id IN {ids:Array(String)} ORDER BY event_time, fingerprint",
                                  {"ids": [s.suppression_id for s in ended]}):
            waiting.setdefault(r["suppression_id"], []).append(serde.decode(Detection, r["detection"]))
        for sup in ended:
            sid = sup.suppression_id
            if sup.ended_at is None and sid not in self._expired_seen:
                self._expired_seen.add(sid)
                self.store.append_suppression_events([sup_ops.sup_event(
                    sid, "expired", sup.expires_at, recorded_at, sup_ops.PIPELINE_ACTOR, sup.expires_at, {})])
            held = [d for d in waiting.get(sid, []) if d.policy_id == self.policy.id]
            if not held:
                continue
            self._refresh(case_id_for(d) for d in held)
            cips = {a: rec for a in {d.account_id for d in held} if (rec := self.store.get_cip(a)) is not None}
            out += self._write(sup_ops.release(self.book, sup, held, cips, recorded_at))
            self.store.insert_suppression_hits(
                [sup_ops.hit_row(sup, d, recorded_at, sup_ops.RELEASED, sup.ends_at) for d in held])
            events = []
            for d in held:
                case = self.book.get(case_id_for(d))
                events.append(sup_ops.sup_event(
                    sid, "released", sup.ends_at, recorded_at, sup_ops.PIPELINE_ACTOR, fingerprint(d),
                    {"detection_id": d.detection_id, "case_id": case_id_for(d), "held_event_time": d.event_time,
                     "case_status": case.status if case else None,
                     "knowledge_at": case.knowledge_at if case else None}))
            self.store.append_suppression_events(events)
        return out

    def update_identity(self, cip: CipRecord, now: float) -> list[CaseFeedMessage]:
        """A newer CIP record refreshes the identity snapshot of the account's pending cases."""
        self._refresh(c.case_id for c in self.store.list_cases() if c.account_id == cip.account_id)
        return self._write(self.book.refresh_identity(cip, now))

    def tick(self, event_now: float, recorded_at: float) -> list[CaseFeedMessage]:
        """Run the deadline monitor at event time `event_now` (the watermark)."""
        out = self.release_ended(event_now, recorded_at)  # first: a case a release opens gets its milestones now
        pending = self.store.list_cases(status=list(PENDING_STATUSES))
        self.book.load(pending)
        out += self._write(self.book.escalate_inquiries(pending, event_now, recorded_at, self._escalated))
        pending = [self.book.get(c.case_id) or c for c in pending]  # as escalation left them
        return out + self._write(CaseChanges(events=self.monitor.due(pending, event_now, recorded_at)))

    # ---- analyst actions (each re-reads the case first: the store is the truth) ----------------------------------

    def _fresh(self, case_id: str) -> Case:
        case = self.store.get_case(case_id)
        if case is None:
            raise UnknownCase(f"{case_id}: no such case in database {self.store.database}")
        self.book.load([case])
        return case

    def ack(self, case_id: str, actor: str, at: float, note: str = "") -> list[CaseFeedMessage]:
        self._fresh(case_id)
        return self._write(self.book.ack(case_id, actor, at, note))

    def report(self, case_id: str, actor: str, at: float, filing_reference: str, label: Label = None
               ) -> list[CaseFeedMessage]:
        self._fresh(case_id)
        return self._write(self.book.report(case_id, actor, at, filing_reference, label))

    def dismiss(self, case_id: str, actor: str, at: float, reason: str, label: Label = None) -> list[CaseFeedMessage]:
        self._fresh(case_id)
        return self._write(self.book.dismiss(case_id, actor, at, reason, label))

    def relabel(self, case_id: str, actor: str, at: float, label: tuple[str, str]) -> list[CaseFeedMessage]:
        self._fresh(case_id)
        return self._write(self.book.relabel(case_id, actor, at, label))

    def attest(self, case_id: str, actor: str, at: float, is_training: bool, document: str, label: Label = None
               ) -> list[CaseFeedMessage]:
        self._fresh(case_id)
        return self._write(self.book.attest(case_id, actor, at, is_training, document, label))

    def decide_review(self, case_id: str, actor: str, at: float, is_training: bool, note: str, label: Label = None
                      ) -> list[CaseFeedMessage]:
        self._fresh(case_id)
        return self._write(self.book.decide_review(case_id, actor, at, is_training, note, label))
