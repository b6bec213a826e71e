"""Detect state per account, run and beneficial owner: small, bounded, and plain-dict serialisable (faust tables).

Every list or map that grows with time is capped; the totals (used FLOP) are running sums, so forgetting old
windows costs only the ability to recognise a duplicate of a very old window.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from detectors.classifier_base import Verdict

HISTORY_K = 16  # windows the classifier sees
#: (workload, window) keys remembered so a re-delivered or corrected window replaces, not adds: every key of a window
#: that can still be delivered (within `REPLACE_HORIZON_S` of the run's latest window end) is kept, up to this bound:
#: 61 windows of a run of 1,074 workloads. It was 8192 (134 workloads): the keys of a larger run's windows were
#: forgotten inside the horizon, and a late correction of one counted the whole window again.
SEEN_K = 65_536
#: Keys past the horizon are dropped once there are this many, and only when the oldest is this many windows past it:
#: checking every key on every window made each window cost O(keys) (2.7 ms a window for a 256-workload run).
SEEN_PRUNE_FROM = 1024
SEEN_PRUNE_SLACK_WINDOWS = 8
#: How far behind a run's latest window a window may still arrive and be counted (the ingest stage's allowed
#: lateness, 1 h, plus a window). One older than this whose key is forgotten is not counted again: a replay of
#: offsets must never add a window twice (exactly once where totals are summed).
REPLACE_HORIZON_S = 3660.0
#: disjoint stretches of activity an account remembers (AccountState.active): its oldest are forgotten past this
ACTIVE_SPANS_K = 64
SOURCE_WINDOWS_K = 32
SPELLS_K = 8  # a run's verdicts kept at the start of each band spell (RunState.spells): the newest
RUN_IDS_K = 16  # job / workload ids (and accelerator models) kept in a run's description: the newest
#: Workload ids a detection or an owner contribution lists (the first; beyond, a count): a message stays far below the
#: topics' limit whatever the run's size (ids are at most 1024 characters, schemas/telemetry.py MAX_ID_CHARS).
WORKLOAD_IDS_K = 256
NAMES_K = 16  # out-of-distribution features / missing fields kept in a run's verdict summary (the first named)


def _cap_dict(d: dict[str, Any], k: int) -> None:
    while len(d) > k:
        d.pop(next(iter(d)))


def seen_window_start(seen_key: str) -> float:
    """The window start a `RunState.seen` key ("workload|start") ends in."""
    return float(seen_key.rsplit("|", 1)[1])


def _int(v: Any) -> int:
    try:
        return max(0, int(v))
    except (TypeError, ValueError, OverflowError):
        return 0


class _Plain:
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]):  # type: ignore[no-untyped-def]
        names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        return cls(**{k: v for k, v in d.items() if k in names})


def _slim(v: Verdict) -> dict[str, Any]:
    """A verdict as a summary keeps it: its lists of names are folded into the summary's own (bounded) sets."""
    return {**v.to_dict(), "out_features": [], "missing": []}


def _union(into: list[str], more: Sequence[str], k: int) -> None:
    for x in more:
        if x not in into and len(into) < k:
            into.append(x)


