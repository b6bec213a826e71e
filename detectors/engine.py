"""The pure detect core: state per workload, run, account and owner; detectors decide; ids are content-derived.

Event time only (no clock reads): expiry is driven by `on_time(event_time)`. State is small and bounded, and
`to_dict` / `from_dict` round-trip it through plain data so a faust table can hold it. Detections already
emitted are remembered by id forever (cases never expire), so replays and re-evaluations never emit twice.
Which accounts' parts of the state changed is tracked in one place, `_touch`: each input (window, CIP record,
allocation) marks its account and the accounts of the runs its workloads are filed under before it changes
anything, and expiry marks what it drops. A runtime that persists the state per account (detectors/snapshot.py)
serialises only those (tests check the sum of the parts against the whole).

Owner messages (detectors/owner_aggregate.py) are queued in `owner_outbox`, never applied here: the caller routes
them (DetectStage: to the engine's own `owner_agg` in process, to the owners topic on Kafka).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from detectors import registry
from detectors.base import DetectContext, Detector
from detectors.classifier_base import RuleClassifier, Verdict, WorkloadClassifier
from detectors.compute_threshold import crossing
from detectors.fields import field_of as _g
from detectors.fields import finite_or_zero as _num
from detectors.foreign_person import ForeignDetermination, determine
from detectors.owner_aggregate import OwnerAggregator, contribution, membership, owner_level, retraction
from detectors.reservation_potential import reservation_potential
from detectors.runs import RunStitcher, footprint_of
from detectors.state import HISTORY_K, SOURCE_WINDOWS_K, AccountState, OwnerState, RunState, VerdictSummary
from schemas.allocation import AllocationEvent
from schemas.cip import CipRecord
from schemas.detection import Detection
from schemas.ids import content_id
from schemas.policy import Policy

HOLD_KINDS = ("instance_started", "job_started", "reserved", "reservation_changed")
RELEASE_KINDS = ("instance_stopped", "job_stopped", "reservation_released")
STOP_KINDS = ("instance_stopped", "job_stopped")
RESERVATION_KINDS = ("reserved", "reservation_changed")
IDLE_TTL_S = 6 * 3600.0
_CIP_FACTS = ("us_person", "country", "beneficial_owners", "reseller", "customer_name")


class DetectEngine:
    def __init__(self, policy: Policy, classifier: WorkloadClassifier | None = None, window_s: float = 60.0,
                 detectors: Iterable[Detector] | None = None, idle_ttl_s: float = IDLE_TTL_S):
        self.policy = policy
        u = policy.uncertainty
        self.classifier = classifier or RuleClassifier(u.p_training_high, u.p_training_low)
        self.window_s = window_s
        self.detectors = list(detectors) if detectors is not None else registry.build()
        self.idle_ttl_s = idle_ttl_s
        self.stitcher = RunStitcher(window_s)
        self.runs: dict[str, RunState] = {}
        self.accounts: dict[str, AccountState] = {}
        self.cips: dict[str, CipRecord] = {}
        self.emitted: dict[str, str] = {}  # detection id -> account id (for the per-account split of the state)
        self.watermark = 0.0
        self.errors: dict[str, int] = {}
        # Which detector runs where is declared on its class (detectors/base.py), never decided here by id. The
        # account-level ones are read from `self.detectors` at each input (a caller may add one after construction).
        self.owner_agg = OwnerAggregator(policy, window_s, owner_level(self.detectors), self.errors)
        #: owner messages made, in order, for the caller to route (module docstring)
        self.owner_outbox: list[dict[str, Any]] = []
        #: account -> every owner its CIPs have named as a foreign owner here: a removal can be re-sent after a crash.
        self.named_owners: dict[str, list[str]] = {}
        self._owner_index: dict[str, list[str]] | None = None  # owner -> accounts its current CIP names (a cache)
        # Checkpoint bookkeeping (split_dirty): accounts whose part may have changed since the last split_dirty
        # (`_touch`), detection ids per account (built on first use), and the shared part as last returned (JSON).
        self._dirty: set[str] = set()
        self._emitted_by: dict[str, list[str]] | None = None
        self._shared_sent: str | None = None

    @property
    def owners(self) -> dict[str, OwnerState]:
        return self.owner_agg.owners

    # -- helpers ---------------------------------------------------------------------------------------------

    def _account(self, account_id: str) -> AccountState:
        acct = self.accounts.get(account_id)
        if acct is None:
            acct = self.accounts[account_id] = AccountState(account_id)
        return acct

    def _touch(self, account_id: str, workloads: Iterable[str | None] = ()) -> None:
        """The one place that marks what an input may change: its account, and the accounts the runs of its
        workloads are filed under (a workload id another account's run holds; a stop for it)."""
        self._dirty.add(account_id)
        for wid in workloads:
            rid = self.stitcher.workload_run.get(wid) if wid else None
            for holder in (self.runs.get(rid or ""), self.stitcher.runs.get(rid or "")):
                if holder is not None:
                    self._dirty.add(holder.account_id)

    def _emit(self, det: Detection) -> bool:
        """Remember a detection id (False: emitted before). Its id goes into its account's checkpoint part."""
        if det.detection_id in self.emitted:
            return False
        self.emitted[det.detection_id] = det.account_id
        if self._emitted_by is not None:
            self._emitted_by.setdefault(det.account_id, []).append(det.detection_id)
        return True

    def determination(self, account_id: str) -> ForeignDetermination:
        return determine(self.cips.get(account_id), self.policy)

    def _ctx(self, account_id: str, *, run: RunState | None = None, verdict: Verdict | None = None,
             owner: OwnerState | None = None) -> DetectContext:
        acct = self._account(account_id)
        rec = self.stitcher.runs.get(run.run_id) if run is not None else None
        return DetectContext(self.policy, self.window_s, account_id, self.determination(account_id),
                             self.cips.get(account_id), acct, run, list(rec.workloads) if rec else [],
                             list(rec.stitched) if rec else [], owner, verdict, acct.foreign_since)

    def _run(self, ctx: DetectContext, event: Any, per_run_on_cip: bool = False) -> list[Detection]:
        """Each account-level detector (or only those that `reevaluates_runs_on_cip`) over (ctx, event): `update`,
        then `detect`. One detector's exception is counted and the rest still run."""
        out: list[Detection] = []
        for d in self.detectors:
            if d.owner_level or (per_run_on_cip and not d.reevaluates_runs_on_cip):
                continue
            try:
                d.update(ctx, event)  # state a detector keeps is folded in first; detect only reads
                found = d.detect(ctx, event)
            except Exception:  # errors are data: count it per detector, never stop the stream
                self.errors[d.id] = self.errors.get(d.id, 0) + 1
                continue
            out += [det for det in found if self._emit(det)]
        return out

    def _note_own_case(self, run: RunState, dets: list[Detection]) -> None:
        """A detection its detector claims as the run's own case (Detector.claims_run) takes the run out of its
        owners' sums."""
        by_id = {d.id: d for d in self.detectors}
        for det in dets:
            d = by_id.get(det.detector_id)
            if det.run_id == run.run_id and d is not None and d.claims_run(det):
                run.own_case = True
                return

    # -- inputs ----------------------------------------------------------------------------------------------

    def on_cip(self, cip: CipRecord) -> list[Detection]:
        """Latest updated_at wins (a conflict is noted); accounts are re-evaluated, since CIP may come late."""
        aid = cip.account_id
        self._touch(aid)
        acct = self._account(aid)
        prev = self.cips.get(aid)
        if prev is not None:
            changed = [f for f in _CIP_FACTS if getattr(prev, f) != getattr(cip, f)]
            newer = (cip.updated_at, cip.model_dump_json()) > (prev.updated_at, prev.model_dump_json())
            if changed:
                acct.cip_notes.append({"conflict": "superseded" if newer else "stale_record_ignored",
                                       "kept_updated_at": max(cip.updated_at, prev.updated_at),
                                       "other_updated_at": min(cip.updated_at, prev.updated_at),
                                       "fields": changed})
                del acct.cip_notes[:-8]
            if not newer:
                return []
        before = self.determination(aid)
        self.cips[aid] = cip
        after = self.determination(aid)
        if not after.is_foreign:
            acct.foreign_since = None
        elif not before.is_foreign:
            acct.foreign_since = cip.updated_at  # the provider could not know before this record
        self._owner_index = None
        if after.foreign_owners:
            self.named_owners[aid] = sorted({*self.named_owners.get(aid, []), *after.foreign_owners})
        # the owners this account counted for are those its previous record named
        self.owner_outbox += [retraction(o, aid) for o in before.foreign_owners if o not in after.foreign_owners]
        self.owner_outbox += [membership(o, aid) for o in after.foreign_owners if o not in before.foreign_owners]
        out = self._run(self._ctx(aid), cip)
        for run in [r for r in self.runs.values() if r.account_id == aid]:
            verdict = Verdict.from_dict(run.verdict) if run.verdict else None
            ctx = self._ctx(aid, run=run, verdict=verdict)
            dets = self._run(ctx, cip, per_run_on_cip=True)
            self._note_own_case(run, dets)
            out += dets
            self._owners_after(aid, run, run.last_end, None)
        return out

    def on_allocation(self, ev: AllocationEvent) -> list[Detection]:
        self._touch(ev.account_id, (ev.workload_id, ev.job_id))
        acct = self._account(ev.account_id)
        acct.note_event(ev.ts)
        self.watermark = max(self.watermark, ev.ts)
        is_resv = ev.kind in RESERVATION_KINDS or ev.kind == "reservation_released"
        key = ev.workload_id or ev.job_id or ("reservation" if is_resv else ev.event_id)
        for ref in (ev.workload_id, ev.job_id):
            if ref and ev.run_label:
                acct.labels[ref] = ev.run_label
            if ref and ev.kind in ("job_started", "instance_started") and ev.accelerator and ev.count:
                acct.footprints[ref] = [list(x) for x in footprint_of({ev.accelerator: ev.count}, ev.count)]
            if ref and ev.kind in STOP_KINDS:
                self.stitcher.note_stop(ref, ev.ts)
        if ev.kind in HOLD_KINDS:
            acct.held[key] = {"accelerator": ev.accelerator, "count": ev.count,
                              "interconnect_gbps": ev.interconnect_gbps,
                              "datacenter": ev.datacenter, "nodes": len(ev.nodes), "since": ev.ts}
        elif ev.kind in RELEASE_KINDS:
            acct.held.pop(key, None)
        if is_resv:
            if ev.kind == "reservation_released":
                acct.reservations.pop(key, None)
            else:
                pot = reservation_potential(ev)
                acct.reservations[key] = {"ts": ev.ts, "until": ev.reserved_until, "count": ev.count,
                                          "accelerator": ev.accelerator, "potential": pot[0] if pot else 0.0}
            acct.potential_prev = acct.potential
            acct.potential = sum(r["potential"] for r in acct.reservations.values())
            acct.potential_at = ev.ts
        return self._run(self._ctx(ev.account_id), ev)

    def on_window(self, w: Any) -> list[Detection]:
        """One merged workload window (detectors/windows.py WorkloadWindow, or anything with its fields)."""
        aid = _g(w, "account_id")
        wid = _g(w, "workload_id")
        start, end = _num(_g(w, "window_start")), _num(_g(w, "window_end"))
        if not aid or not wid or end <= 0:
            self.errors["window_unattributed"] = self.errors.get("window_unattributed", 0) + 1
            return []
        self._touch(aid, (wid,))
        acct = self._account(aid)
        acct.note_event(start)
        self.watermark = max(self.watermark, end)
        job = _g(w, "job_id")
        label = _g(w, "run_label") or acct.labels.get(wid) or (acct.labels.get(job) if job else None)
        fp = acct.footprints.get(wid) or (acct.footprints.get(job) if job else None)
        footprint = tuple(tuple(x) for x in fp) if fp else footprint_of(_g(w, "accelerators"), _g(w, "device_count", 0))
        rid, left = self.stitcher.assign(aid, wid, label, footprint, start, end, firm=fp is not None)
        if left is not None:
            self._fold_run(left, rid)
        run = self.runs.get(rid)
        flop = (_num(_g(w, "flop")), _num(_g(w, "flop_low")), _num(_g(w, "flop_high")))
        if run is not None and run.seen.get(f"{wid}|{start!r}") == list(flop):
            return []  # this workload-window exactly as already counted (a replay): nothing changes
        if run is None:
            run = self.runs[rid] = RunState(rid, aid, started_at=start)
        is_new = f"{wid}|{start!r}" not in run.seen  # a window not counted before (not a correction)
        run.started_at = start if run.started_at is None else min(run.started_at, start)
        used_before = run.used
        latest = end >= run.last_end
        if not run.add_window(f"{wid}|{start!r}", end, flop, self.window_s):
            self.errors["window_beyond_horizon"] = self.errors.get("window_beyond_horizon", 0) + 1
            return []
        basis = str(_g(w, "basis") or "none")
        run.basis[basis] = run.basis.get(basis, 0) + 1
        for win_id in list(_g(w, "window_ids") or ()) or [_g(w, "window_id") or content_id("win", wid, start)]:
            if win_id not in run.source_windows:
                run.source_windows.append(win_id)
        del run.source_windows[:-SOURCE_WINDOWS_K]
        feats = _g(w, "features")
        run.history.append({"workload_id": wid, "window_start": start, "window_end": end,
                            "device_count": _g(w, "device_count", 0), "node_count": _g(w, "node_count") or
                            len(_g(w, "nodes") or ()), "basis": basis,
                            "features": dict(feats) if isinstance(feats, Mapping) else {}})
        del run.history[:-HISTORY_K]
        run.describe_window(workload_id=wid, job_id=job, accelerators=_g(w, "accelerators"),
                            device_count=_g(w, "device_count") or len(_g(w, "devices") or ()),
                            node_count=_g(w, "node_count") or len(_g(w, "nodes") or ()))
        verdict = self._classify(run, start, end, is_new)
        if run.crossed is None:
            run.crossed = crossing(used_before, run.used, start, end, latest=latest, rate=run.rate,
                                   reserved_until=acct.reserved_until, threshold=self.policy.thresholds.training_ops,
                                   count_projected=self.policy.thresholds.count_projected, last_end=run.last_end)
        runs_seen = acct.activity.setdefault("runs", {})
        runs_seen[rid] = {"first": run.started_at, "last": run.last_end, "used": run.used, "band": verdict.band,
                          "crossed": run.crossed is not None}
        for old in sorted(runs_seen, key=lambda k: runs_seen[k]["last"])[:-16]:
            runs_seen.pop(old)
        out = self._run(self._ctx(aid, run=run, verdict=verdict), w)
        self._note_own_case(run, out)
        self._owners_after(aid, run, end, start)
        return out

    def _fold_run(self, young: str, into: str) -> None:
        """A young run whose job turned out to resume `into` (detectors/runs.py): its windows and figures move there.
        Owners that counted it get it at zero (the run is gone; the figures now count under `into`)."""
        old = self.runs.pop(young, None)
        if old is None:
            return
        run = self.runs.get(into)
        if run is None:
            run = self.runs[into] = RunState(into, old.account_id, started_at=old.started_at)
        for key, flop in sorted(old.seen.items(), key=lambda kv: float(kv[0].rsplit("|", 1)[1])):
            run.add_window(key, float(key.rsplit("|", 1)[1]) + self.window_s, (flop[0], flop[1], flop[2]),
                           self.window_s)
        run.started_at = old.started_at if run.started_at is None else min(run.started_at, old.started_at or 0.0)
        for b, n in old.basis.items():
            run.basis[b] = run.basis.get(b, 0) + n
        for b, n in old.bands_seen.items():
            run.bands_seen[b] = run.bands_seen.get(b, 0) + n
        judged = VerdictSummary.from_dict(old.judged)  # the young run's parts are the newer ones
        judged.merge(VerdictSummary.from_dict(run.judged))
        run.judged = judged.to_dict()
        run.history = sorted(run.history + old.history, key=lambda h: h["window_start"])[-HISTORY_K:]
        run.source_windows = (run.source_windows + [w for w in old.source_windows
                                                    if w not in run.source_windows])[-SOURCE_WINDOWS_K:]
        for model, n in old.accelerators.items():
            run.accelerators[model] = max(run.accelerators.get(model, 0), n)
        run.device_count, run.node_count = max(run.device_count, old.device_count), max(run.node_count,
                                                                                          old.node_count)
        for ids, more in ((run.workload_ids, old.workload_ids), (run.job_ids, old.job_ids)):
            ids += [x for x in more if x not in ids]
        if old.account_id in self.accounts:
            self.accounts[old.account_id].activity.get("runs", {}).pop(young, None)
        zero = RunState(young, old.account_id, started_at=old.started_at, last_end=old.last_end)
        self.owner_outbox += self._contributions(old.account_id, zero, old.last_end, None)

    def _classify(self, run: RunState, start: float, end: float, is_new: bool = True) -> Verdict:
        """The run's verdict over its whole life (state.VerdictSummary): the classifier judges the newest
        HISTORY_K windows (what it was trained on); each time HISTORY_K new windows have come, that judgement is
        folded into the run's summary as a completed block, and the run verdict combines the blocks with the open
        one. Until the first block completes the run verdict is the classifier's own."""
        try:
            tail = self.classifier.predict(run.history)
        except Exception:  # a classifier failure is uncertainty, never a crash
            self.errors["classifier"] = self.errors.get("classifier", 0) + 1
            tail = Verdict(0.5, "uncertain", [], "error", "", reasons=("between_bands",))
        s = VerdictSummary.from_dict(run.judged)
        if is_new:
            s.windows += 1
            s.open_since = start if s.open_since is None else min(s.open_since, start)
        open_n = s.windows - s.covered
        if open_n >= HISTORY_K:  # the open block is complete: the newest HISTORY_K windows are that block
            s.fold(tail, open_n, s.open_since, end)
            s.covered, s.open_since, open_n = s.windows, None, 0
        verdict = tail if s.blocks == 0 else s.decide(tail, open_n, (s.open_since, end))
        run.judged = s.to_dict()
        prev = run.verdict or {}
        since = prev.get("since") if prev.get("band") == verdict.band else (start if not prev else end)
        run.verdict = {**verdict.to_dict(), "since": since,
                       "basis": s.basis(tail, open_n)}
        run.bands_seen[verdict.band] = run.bands_seen.get(verdict.band, 0) + 1
        return verdict

    def _owners_after(self, aid: str, run: RunState, end: float, start: float | None) -> None:
        """This run's latest figures as a contribution to each foreign owner's sum, queued in `owner_outbox`."""
        self.owner_outbox += self._contributions(aid, run, end, start)

    def apply_owner_messages(self) -> list[Detection]:
        """In process: apply the queued owner messages to this engine's own aggregator, in the order made."""
        msgs, self.owner_outbox = self.owner_outbox, []
        return [d for m in msgs for d in self.owner_agg.apply(m) if self._emit(d)]

    def _contributions(self, aid: str, run: RunState, end: float, start: float | None) -> list[dict[str, Any]]:
        acct = self._account(aid)
        rec = self.stitcher.runs.get(run.run_id)
        det = self.determination(aid)
        out: list[dict[str, Any]] = []
        for oid in det.foreign_owners:
            entry = {"account_id": aid, "used": run.used, "used_low": run.used_low, "used_high": run.used_high,
                     "rate": run.rate, "t": run.last_end, "reserved_until": acct.reserved_until,
                     "own_case": run.own_case, "band": (run.verdict or {}).get("band", "uncertain"),
                     "workloads": list(rec.workloads) if rec else [], "run": run.describe(),
                     "basis": dict(run.basis)}
            out.append(contribution(oid, aid, run.run_id, entry, t=end, start=start, foreign_since=acct.foreign_since,
                                    determination=det.to_dict(), cip_notes=list(acct.cip_notes)))
        return out

    def owner_accounts(self) -> dict[str, list[str]]:
        """Owner id -> the accounts here whose current CIP names it as a foreign owner."""
        if self._owner_index is None:
            idx: dict[str, list[str]] = {}
            for aid in sorted(self.cips):
                for oid in self.determination(aid).foreign_owners:
                    idx.setdefault(oid, []).append(aid)
            self._owner_index = idx
        return self._owner_index

    def account_progress(self) -> dict[str, float]:
        """Account -> the latest window end of its live runs (how far this engine has seen it in event time)."""
        out: dict[str, float] = {}
        for r in self.runs.values():
            out[r.account_id] = max(out.get(r.account_id, r.last_end), r.last_end)
        return out

    def owner_snapshot(self) -> list[dict[str, Any]]:
        """Every owner message this state implies, re-derived (an aggregator elsewhere, after a restart): a
        membership and each live run's latest figures for the owners an account's CIP names, a retraction for
        those it named before. All replace or are no-ops where already applied, so re-sending them is harmless and
        covers messages lost between the checkpoint and the publish."""
        out: list[dict[str, Any]] = []
        current = {aid: set(self.determination(aid).foreign_owners) for aid in self.cips}
        for aid in sorted(set(current) | set(self.named_owners)):
            now = current.get(aid, set())
            out += [retraction(o, aid) for o in self.named_owners.get(aid, []) if o not in now]
            out += [membership(o, aid) for o in sorted(now)]
            if now:
                for run in sorted((r for r in self.runs.values() if r.account_id == aid), key=lambda r: r.run_id):
                    out += self._contributions(aid, run, run.last_end, None)
        return out

    def on_time(self, event_time: float) -> list[Detection]:
        """Expire idle run and account state (emitted detection ids are kept: cases never expire)."""
        cutoff = event_time - self.idle_ttl_s
        runs = [r for r in (*self.stitcher.runs.values(), *self.runs.values()) if r.last_end < cutoff]
        self._dirty.update(r.account_id for r in runs)  # expiry's marks: what it drops
        for rid in self.stitcher.expire(cutoff):  # drops each run with its workload entries
            self.runs.pop(rid, None)
        for rid in [r for r, s in self.runs.items() if s.last_end < cutoff]:
            self.runs.pop(rid)
        with_runs = {r.account_id for r in self.runs.values()}
        gone = [a for a, s in self.accounts.items() if s.last_event < cutoff and not s.reservations and not s.held
                and a not in with_runs]
        self._dirty.update(gone)
        for aid in gone:
            self.accounts.pop(aid)
        return []

    def on_windows(self, windows: Iterable[Any]) -> list[Detection]:
        out: list[Detection] = []
        for w in windows:
            out += self.on_window(w)
        return out

    # -- state as plain data ---------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {"window_s": self.window_s, "watermark": self.watermark, "stitcher": self.stitcher.to_dict(),
                "runs": {k: v.to_dict() for k, v in self.runs.items()},
                "accounts": {k: v.to_dict() for k, v in self.accounts.items()},
                "cips": {k: v.model_dump(mode="json") for k, v in self.cips.items()},
                "owners": self.owner_agg.to_dict(),
                "emitted": dict(sorted(self.emitted.items())), "errors": dict(self.errors),
                "named_owners": {k: list(v) for k, v in sorted(self.named_owners.items())}}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], policy: Policy, classifier: WorkloadClassifier | None = None,
                  detectors: Iterable[Detector] | None = None) -> DetectEngine:
        e = cls(policy, classifier, d.get("window_s", 60.0), detectors)
        e.watermark = d.get("watermark", 0.0)
        e.stitcher = RunStitcher.from_dict(d.get("stitcher", {}))
        e.runs = {k: RunState.from_dict(v) for k, v in d.get("runs", {}).items()}
        e.accounts = {k: AccountState.from_dict(v) for k, v in d.get("accounts", {}).items()}
        e.cips = {k: CipRecord.model_validate(v) for k, v in d.get("cips", {}).items()}
        e.owner_agg.load(d.get("owners", {}))
        em = d.get("emitted", {})
        e.emitted = dict(em) if isinstance(em, Mapping) else dict.fromkeys(em, "")  # a list: the older format
        e.errors.update(d.get("errors", {}))  # the aggregator shares this dict
        e.named_owners = {k: list(v) for k, v in d.get("named_owners", {}).items()}
        return e
