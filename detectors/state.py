"""Detect state per account, run and beneficial owner: small, bounded, and plain-dict serialisable (faust tables).

Every list or map that grows with time is capped; the totals (used FLOP) are running sums, so forgetting old
windows costs only the ability to recognise a duplicate of a very old window.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

HISTORY_K = 16  # windows the classifier sees
#: (workload, window) keys remembered so a re-delivered or corrected window replaces, not adds: every key of a window
#: that can still be delivered (within `REPLACE_HORIZON_S` of the run's latest window end) is kept, up to this bound
SEEN_K = 8192
#: How far behind a run's latest window a window may still arrive and be counted (the ingest stage's allowed
#: lateness, 1 h, plus a window). One older than this whose key is forgotten is not counted again: a replay of
#: offsets must never add a window twice (exactly once where totals are summed).
REPLACE_HORIZON_S = 3660.0
RECENT_EVENTS_K = 64
SOURCE_WINDOWS_K = 32
RUN_IDS_K = 16  # job / workload ids (and accelerator models) kept in a run's description: the newest


def _cap_dict(d: dict[str, Any], k: int) -> None:
    while len(d) > k:
        d.pop(next(iter(d)))


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
    basis: dict[str, int] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    verdict: dict[str, Any] | None = None
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
                "job_ids": list(self.job_ids), "workload_ids": list(self.workload_ids)}

    def add_window(self, key: str, window_end: float, flop: tuple[float, float, float], window_s: float,
                   horizon_s: float = REPLACE_HORIZON_S) -> bool:
        """Add (or, for a re-delivered window, replace) one workload-window's FLOP. False: the window is older than
        the horizon and not remembered (a re-delivery of a window forgotten, or data past the allowed lateness):
        not counted, since it may have been counted already."""
        old = self.seen.get(key)
        if old is None and window_end < self.last_end - horizon_s:
            return False
        old = old or [0.0, 0.0, 0.0]
        d = [flop[i] - old[i] for i in range(3)]
        self.seen[key] = list(flop)
        if len(self.seen) > SEEN_K // 2:  # forget windows past the horizon (keys end in the window start)
            cut = self.last_end - horizon_s - window_s
            self.seen = {k: v for k, v in self.seen.items() if float(k.rsplit("|", 1)[1]) >= cut}
        _cap_dict(self.seen, SEEN_K)
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
    recent_events: list[float] = field(default_factory=list)
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

    def note_event(self, t: float) -> None:
        self.first_event = t if self.first_event is None else min(self.first_event, t)
        self.last_event = max(self.last_event, t)
        self.recent_events.append(t)
        if len(self.recent_events) > RECENT_EVENTS_K:
            self.recent_events.sort()
            del self.recent_events[: len(self.recent_events) - RECENT_EVENTS_K]


@dataclass(slots=True)
class OwnerState(_Plain):
    owner_id: str
    accounts: list[str] = field(default_factory=list)
    runs: dict[str, dict[str, Any]] = field(default_factory=dict)  # run id -> account, used, rate, ..., band
    crossed: dict[str, Any] | None = None