@dataclass(slots=True)
class VerdictSummary(_Plain):
    """A run's verdict over its whole life, from the verdicts of its parts (blocks of up to HISTORY_K windows),
    kept in bounded form: window weight, P sums and the reasons per band, the extremes, the most confident
    training part and the newest part. `decide` is the whole-run rule (`combine_verdicts`): the window-weighted
    mean P; `not_training` only when every part was confidently not_training; `training` when at least half the
    windows lie in confidently training parts; otherwise `uncertain` (`mixed_phases` when parts disagree). The
    engine folds in each block of HISTORY_K new windows as it completes and judges the open block on the newest
    HISTORY_K windows (`decide(tail=...)`), so a 22-hour run is judged on all of it, not its last 16 windows."""

    windows: int = 0  # distinct workload-windows of the run seen (the engine's count)
    covered: int = 0  # of those, the windows in completed blocks
    open_since: float | None = None  # start of the open block's first window
    blocks: int = 0  # parts folded in
    weight: dict[str, float] = field(default_factory=dict)  # band -> windows in parts of that band
    p_sum: float = 0.0  # sum of P x weight
    p_low_sum: float = 0.0  # sum of (p_low or P) x weight
    p_high_sum: float = 0.0
    wide: bool = False  # some part had a P range (something was unknown)
    p_max: float | None = None
    p_min: float | None = None
    reasons: list[str] = field(default_factory=list)  # every part's reasons, in order first seen
    out_features: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    out_of_distribution: int = 0  # parts found outside the fitted region
    unchecked: int = 0  # parts with no fitted region (the interim rule): in_distribution None
    missing_information: int = 0  # parts that lacked a field or the accelerator
    training: dict[str, Any] | None = None  # the most confident training part: verdict, start, end
    first_training: dict[str, Any] | None = None  # the earliest confidently training part: start, end, P
    newest: dict[str, Any] | None = None  # the newest part's verdict

    def to_dict(self) -> dict[str, Any]:
        """As `asdict`, without its deep copy (the engine writes a run's summary at every window): the containers
        are copied one level; the part verdicts in them are shared, since `fold` and `merge` only ever replace
        those, never change them in place."""
        return {"windows": self.windows, "covered": self.covered, "open_since": self.open_since,
                "blocks": self.blocks, "weight": dict(self.weight), "p_sum": self.p_sum, "p_low_sum": self.p_low_sum,
                "p_high_sum": self.p_high_sum, "wide": self.wide, "p_max": self.p_max, "p_min": self.p_min,
                "reasons": list(self.reasons), "out_features": list(self.out_features), "missing": list(self.missing),
                "out_of_distribution": self.out_of_distribution, "unchecked": self.unchecked,
                "missing_information": self.missing_information, "training": self.training,
                "first_training": self.first_training, "newest": self.newest}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> VerdictSummary:
        """A summary that owns its containers: folding into it never changes `d` (a run's `judged`, which the
        engine's journal of corrected windows shares with its snapshots)."""
        s: VerdictSummary = _Plain.from_dict.__func__(cls, d)  # type: ignore[attr-defined]
        s.weight = dict(s.weight)
        s.reasons, s.out_features, s.missing = list(s.reasons), list(s.out_features), list(s.missing)
        return s

    def fold(self, v: Verdict, weight: float, start: float | None = None, end: float | None = None) -> None:
        """One more part (newer than every part folded so far) of `weight` windows spanning [start, end]."""
        self.blocks += 1
        self.weight[v.band] = self.weight.get(v.band, 0.0) + weight
        self.p_sum += v.p_training * weight
        self.p_low_sum += (v.p_low if v.p_low is not None else v.p_training) * weight
        self.p_high_sum += (v.p_high if v.p_high is not None else v.p_training) * weight
        self.wide = self.wide or v.p_low is not None
        self.p_max = v.p_training if self.p_max is None else max(self.p_max, v.p_training)
        self.p_min = v.p_training if self.p_min is None else min(self.p_min, v.p_training)
        _union(self.reasons, v.reasons, NAMES_K)
        _union(self.out_features, v.out_features, NAMES_K)
        _union(self.missing, v.missing, NAMES_K)
        self.out_of_distribution += v.in_distribution is False
        self.unchecked += v.in_distribution is None
        self.missing_information += bool(v.missing) or "missing_information" in v.reasons
        if v.band == "training":
            if self.training is None or v.p_training > self.training["verdict"]["p_training"]:
                self.training = {"verdict": _slim(v), "start": start, "end": end}
            if self.first_training is None:
                self.first_training = {"start": start, "end": end, "p_training": v.p_training}
        self.newest = _slim(v)

    def merge(self, older: VerdictSummary) -> None:
        """Fold in another run's summary whose parts are older than this one's (a run folded into this one)."""
        for b, w in older.weight.items():
            self.weight[b] = self.weight.get(b, 0.0) + w
        for name in ("windows", "covered", "blocks", "p_sum", "p_low_sum", "p_high_sum", "out_of_distribution",
                     "unchecked", "missing_information"):
            setattr(self, name, getattr(self, name) + getattr(older, name))
        self.wide = self.wide or older.wide
        ext = [x for x in (self.p_max, older.p_max) if x is not None]
        self.p_max = max(ext) if ext else None
        ext = [x for x in (self.p_min, older.p_min) if x is not None]
        self.p_min = min(ext) if ext else None
        for name in ("reasons", "out_features", "missing"):
            merged: list[str] = []
            _union(merged, getattr(older, name), NAMES_K)
            _union(merged, getattr(self, name), NAMES_K)
            setattr(self, name, merged)
        if older.training is not None and (self.training is None or older.training["verdict"]["p_training"]
                                           > self.training["verdict"]["p_training"]):
            self.training = older.training
        self.first_training = older.first_training or self.first_training
        self.newest = self.newest or older.newest

    def decide(self, tail: Verdict | None = None, tail_weight: float = 0.0,
               tail_span: tuple[float | None, float | None] = (None, None)) -> Verdict:
        """The run's verdict: the parts folded so far plus, when given, the open part (`tail`, `tail_weight`
        windows). The summary itself is not changed."""
        s = self
        if tail is not None and tail_weight > 0:
            s = VerdictSummary.from_dict(self.to_dict())
            s.fold(tail, tail_weight, *tail_span)
        total = sum(s.weight.values())
        if total <= 0 or s.newest is None:
            return Verdict(0.5, "uncertain", reasons=("between_bands",))
        p = s.p_sum / total
        if set(s.weight) == {"not_training"}:
            band, reasons = "not_training", ()
        elif s.weight.get("training", 0.0) / total >= 0.5:
            band, reasons = "training", ()
        else:
            band = "uncertain"
            reasons = tuple(dict.fromkeys([*(["mixed_phases"] if len(s.weight) > 1 else []), *s.reasons])) or (
                "between_bands",)
        lead = Verdict.from_dict(s.training["verdict"] if band == "training" and s.training else s.newest)
        return Verdict(
            p_training=round(p, 4), band=band, top_features=list(lead.top_features), model_id=lead.model_id,
            model_version=lead.model_version, reasons=reasons, out_features=tuple(s.out_features),
            missing=tuple(s.missing), p_low=round(s.p_low_sum / total, 4) if s.wide else None,
            p_high=round(s.p_high_sum / total, 4) if s.wide else None,
            in_distribution=None if s.unchecked else not s.out_of_distribution)

    def basis(self, tail: Verdict | None = None, tail_weight: float = 0.0) -> dict[str, Any]:
        """What the run's verdict rests on, for the case evidence: parts judged, windows per band, extremes, how
        many parts were out of distribution or lacked information, and the most confident training part."""
        s = self
        if tail is not None and tail_weight > 0:
            s = VerdictSummary.from_dict(self.to_dict())
            s.fold(tail, tail_weight)
        return {"rule": "whole run: not_training only if every part was; training if >= half the windows were "
                        "in confidently training parts; else uncertain",
                "windows": self.windows, "parts_judged": s.blocks, "blocks_completed": self.blocks,
                "part_windows": HISTORY_K, "windows_by_band": dict(s.weight), "p_max": s.p_max, "p_min": s.p_min,
                "parts_out_of_distribution": s.out_of_distribution,
                "parts_missing_information": s.missing_information,
                "training_part": None if s.training is None else {
                    "start": s.training["start"], "end": s.training["end"],
                    "p_training": s.training["verdict"]["p_training"],
                    "top_features": s.training["verdict"]["top_features"]},
                "first_training_part": s.first_training}


