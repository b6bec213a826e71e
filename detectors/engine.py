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

A corrected window re-decides (ARCHITECTURE.md, "Windows reach the engine cumulatively"). Each account keeps a
journal of the inputs applied to it over the last `redecide_s` of event time, in steps of one window end, each step
with a snapshot of the account's part of the state taken before it. When a window already applied comes again with
other figures (late rows of a slow partition, merged in), the account is put back to the snapshot before that
window's first delivery and the journal is applied again with the corrected window in its place: every decision
that depends on it (verdict, crossing, change in scope) comes out as if the whole window had come first. Detections
are never emitted twice: one re-found identical is dropped, one re-found under its id with other content is emitted
again (it supersedes: the store keeps the latest per id, the case book takes it as new figures), and one the
corrected history no longer makes stands (`redecided["stood"]`). Owner sums get the re-decided figures (latest
values replace; the owner's log re-decides its crossing, detectors/owner_aggregate.py). Older corrections replace the
window's figures and the decisions stand. A first delivery that comes after later inputs of its account (a window or
an allocation fetched late) goes back to its event-time place the same way (`_late_at`; a CIP record by its
`updated_at`, before the journal's first live step when older: `_late_cip_at`): decisions come out as if it had come
in order; past the journal it is applied where it comes, and only a detector dated by its first event
(`Detector.dated_by_first_event`: special measures) re-dates what it emitted, to the earlier event (never later), and
a reservation re-dates a run's projected crossing to where the in-order run made it (`_late_reservation`). The
journal survives a restart (`journal_to_dict` / `load_journal`, in the account's part of the
split state): the snapshot of its oldest step and every step's inputs; a restored engine retakes the other steps'
snapshots by applying the inputs again silently, only for an account a correction reaches (`_ready`). Several
corrections of one account at once (`on_corrections`, a batch's) roll back once, to the earliest,
and replay once: re-deciding each in turn replayed the later windows again for every one (the classifier is most of
the cost of a replay).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, fields, is_dataclass
from typing import Any

from detectors import registry
from detectors.base import DetectContext, Detector
from detectors.classifier_base import RuleClassifier, Verdict, WorkloadClassifier
from detectors.compute_threshold import crossing, projected_after
from detectors.fields import field_of as _g
from detectors.fields import finite_or_zero as _num
from detectors.foreign_person import ForeignDetermination, determine
from detectors.owner_aggregate import OwnerAggregator, contribution, membership, owner_level, retraction
from detectors.reservation_potential import reservation_potential
from detectors.runs import RunRecord, RunStitcher, footprint_of
from detectors.state import (
    HISTORY_K,
    REDECIDE_S,
    REPLACE_HORIZON_S,
    SOURCE_WINDOWS_K,
    SPELLS_K,
    WORKLOAD_IDS_K,
    AccountState,
    OwnerState,
    RunState,
    VerdictSummary,
    seen_window_start,
)
from detectors.windows import WorkloadWindow
from schemas import serde
from schemas.allocation import AllocationEvent
from schemas.cip import CipRecord
from schemas.detection import Detection
from schemas.ids import content_id
from schemas.policy import Policy
from schemas.windows import WindowAggregate

HOLD_KINDS = ("instance_started", "job_started", "reserved", "reservation_changed")
RELEASE_KINDS = ("instance_stopped", "job_stopped", "reservation_released")
STOP_KINDS = ("instance_stopped", "job_stopped")
RESERVATION_KINDS = ("reserved", "reservation_changed")
IDLE_TTL_S = 6 * 3600.0
#: Steps past the re-decide horizon an account's journal keeps before it drops them (they no longer re-decide): its
#: oldest step's snapshot is what a runtime persists to rebuild the journal after a restart, so it changes (and is
#: written again) once per this many steps, not at every window end.
JOURNAL_REBASE_STEPS = 20
_WORKLOAD_MAPS = ("workload_run", "workload_end", "workload_fp")
#: Classifier verdicts remembered by the history judged (a re-decision re-applies the windows of the account's other
#: runs with histories already judged: the classifier is most of the cost of applying a window)
VERDICT_MEMO_K = 4096
_MISSING = object()


class _Step:
    """One step of an account's journal: the inputs applied to it up to event time `t` (one window end), the
    account's part of the state before them, what they emitted (detection id -> fingerprint) and what the
    stitcher's `stopped` map held before an input of theirs changed it."""

    __slots__ = ("emitted", "expired", "inputs", "keys", "snap", "snap_d", "stopped", "t", "verdicts")

    def __init__(self, t: float, snap: dict[str, Any] | None) -> None:
        self.t, self.snap = t, snap  # snap None: not rebuilt yet (a journal restored from plain data)
        self.snap_d: dict[str, Any] | None = None  # the snapshot as plain data, once made (it never changes)
        self.inputs: list[tuple[str, Any]] = []
        self.keys: set[tuple[Any, float]] = set()  # (workload, window start) of the windows among the inputs
        self.emitted: dict[str, str] = {}
        self.stopped: dict[str, Any] = {}
        #: the classifier's verdicts its inputs were given (memo key -> verdict), kept with a persisted journal so a
        #: rebuild after a restart does not classify them again (`_classify`)
        self.verdicts: dict[bytes, Verdict] = {}
        #: runs of the account that expired (on_time) during the step: (inputs applied before, run id); a rebuild of
        #: the journal drops them where the live engine did
        self.expired: list[tuple[int, str]] = []


class _LateCip:
    """A CIP record put back in its place by a re-decision (`_late_cip_at`): re-applied at its own time."""

    __slots__ = ("cip",)

    def __init__(self, cip: CipRecord) -> None:
        self.cip = cip


def _clone(obj: Any) -> Any:
    """A copy of a state dataclass that later changes to the original do not reach: its lists and dicts are copied
    one level down. What they hold is shared: the engine replaces those values, never changes them in place (history
    entries, `seen` figures, verdicts, the scope baseline); an account's `activity["runs"]`, changed in place, is
    copied too. Sharing keeps a journal of 20 steps per account near the size of the state itself."""
    kw = {f.name: getattr(obj, f.name) for f in fields(obj)}
    out = type(obj)(**{k: dict(v) if isinstance(v, dict) else list(v) if isinstance(v, list) else v
                       for k, v in kw.items()})
    if isinstance(out, AccountState) and isinstance(out.activity.get("runs"), dict):
        out.activity["runs"] = dict(out.activity["runs"])
    return out


def _copy_snap(d: dict[str, Any]) -> dict[str, Any]:
    """A snapshot's copy that can be taken over by the live state while the original stays in its step."""
    return {"account": _clone(d["account"]) if d["account"] is not None else None,
            "runs": {k: _clone(r) for k, r in d["runs"].items()}, "recs": {k: _clone(r) for k, r in d["recs"].items()},
            "wl": {m: dict(v) for m, v in d["wl"].items()}, "cip": d["cip"],
            "named": list(d["named"]) if d["named"] is not None else None}


def _snap_to_dict(d: dict[str, Any]) -> dict[str, Any]:
    return {"account": d["account"].to_dict() if d["account"] is not None else None,
            "runs": {k: r.to_dict() for k, r in d["runs"].items()},
            "recs": {k: asdict(r) for k, r in d["recs"].items()}, "wl": d["wl"],
            "cip": d["cip"].model_dump(mode="json") if d["cip"] is not None else None,
            "named": d["named"]}


def _snap_from_dict(d: Mapping[str, Any]) -> dict[str, Any]:
    return {"account": AccountState.from_dict(d["account"]) if d.get("account") is not None else None,
            "runs": {k: RunState.from_dict(r) for k, r in d.get("runs", {}).items()},
            "recs": {k: RunRecord(**r) for k, r in d.get("recs", {}).items()},
            "wl": {m: dict(d.get("wl", {}).get(m, {})) for m in _WORKLOAD_MAPS},
            "cip": CipRecord.model_validate(d["cip"]) if d.get("cip") is not None else None,
            "named": list(d["named"]) if d.get("named") is not None else None}


#: the fields a window reference keeps besides its partials' ids: its key, and what `_window_sig` compares
_REF_FIELDS = ("workload_id", "account_id", "window_start", "window_end", "flop", "flop_low", "flop_high",
               "device_count", "sample_count")


def _is_ref(x: Any) -> bool:
    return isinstance(x, Mapping) and bool(x.get("ref"))


def _input_to_dict(kind: str, x: Any, refs: bool) -> Any:
    """One journal input as plain data. A merged window whose partials a runtime keeps (`refs`) is referenced by
    their ids (the merge is rebuilt from them on demand), else kept whole."""
    if kind != "win":
        return x.model_dump(mode="json")
    if _is_ref(x):
        return dict(x)
    if refs and _g(x, "window_ids"):
        return {"ref": 1, "window_ids": list(_g(x, "window_ids")), **{f: _g(x, f) for f in _REF_FIELDS}}
    if isinstance(x, WorkloadWindow):
        return {"cls": "ww", **asdict(x)}
    if isinstance(x, WindowAggregate):
        return {"cls": "wa", **x.model_dump(mode="json")}
    return {"cls": "map", **(asdict(x) if is_dataclass(x) and not isinstance(x, type) else dict(x))}


def _input_from_dict(kind: str, d: Mapping[str, Any]) -> Any:
    if kind == "cip":
        return CipRecord.model_validate(d)
    if kind == "alloc":
        return AllocationEvent.model_validate(d)
    if d.get("ref"):
        return dict(d)  # resolved when the journal is replayed (DetectEngine.window_source)
    body = {k: v for k, v in d.items() if k != "cls"}
    if d.get("cls") == "ww":
        return WorkloadWindow(**body)
    if d.get("cls") == "wa":
        return WindowAggregate.model_validate(body)
    return body


def _fingerprint(det: Detection) -> str:
    return content_id("fp", serde.dumps(det.model_dump(mode="json"), sort_keys=True).decode())


def _incomplete(w: Any, counted_flop: float) -> bool:
    """Whether `w` holds less FLOP than the delivery of its window already counted. A window's partials are disjoint
    rows and its merge only grows as they arrive, so less is a merge missing partials it had: after a restart whose
    state had gone past the committed offset, a re-read partial whose window's other partials were already dropped
    (past the allowed lateness; or tombstoned by a save whose engine entries a kill -9 lost: the partials are another
    topic). Counted again as that fraction, the window would lose the rest (kill fuzz: a run 1.19e16 FLOP short)."""
    return _num(_g(w, "flop")) < counted_flop


def _window_sig(w: Any) -> tuple[float, ...]:
    """What a re-delivery of a window may change: its figures (equal: a replay, nothing to decide again)."""
    return (_num(_g(w, "flop")), _num(_g(w, "flop_low")), _num(_g(w, "flop_high")), _num(_g(w, "device_count")),
            _num(_g(w, "sample_count")))
_CIP_FACTS = ("us_person", "country", "beneficial_owners", "reseller", "customer_name")


class DetectEngine:
    def __init__(self, policy: Policy, classifier: WorkloadClassifier | None = None, window_s: float = 60.0,
                 detectors: Iterable[Detector] | None = None, idle_ttl_s: float = IDLE_TTL_S,
                 redecide_s: float = REDECIDE_S):
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
        # Re-deciding corrected windows (module docstring): account -> journal steps, oldest first; the step the
        # input being applied belongs to; while re-applying, the ids the discarded steps emitted (-> fingerprint).
        self.redecide_s = redecide_s
        self._journal: dict[str, list[_Step]] = {}
        self._step_now: _Step | None = None
        self._redo: dict[str, str] | None = None
        self._silent = False  # rebuilding a restored journal: inputs applied again only to retake its snapshots
        #: resolves a window reference of a restored journal ({"window_ids", "workload_id", "window_start", ...})
        #: to the merged window (None: its partials are gone). Set by a runtime that keeps the partials
        #: (pipeline/detect/tables.py); with it the journal's windows are persisted as references.
        self.window_source: Callable[[Mapping[str, Any]], Any] | None = None
        #: what re-deciding did: corrections re-decided, inputs applied again, detections re-emitted with other
        #: content (superseding), detections the corrected history no longer makes (they stand), corrections too old,
        #: crossings re-dated by a reservation read after the windows past the journal (`_late_reservation`)
        self.redecided: dict[str, int] = {"corrections": 0, "rollbacks": 0, "inputs": 0, "superseded": 0, "stood": 0,
                                          "too_old": 0, "late_inputs": 0, "late_reservation": 0}
        self._verdicts: OrderedDict[bytes, Verdict] = OrderedDict()

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
        """Remember a detection id (False: emitted before). Its id goes into its account's checkpoint part. While a
        correction is re-applied, a detection the discarded steps emitted comes out again only with other content
        (the first time it is re-found; it supersedes the one emitted under its id)."""
        did = det.detection_id
        if self._silent:  # everything a rebuild finds was emitted (or stood) before the restart
            return False
        if did in self.emitted:
            if self._redo is None or did not in self._redo:
                return False
            fp = _fingerprint(det)
            if fp == self._redo.pop(did):
                self._note_emitted(did, fp)
                return False
            self.redecided["superseded"] += 1
            self._note_emitted(did, fp)
            return True
        self.emitted[did] = det.account_id
        if self._emitted_by is not None:
            self._emitted_by.setdefault(det.account_id, []).append(did)
        if self._step_now is not None:
            self._note_emitted(did, _fingerprint(det))
        return True

    def _note_emitted(self, did: str, fp: str) -> None:
        if self._step_now is not None:
            self._step_now.emitted[did] = fp

    def determination(self, account_id: str) -> ForeignDetermination:
        return determine(self.cips.get(account_id), self.policy)

    def _ctx(self, account_id: str, *, run: RunState | None = None, verdict: Verdict | None = None,
             owner: OwnerState | None = None) -> DetectContext:
        acct = self._account(account_id)
        rec = self.stitcher.runs.get(run.run_id) if run is not None else None
        return DetectContext(self.policy, self.window_s, account_id, self.determination(account_id),
                             self.cips.get(account_id), acct, run, list(rec.workloads) if rec else [],
                             list(rec.stitched) if rec else [], owner, verdict, acct.foreign_since)

    def _run(self, ctx: DetectContext, event: Any, per_run_on_cip: bool = False,
             crossing_again: bool = False) -> list[Detection]:
        """Each account-level detector (or only those that `reevaluates_runs_on_cip`, or `detect` alone of those that
        `reads_run_crossing` with `crossing_again`) over (ctx, event): `update`, then `detect`. One detector's
        exception is counted and the rest still run."""
        out: list[Detection] = []
        for d in self.detectors:
            if d.owner_level or (per_run_on_cip and not d.reevaluates_runs_on_cip) or (
                    crossing_again and not d.reads_run_crossing):
                continue
            try:
                if not crossing_again:
                    d.update(ctx, event)  # state a detector keeps is folded in first; detect only reads
                found = d.detect(ctx, event)
            except Exception:  # errors are data: count it per detector, never stop the stream
                self.errors[d.id] = self.errors.get(d.id, 0) + 1
                continue
            if ctx.run is not None:
                self._note_own_case(ctx.run, found)  # found, not only emitted: a re-applied claim still claims
            if d.dated_by_first_event:  # emitted again only dated earlier, and remembered when it is
                out += [det for det in found
                        if (self._redated(det) if det.detection_id in self.emitted else self._emit(det))]
                self._note_dated(ctx.account, found)
            else:
                out += [det for det in found if self._emit(det)]
        return out

    def _redated(self, det: Detection) -> bool:
        """A detection of a detector dated by its first event (Detector.dated_by_first_event), emitted before,
        re-found dated earlier than it was emitted: it supersedes, as the replay would have dated it. Dated the same
        or later it is the finding already emitted (also while re-deciding: the date only ever moves earlier)."""
        acct = self.accounts.get(det.account_id)
        was = acct.dated.get(det.detection_id) if acct is not None else None
        if self._redo is not None:
            self._redo.pop(det.detection_id, None)  # made again: not one that stood
        if self._silent or was is None or det.event_time >= was:
            return False
        self.redecided["superseded"] += 1
        self._note_emitted(det.detection_id, _fingerprint(det))
        return True

    @staticmethod
    def _note_dated(acct: AccountState | None, found: list[Detection]) -> None:
        if acct is None:
            return
        for det in found:  # state, so also while rebuilding silently
            was = acct.dated.get(det.detection_id)
            acct.dated[det.detection_id] = det.event_time if was is None else min(was, det.event_time)

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
        return self._journaled(cip.account_id, "cip", cip, None)

    def on_allocation(self, ev: AllocationEvent) -> list[Detection]:
        return self._journaled(ev.account_id, "alloc", ev, ev.ts)

    def on_window(self, w: Any) -> list[Detection]:
        """One merged workload window (detectors/windows.py WorkloadWindow, or anything with its fields). A window
        already applied that comes again with other figures re-decides (module docstring)."""
        aid = _g(w, "account_id")
        wid = _g(w, "workload_id")
        start, end = _num(_g(w, "window_start")), _num(_g(w, "window_end"))
        if not aid or not wid or end <= 0:
            self.errors["window_unattributed"] = self.errors.get("window_unattributed", 0) + 1
            return []
        fix = self._correction(aid, (wid, start), w)
        if fix is None:
            return self._journaled(aid, "win", w, end)
        return self._redecide(aid, {(wid, start): fix}) if fix else []

    def on_corrections(self, windows: Iterable[Any]) -> list[Detection]:
        """Windows already applied that come again (a batch's corrections), as `on_window` each would take them, but
        with one rollback and one replay per account: the account goes back to the step of the earliest one's first
        delivery and its journal is applied again with every corrected window in its place. The state comes out as
        after one `on_window` per correction; only the in-between versions of a detection (a correction re-decided
        while the next one's rows were still missing) are not emitted. One not in the journal (too old, or not
        applied before) goes through `on_window`."""
        out: list[Detection] = []
        held: list[tuple[str, tuple[Any, float], Any]] = []
        for w in windows:
            aid, wid = _g(w, "account_id"), _g(w, "workload_id")
            key = (wid, _num(_g(w, "window_start")))
            if aid and wid and _num(_g(w, "window_end")) > 0 and self._correction(aid, key, w) is not None:
                held.append((aid, key, w))
            else:
                out += self.on_window(w)
        fixes: dict[str, dict[tuple[Any, float], tuple[int, int, Any]]] = {}
        for aid, key, w in held:  # where in the journal: after the others above (they may add to its last step)
            fix = self._correction(aid, key, w)
            if fix:
                fixes.setdefault(aid, {})[key] = fix  # a later merge of the same window replaces (it holds more)
        for aid, fx in fixes.items():
            out += self._redecide(aid, fx)
        return out

    def _correction(self, aid: str, key: tuple[Any, float], w: Any) -> tuple[int, int, Any] | tuple[()] | None:
        """Where `w` (a window of the account's journal) was first delivered: (step, input index, w); () when `w`
        is that window as already applied (a replay) or less of it (`_incomplete`): nothing changes; None when the
        journal does not hold it."""
        steps = self._journal.get(aid, [])
        held = [si for si in range(self._live_from(steps), len(steps)) if key in steps[si].keys]
        if not held:
            return None
        latest = [x for kind, x in steps[held[-1]].inputs if kind == "win"
                  and (_g(x, "workload_id"), _num(_g(x, "window_start"))) == key][-1]
        if _window_sig(latest) == _window_sig(w) or _incomplete(w, _num(_g(latest, "flop"))):
            return ()
        return (held[0], next(ii for ii, (kind, x) in enumerate(steps[held[0]].inputs) if kind == "win"
                              and (_g(x, "workload_id"), _num(_g(x, "window_start"))) == key), w)

    # -- the journal: re-deciding corrected windows ---------------------------------------------------------------

    def _journaled(self, aid: str, kind: str, x: Any, t: float | None) -> list[Detection]:
        """Apply one input, recorded in its account's journal (a new step, with a snapshot, at a later event time)."""
        if self.redecide_s <= 0:
            return self._apply(kind, x)
        steps = self._journal.setdefault(aid, [])
        si = self._late_cip_at(aid, steps, x) if kind == "cip" else self._late_at(steps, t)
        if si is not None and self._ready(aid, si):
            self.redecided["late_inputs"] += 1
            return self._redecide(aid, {}, (si, kind, x))
        if not steps or (t is not None and t > steps[-1].t):
            steps.append(_Step(t if t is not None else self.watermark, self._snapshot(aid)))
            self._trim(steps)
        step = steps[-1]
        step.inputs.append((kind, x))
        if kind == "win":
            step.keys.add((_g(x, "workload_id"), _num(_g(x, "window_start"))))
        if kind == "alloc":
            for ref in (x.workload_id, x.job_id):
                if ref and x.kind in STOP_KINDS and ref not in step.stopped:
                    step.stopped[ref] = self.stitcher.stopped.get(ref, _MISSING)
        self._step_now = step
        try:
            return self._apply(kind, x)
        finally:
            self._step_now = None

    def _late_at(self, steps: list[_Step], t: float | None, *, older: bool = False) -> int | None:
        """The step a first delivery at event time `t` belongs before when it comes after later inputs (a window or
        allocation fetched late: another topic or partition read ahead): the first step after `t`, if re-decided
        still (the replay applies inputs in event-time order; this puts it there). `older`: one dated before every
        live step goes before the first (a CIP record: its customer's status decides the crossings after it, and
        decisions older than the horizon stand) rather than where it comes. None: in order, too old, or a
        re-application (replayed inputs keep their places)."""
        if t is None or not steps or t >= steps[-1].t or self._redo is not None or self._silent:
            return None
        if not older and t < steps[-1].t - self.redecide_s:
            return None
        si, live = next(i for i, step in enumerate(steps) if step.t > t), self._live_from(steps)
        return si if si >= live else live if older else None

    def _late_cip_at(self, aid: str, steps: list[_Step], cip: CipRecord) -> int | None:
        """`_late_at` for a CIP record dated before inputs its account's journal applied (the cip topic read behind
        the windows, as at a worker's start): the replay applies it in `updated_at` order. None also for a record
        that changes nothing (a redelivery or an older one: `_apply_cip` notes it where it comes)."""
        prev = self.cips.get(aid)
        if prev is not None and (cip.updated_at, cip.model_dump_json()) <= (prev.updated_at, prev.model_dump_json()):
            return None
        return self._late_at(steps, cip.updated_at, older=True)

    def _live_from(self, steps: list[_Step]) -> int:
        """The first step a correction still re-decides from: the newest one that began before the horizon
        (`redecide_s` behind the newest step); those before it are kept only as the base of a rebuild."""
        if not steps:
            return 0
        cut, k = steps[-1].t - self.redecide_s, 0
        while k + 1 < len(steps) and steps[k + 1].t < cut:
            k += 1
        return k

    def _trim(self, steps: list[_Step]) -> None:
        """Steps past the horizon: their snapshots dropped (never a base again), and the steps themselves once
        JOURNAL_REBASE_STEPS of them have gathered (where a `window_source` says the journal is persisted), down to
        the newest one with a snapshot at or before the first live step (the journal's base: steps[0] always has
        a snapshot)."""
        k = self._live_from(steps)
        for step in steps[1:k]:
            step.snap = step.snap_d = None
        # Without a runtime persisting references (in process) nothing rereads the base: dropped at once.
        if k >= (JOURNAL_REBASE_STEPS if self.window_source is not None else 1):
            j = max(i for i in range(k + 1) if steps[i].snap is not None)
            del steps[:j]

    def _apply(self, kind: str, x: Any) -> list[Detection]:
        if kind == "win":
            return self._apply_window(x)
        if kind == "alloc":
            return self._apply_allocation(x)
        return self._apply_cip(x)

    def _snapshot(self, aid: str) -> dict[str, Any]:
        """The account's part of the state (as detectors/snapshot.py splits it, less the emitted ids), copied."""
        st = self.stitcher
        recs = {rid: _clone(r) for rid, r in st.runs.items() if r.account_id == aid}
        wls = {w for r in recs.values() for w in r.workloads}
        acct = self.accounts.get(aid)
        return {"account": _clone(acct) if acct is not None else None,
                "runs": {k: _clone(r) for k, r in self.runs.items() if r.account_id == aid}, "recs": recs,
                "wl": {m: {w: getattr(st, m)[w] for w in wls if w in getattr(st, m)} for m in _WORKLOAD_MAPS},
                "cip": self.cips.get(aid), "named": self.named_owners.get(aid)}

    def _restore(self, aid: str, d: dict[str, Any], steps: list[_Step]) -> None:
        """Put the account's part back as the snapshot `d` holds it (its objects are taken over: the step it belonged
        to is discarded), undoing what `steps` (the discarded ones) changed."""
        st = self.stitcher
        wids = {w for r in st.runs.values() if r.account_id == aid for w in r.workloads}
        wids |= {str(_g(x, "workload_id")) for step in steps for kind, x in step.inputs if kind == "win"}
        for m in _WORKLOAD_MAPS:
            old, cur = d["wl"][m], getattr(st, m)
            for w in wids | set(old):
                if w in old:
                    cur[w] = old[w]
                else:
                    cur.pop(w, None)
        for step in reversed(steps):  # the earliest value before any discarded input changed it wins
            for ref, v in step.stopped.items():
                if v is _MISSING:
                    st.stopped.pop(ref, None)
                else:
                    st.stopped[ref] = v
        for rid in [k for k, r in st.runs.items() if r.account_id == aid]:
            st.runs.pop(rid)
        st.runs.update(d["recs"])
        for rid in [k for k, r in self.runs.items() if r.account_id == aid]:
            self.runs.pop(rid)
        self.runs.update(d["runs"])
        live = self.accounts.get(aid)
        if d["account"] is None:
            self.accounts.pop(aid, None)
        else:
            self.accounts[aid] = d["account"]
        if live is not None and live.dated:  # dates emitted (Detector.dated_by_first_event) stay, like `emitted`
            acct = self._account(aid)  # the inputs applied again begin with this account's: it is made anyway
            acct.dated = {k: min(v, acct.dated.get(k, v)) for k, v in live.dated.items()}
        if d["cip"] is None:
            self.cips.pop(aid, None)
        else:
            self.cips[aid] = d["cip"]
        if d["named"] is None:
            self.named_owners.pop(aid, None)
        else:
            self.named_owners[aid] = list(d["named"])
        self._owner_index = None

    def _redecide(self, aid: str, fixes: Mapping[tuple[Any, float], tuple[int, int, Any]],
                  insert: tuple[int, str, Any] | None = None) -> list[Detection]:
        """The account back to the step of the earliest corrected window's first delivery, then its journal applied
        again from there with each corrected window in the place of its first delivery (its later deliveries
        dropped: the corrected window is their merge). `fixes`: (workload, window start) -> (step, input index in
        that step, corrected window). `insert`: (step, kind, input) a late first delivery, applied first in that
        step's place (`_late_at`; the caller checked `_ready`)."""
        steps = self._journal[aid]
        si = min([f[0] for f in fixes.values()] + ([insert[0]] if insert else []))
        if fixes and not self._ready(aid, si):  # a restored journal whose windows can no longer be rebuilt: as too old
            self.errors["journal_unresolved"] = self.errors.get("journal_unresolved", 0) + 1
            self._journal.pop(aid, None)
            out: list[Detection] = []
            for f in sorted(fixes.values(), key=lambda f: f[:2]):
                out += self._journaled(aid, "win", f[2], _num(_g(f[2], "window_end")))
            return out
        gone = steps[si:]
        offset = dict.fromkeys(range(si, si + len(gone)), 0)
        for j in range(si + 1, si + len(gone)):
            offset[j] = offset[j - 1] + len(steps[j - 1].inputs)
        at = {key: offset[f[0]] + f[1] for key, f in fixes.items()}
        inputs: list[tuple[str, Any]] = []
        for n, (kind, x) in enumerate(i for step in gone for i in step.inputs):
            if insert and n == offset[insert[0]]:
                inputs.append((insert[1], insert[2] if insert[1] != "cip" else _LateCip(insert[2])))
            key = (_g(x, "workload_id"), _num(_g(x, "window_start"))) if kind == "win" else None
            if key in fixes:
                if n == at[key]:
                    inputs.append(("win", fixes[key][2]))
                continue
            inputs.append((kind, x))
        redo = {did: fp for step in gone for did, fp in step.emitted.items()}
        del steps[si:]
        self._touch(aid)
        self._restore(aid, gone[0].snap, gone)
        self.redecided["corrections"] += len(fixes)
        self.redecided["rollbacks"] += 1
        self.redecided["inputs"] += len(inputs)
        out = []
        self._redo = redo
        try:
            for kind, x in inputs:
                if isinstance(x, _LateCip):  # a step of its own at its time (before the step it was placed in)
                    x, t = x.cip, x.cip.updated_at
                else:  # any other CIP record joins the step before it, as it did (a clock ahead opens no step)
                    t = None if kind == "cip" else (x.ts if kind == "alloc" else _num(_g(x, "window_end")))
                out += self._journaled(aid, kind, x, t)
        finally:
            self._redo = None
        self.redecided["stood"] += len(redo)  # emitted from the partial window, not made again: they stand
        return out

    def _ready(self, aid: str, si: int) -> bool:
        """The journal of `aid` ready to re-decide from step `si`: its windows from the nearest snapshot at or
        before `si` resolved (a restored journal keeps references), and the snapshot of `si` rebuilt when it has
        none. False: a window's partials are gone (nothing has changed)."""
        steps = self._journal[aid]
        j = max(i for i in range(si + 1) if steps[i].snap is not None)
        for step in steps[j:]:
            for n, (kind, x) in enumerate(step.inputs):
                if kind == "win" and _is_ref(x):
                    w = self.window_source(x) if self.window_source is not None else None
                    if w is None:
                        return False
                    step.inputs[n] = ("win", w)
        if j < si:
            self._rebuild(aid, steps, j, si)
        return True

    def _rebuild(self, aid: str, steps: list[_Step], j: int, si: int) -> None:
        """Retake the snapshots of steps j+1..si of a restored journal: the account back to step j's snapshot, and
        the inputs of steps j..si-1 applied again (silently: what they emit was emitted before the restart, their
        owner messages were sent, their errors counted), with the run expiries the live engine did between them.
        Leaves the account as before step si (the re-decision restores that snapshot next)."""
        outbox, errors, counts = len(self.owner_outbox), dict(self.errors), dict(self.redecided)
        self._restore(aid, _copy_snap(steps[j].snap), steps[j:])  # type: ignore[arg-type]
        self._silent = True
        try:
            for k in range(j, si):
                step = steps[k]
                if k > j:
                    step.snap = self._snapshot(aid)
                for n, (kind, x) in enumerate(step.inputs):
                    self._expire_runs([rid for at, rid in step.expired if at == n])
                    self._apply(kind, x)
                self._expire_runs([rid for at, rid in step.expired if at >= len(step.inputs)])
            steps[si].snap = self._snapshot(aid)
        finally:
            self._silent = False
            del self.owner_outbox[outbox:]
            self.errors.clear()
            self.errors.update(errors)  # in place: the owner aggregator shares the dict
            self.redecided.update(counts)

    def _expire_runs(self, rids: list[str]) -> None:
        """Drop runs as `on_time` did (RunStitcher.expire for these runs alone)."""
        st = self.stitcher
        for rid in rids:
            rec = st.runs.pop(rid, None)
            for w in rec.workloads if rec is not None else ():
                for m in (st.workload_run, st.workload_end, st.stopped, st.workload_fp):
                    m.pop(w, None)
            self.runs.pop(rid, None)

    # -- the journal as plain data (detectors/snapshot.py puts it in the account's part) ----------------------------

    def journal_to_dict(self, aid: str) -> dict[str, Any] | None:
        """What rebuilds the account's journal after a restart: the snapshot of its oldest step (`base`) and each
        step's inputs, emitted ids, stop times replaced and run expiries; not the other steps' snapshots (a rebuild
        retakes them, `_rebuild`, only for an account a correction reaches). Windows are kept as references to
        their partials where a `window_source` can resolve them. The base is the same object until the journal
        drops its oldest steps (JOURNAL_REBASE_STEPS): a runtime may skip writing it again by identity."""
        steps = self._journal.get(aid)
        if not steps:
            return None
        base = steps[0]
        if base.snap_d is None:
            base.snap_d = _snap_to_dict(base.snap)  # type: ignore[arg-type]
        refs = self.window_source is not None
        return {"base": base.snap_d, "steps": [
            {"t": s.t, "in": [[kind, _input_to_dict(kind, x, refs)] for kind, x in s.inputs], "em": dict(s.emitted),
             "st": {ref: None if v is _MISSING else v for ref, v in s.stopped.items()},
             "ex": [list(e) for e in s.expired],
             **({"vd": {k.hex(): v.to_dict() for k, v in s.verdicts.items()}} if s.verdicts else {})} for s in steps]}

    def journal_oldest_window(self) -> float:
        """The earliest window start among the journals' windows (inf: none): a runtime persisting them as references
        keeps their partials until then."""
        return min((_num(_g(x, "window_start")) for steps in self._journal.values() for step in steps
                    for kind, x in step.inputs if kind == "win"), default=float("inf"))

    def load_journal(self, aid: str, d: Mapping[str, Any]) -> None:
        """The journal `journal_to_dict` made: its base snapshot on the oldest step, the others rebuilt on demand."""
        steps: list[_Step] = []
        for i, sd in enumerate(d.get("steps", [])):
            step = _Step(float(sd["t"]), _snap_from_dict(d["base"]) if i == 0 else None)
            step.snap_d = d["base"] if i == 0 else None
            step.inputs = [(kind, _input_from_dict(kind, x)) for kind, x in sd.get("in", [])]
            step.keys = {(_g(x, "workload_id"), _num(_g(x, "window_start"))) for kind, x in step.inputs
                         if kind == "win"}
            step.emitted = dict(sd.get("em", {}))
            step.stopped = {ref: _MISSING if v is None else v for ref, v in sd.get("st", {}).items()}
            step.expired = [(int(at), str(rid)) for at, rid in sd.get("ex", [])]
            # its verdicts into the memo: a rebuild of the journal (the first correction after a restart) applies
            # these inputs again, and classifying them took most of a restart's first batch (up to 8.5 of 9.7 s)
            for k, v in sd.get("vd", {}).items():
                key = bytes.fromhex(k)
                step.verdicts[key] = self._remember(key, Verdict.from_dict(v))
            steps.append(step)
        if steps:
            self._journal[aid] = steps

    def _apply_cip(self, cip: CipRecord) -> list[Detection]:
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
            out += self._run(ctx, cip, per_run_on_cip=True)
            self._owners_after(aid, run, run.last_end, None)
        return out

    def _apply_allocation(self, ev: AllocationEvent) -> list[Detection]:
        self._touch(ev.account_id, (ev.workload_id, ev.job_id))
        acct = self._account(ev.account_id)
        acct.note_event(ev.ts, self.window_s)
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
        out = self._run(self._ctx(ev.account_id), ev)
        if ev.kind in RESERVATION_KINDS and ev.reserved_until is not None:
            out += self._late_reservation(ev, acct)
        return out

    def _late_reservation(self, ev: AllocationEvent, acct: AccountState) -> list[Detection]:
        """A reservation applied after windows that end after it (read late, past the journal: in order, or put back
        in its place by a re-decision, no window after it has been applied yet): each run of the account gets the
        projected crossing the in-order run made (`projected_after`) when that is earlier than its own, and its
        compute finding is made again, dated there, on the verdict the run had then and on each one since
        (`RunState.spells`): a young run's `uncertain` opens needs_review as it did in order, though the run is
        confidently not_training by now."""
        th = self.policy.thresholds
        out: list[Detection] = []
        if not th.count_projected:
            return out
        for run in [r for r in self.runs.values() if r.account_id == ev.account_id and r.last_end > ev.ts]:
            c = projected_after(run.seen, run.used, ev.ts, acct.reservations.values(), threshold=th.training_ops,
                                window_s=self.window_s)
            if c is None or (run.crossed is not None and c["at"] >= run.crossed.get("window_end", run.crossed["at"])):
                continue
            self.redecided["late_reservation"] += 1
            run.crossed = c
            # decided as the in-order run was: on the verdict of the crossing's time, then each one after it
            now = run.verdict
            for v in run.verdicts_from(c["at"]) or [now]:
                run.verdict = {**(now or {}), **(v or {})} or None
                ctx = self._ctx(ev.account_id, run=run, verdict=Verdict.from_dict(v) if v else None)
                out += self._run(ctx, None, crossing_again=True)
            run.verdict = now
            self._owners_after(ev.account_id, run, run.last_end, None)
        return out

    def _apply_window(self, w: Any) -> list[Detection]:
        """Apply a window on_window has checked (every window in a journal came through it)."""
        aid = _g(w, "account_id")
        wid = _g(w, "workload_id")
        start, end = _num(_g(w, "window_start")), _num(_g(w, "window_end"))
        self._touch(aid, (wid,))
        acct = self._account(aid)
        acct.note_event(start, self.window_s)
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
        if run is not None and _incomplete(w, run.seen.get(f"{wid}|{start!r}", [0.0])[0]):
            self.errors["window_merge_incomplete"] = self.errors.get("window_merge_incomplete", 0) + 1
            return []
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
        entry = {"workload_id": wid, "window_start": start, "window_end": end,
                 "device_count": _g(w, "device_count", 0), "node_count": _g(w, "node_count") or
                 len(_g(w, "nodes") or ()), "basis": basis, "features": {}}
        at = next((i for i, h in enumerate(run.history) if h["workload_id"] == wid and h["window_start"] == start),
                  None)
        if not is_new:  # a correction past the re-decide horizon: its figures replace, decisions stand
            self.redecided["too_old"] += 1
            was = run.history[at]["basis"] if at is not None else None
            if was is not None and run.basis.get(was, 0) > 0:
                run.basis[was] -= 1
        if is_new or at is not None:
            run.basis[basis] = run.basis.get(basis, 0) + 1
        for win_id in list(_g(w, "window_ids") or ()) or [_g(w, "window_id") or content_id("win", wid, start)]:
            if win_id not in run.source_windows:
                run.source_windows.append(win_id)
        del run.source_windows[:-SOURCE_WINDOWS_K]
        feats = _g(w, "features")
        entry["features"] = dict(feats) if isinstance(feats, Mapping) else {}
        if at is not None:
            run.history[at] = entry  # each window once in the history, its latest delivery (a merge of all)
        elif is_new:
            run.history.append(entry)
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
        for key, flop in sorted(old.seen.items(), key=lambda kv: seen_window_start(kv[0])):
            run.add_window(key, seen_window_start(key) + self.window_s, (flop[0], flop[1], flop[2]), self.window_s)
        run.seen_floor = max(run.seen_floor, old.seen_floor)  # what the stitched run forgot stays uncounted
        run.started_at = old.started_at if run.started_at is None else min(run.started_at, old.started_at or 0.0)
        for b, n in old.basis.items():
            run.basis[b] = run.basis.get(b, 0) + n
        for b, n in old.bands_seen.items():
            run.bands_seen[b] = run.bands_seen.get(b, 0) + n
        judged = VerdictSummary.from_dict(old.judged)  # the young run's parts are the newer ones
        judged.merge(VerdictSummary.from_dict(run.judged))
        run.judged = judged.to_dict()
        run.spells = sorted(run.spells + old.spells, key=lambda sp: sp["t"])[-SPELLS_K:]
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
        # The model by its content where it has one (an artifact's sha256: a memo that outlives the process, the
        # journal's, never serves another model's verdict), else this object.
        model = getattr(self.classifier, "memo_id", None) or id(self.classifier)
        key = hashlib.blake2b(serde.dumps([model, run.history]), digest_size=16).digest()
        tail = self._verdicts.get(key)
        if tail is not None:
            self._verdicts.move_to_end(key)
        else:
            try:
                tail = self._remember(key, self.classifier.predict(run.history))
            except Exception:  # a classifier failure is uncertainty, never a crash
                self.errors["classifier"] = self.errors.get("classifier", 0) + 1
                tail = Verdict(0.5, "uncertain", [], "error", "", reasons=("between_bands",))
        if self._step_now is not None and isinstance(model, str) and tail.model_id != "error":
            self._step_now.verdicts[key] = tail
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
        if is_new and end >= run.last_end:
            run.note_spell(end)
        if is_new:  # windows judged per band: a corrected window was counted when it first came
            run.bands_seen[verdict.band] = run.bands_seen.get(verdict.band, 0) + 1
        return verdict

    def _remember(self, key: bytes, verdict: Verdict) -> Verdict:
        self._verdicts[key] = verdict
        self._verdicts.move_to_end(key)
        if len(self._verdicts) > VERDICT_MEMO_K:
            self._verdicts.popitem(last=False)
        return verdict

    def _owners_after(self, aid: str, run: RunState, end: float, start: float | None) -> None:
        """This run's latest figures as a contribution to each foreign owner's sum, queued in `owner_outbox`."""
        self.owner_outbox += self._contributions(aid, run, end, start)

    def apply_owner_messages(self) -> list[Detection]:
        """In process: apply the queued owner messages to this engine's own aggregator, in the order made."""
        msgs, self.owner_outbox = self.owner_outbox, []
        # an owner's crossing re-decided under the same id is a new version (OwnerAggregator._redecide): emitted
        return [d for m in msgs for d in self.owner_agg.apply(m) if self._emit(d) or "redecided_from" in d.evidence]

    def _contributions(self, aid: str, run: RunState, end: float, start: float | None) -> list[dict[str, Any]]:
        acct = self._account(aid)
        rec = self.stitcher.runs.get(run.run_id)
        det = self.determination(aid)
        out: list[dict[str, Any]] = []
        for oid in det.foreign_owners:
            entry = {"account_id": aid, "used": run.used, "used_low": run.used_low, "used_high": run.used_high,
                     "rate": run.rate, "t": run.last_end, "reserved_until": acct.reserved_until,
                     "own_case": run.own_case, "band": (run.verdict or {}).get("band", "uncertain"),
                     "workloads": list(rec.workloads[:WORKLOAD_IDS_K]) if rec else [],
                     "workload_count": len(rec.workloads) if rec else 0, "run": run.describe(),
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
        for aid, rid in dict.fromkeys((r.account_id, r.run_id) for r in runs):
            if self._journal.get(aid):  # where in the journal the run went (a rebuild drops it there too)
                last = self._journal[aid][-1]
                last.expired.append((len(last.inputs), rid))
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
        # Journals of accounts without input for longer than a window may still be corrected (REPLACE_HORIZON_S).
        for aid in [a for a, steps in self._journal.items() if not steps or steps[-1].t < event_time -
                    REPLACE_HORIZON_S]:
            self._journal.pop(aid)
            self._dirty.add(aid)  # its part no longer holds the journal
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
