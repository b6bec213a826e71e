"""Run stitching (ARCHITECTURE.md, case semantics rule 1): which jobs resume one training run. A pure state machine.

Same account and the same scheduler `run_label` -> one run. Without a label: a job whose footprint (accelerator
models and count) matches an unlabeled run of the same account and which starts within `gap_s` (30 min) after
that run's jobs ended resumes it. A job "ended" when an allocation said it stopped, else at its last window end;
a job still running beside it is not a resume (two concurrent look-alike jobs stay two runs).

Same answer in any arrival order. A run's id is a function of the data: (account, label) or (account, the workload
that began it). A footprint is *firm* when an allocation gave it, else *provisional*: read from windows, which on
Kafka may be a partial merge (8 of 16 devices) or arrive before the job's allocation. A provisional footprint only
grows (more devices, a known model); a firm one replaces it. While a workload is alone in a run it began, young
(within `gap_s` of its start) and without a crossing of its own, its placement is decided again on each window
with what is known by then; if it now resumes another run, `assign` reports the move and the engine folds the
young run into that one. So the run a job joins no longer depends on whether its allocation or its first complete
window came first (the replay sees the allocation first; a restarted faust worker often the windows).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from detectors.catalog import resolve
from schemas.ids import content_id

RESUME_GAP_S = 1800.0

Footprint = tuple[tuple[str, int], ...]


def _fp_rank(fp: list[list[Any]], firm: bool) -> tuple[int, int, int]:
    """Which of two footprints of one workload is the better knowledge: firm beats provisional; then known models,
    then more devices (a partial merge of a window sees fewer)."""
    return (int(firm), int(not any(m == "?" for m, _ in fp)), sum(int(c) for _, c in fp))


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
        #: workload -> [footprint, firm] as best known (see the module docstring)
        self.workload_fp: dict[str, list[Any]] = {}

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
               window_start: float, window_end: float, firm: bool = False) -> tuple[str, str | None]:
        """The run this workload's window belongs to (created when new), and the young run it left for it (else
        None: the engine folds that run's state into the returned one)."""
        fp = [list(x) for x in footprint]
        known = self.workload_fp.get(workload_id)
        if known is None or _fp_rank(fp, firm) > _fp_rank(known[0], bool(known[1])):
            self.workload_fp[workload_id] = [fp, firm]
        rid = self.workload_run.get(workload_id)
        left: str | None = None
        if rid is None or rid not in self.runs:
            rid = self._place(account_id, workload_id, run_label, window_start)
        else:
            if self.runs[rid].workloads[:1] == [workload_id]:  # a run's footprint is its first job's, as best known
                self.runs[rid].footprint = self.workload_fp[workload_id][0]
            if self._young(rid, workload_id, window_end) and self._resumes(
                    account_id, workload_id, self.runs[rid].started_at, exclude=rid) is not None:
                # better knowledge: this job resumes an earlier run after all
                left = rid
                old = self.runs.pop(left)
                self.workload_run.pop(workload_id, None)
                rid = self._place(account_id, workload_id, run_label, old.started_at)
                self.runs[rid].started_at = min(self.runs[rid].started_at, old.started_at)
        run = self.runs[rid]
        run.last_end = max(run.last_end, window_end)
        run.started_at = min(run.started_at, window_start)
        self.workload_end[workload_id] = max(self.workload_end.get(workload_id, 0.0), window_end)
        return rid, left

    def _young(self, rid: str, workload_id: str, window_end: float) -> bool:
        """The run was begun by this workload alone, without a label, within `gap_s`: its placement may change."""
        run = self.runs[rid]
        return (not run.run_label and run.workloads == [workload_id] and not run.stitched
                and window_end - run.started_at <= self.gap_s + self.window_s)

    def _resumes(self, account_id: str, workload_id: str, start: float, exclude: str | None = None) -> str | None:
        """The unlabeled run of the account with this workload's footprint that a job starting at `start` resumes
        (the one that ended last), else None."""
        fp = self.workload_fp[workload_id][0]
        best: tuple[float, str] | None = None
        for r in self.runs.values():
            if r.run_id == exclude or r.account_id != account_id or r.run_label or r.footprint != fp:
                continue
            end = self._resumable(r, start)
            if end is not None and (best is None or (end, r.run_id) > best):
                best = (end, r.run_id)
        return best[1] if best else None

    def _place(self, account_id: str, workload_id: str, run_label: str | None, start: float) -> str:
        fp = self.workload_fp[workload_id][0]
        if run_label:
            rid = content_id("run", account_id, "label", run_label)
            how = {"workload_id": workload_id, "by": "run_label", "run_label": run_label, "at": start}
        else:
            target = self._resumes(account_id, workload_id, start)
            rid = target or content_id("run", account_id, "first", workload_id)
            gap = start - self._resumable(self.runs[target], start) if target else None  # type: ignore[operator]
            how = {"workload_id": workload_id, "by": "footprint", "footprint": fp, "at": start, "gap_s": gap}
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
                self.workload_fp.pop(w, None)
        return gone

    def to_dict(self) -> dict[str, Any]:
        return {"window_s": self.window_s, "gap_s": self.gap_s,
                "runs": {k: asdict(v) for k, v in self.runs.items()}, "workload_run": dict(self.workload_run),
                "workload_end": dict(self.workload_end), "stopped": dict(self.stopped),
                "workload_fp": dict(self.workload_fp)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RunStitcher:
        s = cls(d.get("window_s", 60.0), d.get("gap_s", RESUME_GAP_S))
        s.runs = {k: RunRecord(**v) for k, v in d.get("runs", {}).items()}
        s.workload_run = dict(d.get("workload_run", {}))
        s.workload_end = dict(d.get("workload_end", {}))
        s.stopped = dict(d.get("stopped", {}))
        s.workload_fp = dict(d.get("workload_fp", {}))
        return s