def combine_verdicts(parts: Sequence[Verdict], weights: Sequence[float]) -> Verdict:
    """One verdict for a whole run from the verdicts of its consecutive parts (oldest first), by the same rule
    the detect engine applies as a run goes on (VerdictSummary). `trainwatch classify` judges a run's parts with
    it (detectors/classifier.py combine_parts calls it; tests/test_run_verdict.py checks both against the rule)."""
    s = VerdictSummary()
    for v, w in zip(parts, weights, strict=True):
        s.fold(v, float(w))
    return s.decide()


@dataclass(slots=True)
class RunState(_Plain):
    run_id: str
    account_id: str
    used: float = 0.0
    used_low: float = 0.0
    used_high: float = 0.0
    started_at: float | None = None
    last_end: float = 0.0
    rate: float = 0.0  # FLOP/s in the window ending at last_end (contract rule 3)
    window_flop: dict[str, float] = field(default_factory=dict)  # str(window_end) -> run FLOP in that window
    seen: dict[str, list[float]] = field(default_factory=dict)  # "workload|start" -> [flop, low, high]
    #: the latest window end among keys forgotten inside the horizon (SEEN_K reached): a window that old and not
    #: remembered is not counted, as one past the horizon is not (it may have been counted already)
    seen_floor: float = 0.0
    basis: dict[str, int] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    verdict: dict[str, Any] | None = None  # the run-level verdict (VerdictSummary.decide) and since when
    #: the run verdict at the first window of each band spell, with that window's end `t` (the newest SPELLS_K): a
    #: crossing re-dated into the past is decided on the verdict of its time (DetectEngine._late_reservation)
    spells: list[dict[str, Any]] = field(default_factory=list)
    judged: dict[str, Any] = field(default_factory=dict)  # VerdictSummary: the verdicts over the whole run
    bands_seen: dict[str, int] = field(default_factory=dict)
    crossed: dict[str, Any] | None = None  # first crossing: at, reason, figures (whatever the person's status)
    source_windows: list[str] = field(default_factory=list)
    own_case: bool = False  # a reportable / needs_review detection of its own was emitted
    # The run's description for the report: the largest footprint seen in one window, and the ids it ran under.
    accelerators: dict[str, int] = field(default_factory=dict)  # model -> device count (max in one window)
    device_count: int = 0
    node_count: int = 0
    job_ids: list[str] = field(default_factory=list)
    workload_ids: list[str] = field(default_factory=list)

    def note_spell(self, end: float) -> None:
        """Record the run verdict (just set for the window ending `end`) when its band differs from the last spell's;
        without its `basis` (the blocks it was judged on: half its size, and no detector decides on it)."""
        if self.verdict is not None and (not self.spells or self.spells[-1]["band"] != self.verdict["band"]):
            self.spells.append({**{k: v for k, v in self.verdict.items() if k != "basis"}, "t": end})
            del self.spells[:-SPELLS_K]

    def verdicts_from(self, t: float) -> list[dict[str, Any]]:
        """The run verdicts in force from `t` on: the spell `t` falls in (the oldest kept, if `t` is older) and every
        later one (without `t`)."""
        k = max([i for i, sp in enumerate(self.spells) if sp["t"] <= t], default=0)
        return [{k2: v for k2, v in sp.items() if k2 != "t"} for sp in self.spells[k:]]

    def describe_window(self, *, workload_id: str, job_id: str | None, accelerators: Mapping[str, Any] | None,
                        device_count: Any, node_count: Any) -> None:
        """Fold one window's footprint and ids into the run's description (maxima, bounded id lists)."""
        for model, n in (accelerators.items() if isinstance(accelerators, Mapping) else ()):
            self.accelerators[str(model)] = max(self.accelerators.get(str(model), 0), _int(n))
        _cap_dict(self.accelerators, RUN_IDS_K)
        self.device_count = max(self.device_count, _int(device_count))
        self.node_count = max(self.node_count, _int(node_count))
        for ids, ref in ((self.workload_ids, workload_id), (self.job_ids, job_id)):
            if ref and ref not in ids:
                ids.append(str(ref))
                del ids[:-RUN_IDS_K]

    def describe(self) -> dict[str, Any]:
        """The run as the case report reads it (evidence key `run`)."""
        return {"run_id": self.run_id, "accelerators": dict(self.accelerators),
                "device_count": self.device_count or None, "node_count": self.node_count or None,
                "start": self.started_at, "end": self.last_end or None,
                "job_ids": list(self.job_ids), "workload_ids": list(self.workload_ids),
                "verdict_basis": (self.verdict or {}).get("basis")}

    def add_window(self, key: str, window_end: float, flop: tuple[float, float, float], window_s: float,
                   horizon_s: float = REPLACE_HORIZON_S) -> bool:
        """Add (or, for a re-delivered window, replace) one workload-window's FLOP. False: the window is older than
        the horizon and not remembered (a re-delivery of a window forgotten, or data past the allowed lateness):
        not counted, since it may have been counted already."""
        old = self.seen.get(key)
        if old is None and (window_end < self.last_end - horizon_s or window_end <= self.seen_floor):
            return False
        old = old or [0.0, 0.0, 0.0]
        d = [flop[i] - old[i] for i in range(3)]
        self.seen[key] = list(flop)
        # Keys end in the window start; the oldest inserted comes first (a correction keeps its key's place).
        cut = self.last_end - horizon_s - window_s
        slack = SEEN_PRUNE_SLACK_WINDOWS * window_s
        if len(self.seen) > SEEN_PRUNE_FROM and seen_window_start(next(iter(self.seen))) < cut - slack:
            self.seen = {k: v for k, v in self.seen.items() if seen_window_start(k) >= cut}
        while len(self.seen) > SEEN_K:
            gone = next(iter(self.seen))
            del self.seen[gone]
            self.seen_floor = max(self.seen_floor, seen_window_start(gone) + window_s)
        self.used += d[0]
        self.used_low += d[1]
        self.used_high += d[2]
        wk = repr(float(window_end))
        self.window_flop[wk] = self.window_flop.get(wk, 0.0) + d[0]
        _cap_dict(self.window_flop, 8)
        if window_end >= self.last_end:
            self.last_end = window_end
            self.rate = self.window_flop[wk] / window_s
        return True


