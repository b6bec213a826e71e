"""Run stitching (ARCHITECTURE.md, case semantics rule 1): which jobs resume one training run. A pure state machine.

Same account and the same scheduler `run_label` -> one run. Without a label: a job whose footprint (accelerator
models and count) matches an unlabeled run of the same account and which starts within `gap_s` (30 min) after
that run's jobs ended resumes it. A job "ended" when an allocation said it stopped, else at its last window end;
a job still running beside it is not a resume (two concurrent look-alike jobs stay two runs).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from detectors.catalog import resolve
from schemas.ids import content_id

RESUME_GAP_S = 1800.0

Footprint = tuple[tuple[str, int], ...]


def footprint_of(accelerators: Mapping[str, int] | None, device_count: int) -> Footprint:
    """Accelerator models with their counts; an unknown model mix is keyed by the device count alone."""
    if accelerators:
        merged: dict[str, int] = {}
        for m, c in accelerators.items():
            acc = resolve(str(m))
            k = acc.key if acc is not None else str(m)  # "NVIDIA H100 80GB HBM3" and "H100" are one model
            merged[k] = merged.get(k, 0) + int(c)
        return tuple(sorted(merged.items()))
    return (("?", int(device_count)),)


@dataclass(slots=True)
class RunRecord:
    run_id: str
    account_id: str
    run_label: str | None
    footprint: list[list[Any]]
    workloads: list[str] = field(default_factory=list)
    started_at: float = 0.0
    last_end: float = 0.0
    stitched: list[dict[str, Any]] = field(default_factory=list)  # how each later job joined, for the evidence


class RunStitcher:
    def __init__(self, window_s: float = 60.0, gap_s: float = RESUME_GAP_S):
        self.window_s = window_s
        self.gap_s = gap_s
        self.runs: dict[str, RunRecord] = {}
        self.workload_run: dict[str, str] = {}
        self.workload_end: dict[str, float] = {}
        self.stopped: dict[str, float] = {}

    def note_stop(self, workload_id: str, ts: float) -> None:
        self.stopped[workload_id] = ts

    def _ended_at(self, workload_id: str) -> tuple[float, bool]:
        if workload_id in self.stopped:
            return self.stopped[workload_id], True
        return self.workload_end.get(workload_id, 0.0), False

    def _resumable(self, run: RunRecord, start: float) -> float | None:
        """End time of `run` when a job starting in the window at `start` may resume it, else None."""
        end = 0.0
        for w in run.workloads:
            t, known = self._ended_at(w)
            # A known stop may fall inside the new job's first (aligned) window; a window end must not overlap.
            if (known and t >= start + self.window_s) or (not known and t > start):
                return None
            end = max(end, t)
        return end if start - end <= self.gap_s + self.window_s else None

    def assign(self, account_id: str, workload_id: str, run_label: str | None, footprint: Footprint,
               window_start: float, window_end: float) -> str:
        """The run this workload's window belongs to (created when new)."""
        rid = self.workload_run.get(workload_id)
        if rid is None or rid not in self.runs:
            rid = self._place(account_id, workload_id, run_label, footprint, window_start)
        run = self.runs[rid]
        run.last_end = max(run.last_end, window_end)
        run.started_at = min(run.started_at, window_start)
        self.workload_end[workload_id] = max(self.workload_end.get(workload_id, 0.0), window_end)
        return rid

    def _place(self, account_id: str, workload_id: str, run_label: str | None, footprint: Footprint,
               start: float) -> str:
        fp = [list(x) for x in footprint]
        if run_label:
            rid = content_id("run", account_id, "label", run_label)
            how = {"workload_id": workload_id, "by": "run_label", "run_label": run_label, "at": start}
        else:
            best: tuple[float, str] | None = None
            for r in self.runs.values():
                if r.account_id != account_id or r.run_label or r.footprint != fp:
                    continue
                end = self._resumable(r, start)
                if end is not None and (best is None or end > best[0]):
                    best = (end, r.run_id)
            rid = best[1] if best else content_id("run", account_id, "first", workload_id)
            how = {"workload_id": workload_id, "by": "footprint", "footprint": fp, "at": start,
                   "gap_s": start - best[0] if best else None}
        run = self.runs.get(rid)
        if run is None:
            run = self.runs[rid] = RunRecord(rid, account_id, run_label or None, fp, started_at=start, last_end=start)
        elif workload_id not in run.workloads:
            run.stitched.append(how)
        if workload_id not in run.workloads:
            run.workloads.append(workload_id)
        self.workload_run[workload_id] = rid
        return rid

    def expire(self, before: float) -> list[str]:
        """Forget runs idle since before `before`; returns their ids."""
        gone = [rid for rid, r in self.runs.items() if r.last_end < before]
        self.stopped = {w: t for w, t in self.stopped.items() if t >= before or w in self.workload_run}
        for rid in gone:
            for w in self.runs.pop(rid).workloads:
                self.workload_run.pop(w, None)
                self.workload_end.pop(w, None)
                self.stopped.pop(w, None)
        return gone

    def to_dict(self) -> dict[str, Any]:
        return {"window_s": self.window_s, "gap_s": self.gap_s,
                "runs": {k: asdict(v) for k, v in self.runs.items()}, "workload_run": dict(self.workload_run),
                "workload_end": dict(self.workload_end), "stopped": dict(self.stopped)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RunStitcher:
        s = cls(d.get("window_s", 60.0), d.get("gap_s", RESUME_GAP_S))
        s.runs = {k: RunRecord(**v) for k, v in d.get("runs", {}).items()}
        s.workload_run = dict(d.get("workload_run", {}))
        s.workload_end = dict(d.get("workload_end", {}))
        s.stopped = dict(d.get("stopped", {}))
        return s