@dataclass(slots=True)
class AccountState(_Plain):
    account_id: str
    held: dict[str, dict[str, Any]] = field(default_factory=dict)  # allocation key -> model, count, network
    reservations: dict[str, dict[str, Any]] = field(default_factory=dict)  # key -> ts, until, count, model
    labels: dict[str, str] = field(default_factory=dict)  # workload/job id -> scheduler run_label
    footprints: dict[str, list[Any]] = field(default_factory=dict)  # workload id -> [[model, count]]
    #: the account's activity as [first, last] event times of runs of events less than a window apart (an event
    #: covers [t, t + window)), oldest first: special measures dates a CIP record that came late by the first event
    #: at or after it, however many events came before the record did (detectors/special_measures.py)
    active: list[list[float]] = field(default_factory=list)
    #: detection id -> the event time it was emitted with, for detectors dated by their first event
    #: (Detector.dated_by_first_event): one re-found dated earlier (an event that came late) supersedes it
    dated: dict[str, float] = field(default_factory=dict)
    first_event: float | None = None
    last_event: float = 0.0
    potential: float = 0.0  # maximum possible compute of the reservations now held
    potential_prev: float = 0.0
    potential_at: float | None = None
    activity: dict[str, Any] = field(default_factory=dict)  # below-threshold history for change in scope
    cip_notes: list[dict[str, Any]] = field(default_factory=list)
    foreign_since: float | None = None

    @property
    def reserved_until(self) -> float | None:
        ends = [r["until"] for r in self.reservations.values() if r.get("until") is not None]
        return max(ends) if ends else None

    def note_event(self, t: float, window_s: float) -> None:
        self.first_event = t if self.first_event is None else min(self.first_event, t)
        self.last_event = max(self.last_event, t)
        sp = self.active  # from the newest: an event in order touches the last span, one step
        hi = len(sp)
        while hi and sp[hi - 1][0] > t + window_s:
            hi -= 1
        lo = hi
        while lo and sp[lo - 1][1] + window_s >= t:  # the spans [t, t + window) touches, merged with it
            lo -= 1
        sp[lo:hi] = [[min(t, sp[lo][0]), max(t, sp[hi - 1][1])] if lo < hi else [t, t]]
        del sp[: max(0, len(sp) - ACTIVE_SPANS_K)]

    def first_active_after(self, after: float, window_s: float) -> float | None:
        """The event time of the first event at or after `after` (`after` itself when an event's window covers it)."""
        later = [max(s, after) for s, e in self.active if e + window_s > after]
        return min(later) if later else None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> AccountState:
        a: AccountState = _Plain.from_dict.__func__(cls, d)  # type: ignore[attr-defined]
        if "recent_events" in d and "active" not in d:  # the format before 2026-12-06: single events
            a.active = [[t, t] for t in sorted(d["recent_events"])][-ACTIVE_SPANS_K:]
        return a


#: How far back in event time (behind the newest input) an input still re-decides, in an account's journal
#: (detectors/engine.py) and in an owner's log: the simulator's late rows come 90-900 s after their window, which
#: detect applied once settled (two windows after the slowest telemetry partition); 20 windows covers that with room.
REDECIDE_S = 1200.0


@dataclass(slots=True)
class OwnerState(_Plain):
    owner_id: str
    accounts: list[str] = field(default_factory=list)
    runs: dict[str, dict[str, Any]] = field(default_factory=dict)  # run id -> account, used, rate, ..., band
    crossed: dict[str, Any] | None = None
    #: the contributions of the last `REDECIDE_S` of event time, in event-time order (detectors/owner_aggregate.py
    #: `OwnerAggregator`): the crossing is found again from them when one arrives out of order
    log: list[dict[str, Any]] = field(default_factory=list)
    #: run id -> its figures before the log's first entry
    base: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: account -> what an owner detection made at its contribution needs (determination, CIP notes, foreign since)
    account_ctx: dict[str, dict[str, Any]] = field(default_factory=dict)
