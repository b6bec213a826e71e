"""The detect stage's core, without Kafka: windows, CIP records, allocations and time in; typed outputs out.

The in-process runner (pipeline/runner.py) and the faust app (pipeline/detect/faust_app.py) both only feed this and
carry what it returns (`DetectOutput`): detections, the CIP records it applied (the cases stage refreshes identity
and revises cases from them), and owner messages (schemas/owner.py).

Event time across topics. Windows, CIP records and allocations of a partition are applied in event-time order up
to a watermark: the latest window end seen (`clock`). A CIP record or allocation at t is held until a window
ending after t arrives, so it acts between the windows before it and the windows after it, whatever order the
topics were fetched in (faust interleaves them by fetch; a whole topic may be read before another). Windows are
the clock because they are the dense stream; a record held when the windows stop (the end of a finite input, or
an idle partition) is released by `flush()` (the runner's `finish`, the faust app's idle rule).
A record that arrives *behind* the clock (a CIP record entered late) is applied at once and revises: the engine
re-evaluates the account's live runs under it (a run judged while the customer was unknown-treated-as-foreign
becomes `monitored` when the record shows a U.S. person; the cases stage revises the case). How late it may be:
as long as the run's state lives, `detectors.engine.IDLE_TTL_S` (6 h of event time after the run's last window);
after that, the run's case is no longer revised by it (its identity snapshot still is).

Settling. A workload-window's partials come from every telemetry partition that carries the workload's nodes, at
different moments (each ingest partition emits when its own watermark passes). The engine decides on what it is
handed (a first classification, a crossing), so a first merge of 8 of 16 devices could open a case the whole
window never would. A new workload-window therefore waits, merged as its partials arrive, until the *slowest*
telemetry partition seen here has passed its end by `settle_s` (two windows by default), and is then applied in
event-time order with the held CIP records and allocations (equal ends in workload order, as one ingest partition
emits them): the engine sees the whole window whatever the telemetry partitioning, as in the replay. Each telemetry
partition's progress is the latest window end seen from it (`progress`, by the windows' `partition`); the fastest
one alone would settle windows whose other partials a lagging partition has not emitted yet (one partition may run
minutes ahead: Kafka fetch order; in process a batch is read partition by partition). A partition that is idle,
ended or carries none of these accounts lately is not waited for, so nothing stalls; which one that is, the caller
says, since the stage has no wall clock:
- the transport (the faust app) names the partitions it has not heard from for a while of *processing* time
  (`set_quiet`, pipeline/detect/batch.py `QuietSources`) and sets `partition_wait_s` to infinity: a partition
  restarting or catching up is minutes of event time behind when the stream is replayed fast, yet it is alive;
- without one (the in-process runner reads a finite input, no wall clock) a partition more than `partition_wait_s`
  (15 windows of event time) behind the clock is left out, and the end of the input flushes.
A partition going quiet costs that wait once (afterwards windows settle settle_s behind the partitions still
moving); a window from it brings it back. A partial arriving after its window was applied (a correction, or one
from a partition left out) is applied at once and the engine replaces the window. `applied_to` is the event time
the engine has reached (the owners' partition mark): it follows the slowest partition waited for, never moves back
except when a partition is first seen (the windows still held wait for it too; what was applied stays applied).

Owners. The engine queues owner messages (contributions, memberships, retractions) in its outbox. With
`owners="local"` (in process) the stage applies them at once to the engine's own aggregator, in the order made;
with `owners="external"` (the faust app) they are returned for the transport to carry to the owners agent.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from detectors.classifier_base import WorkloadClassifier
from detectors.engine import DetectEngine
from pipeline.detect.merger import WindowMerger
from schemas.allocation import AllocationEvent
from schemas.cip import CipRecord
from schemas.detection import Detection
from schemas.owner import OwnerMessage
from schemas.policy import Policy
from schemas.windows import WindowAggregate


@dataclass
class DetectOutput:
    detections: list[Detection] = field(default_factory=list)
    #: CIP records applied, in the order applied (the cases stage: identity refresh, revisions)
    cips: list[CipRecord] = field(default_factory=list)
    #: owner messages made (only with owners="external"), in the order made
    owner_messages: list[OwnerMessage] = field(default_factory=list)
    #: accounts whose engine state this output may have changed (the runtime's checkpoint unit)
    accounts: set[str] = field(default_factory=set)

    def extend(self, other: DetectOutput) -> DetectOutput:
        self.detections += other.detections
        self.cips += other.cips
        self.owner_messages += other.owner_messages
        self.accounts |= other.accounts
        return self

    def __bool__(self) -> bool:
        return bool(self.detections or self.cips or self.owner_messages)

    def __iter__(self) -> Iterator[Detection]:  # callers that only want detections: list(out), dets += out
        return iter(self.detections)


Side = CipRecord | AllocationEvent
#: a workload-window waiting to settle: (workload id, window start, window end)
WindowKey = tuple[str, float, float]
#: how long past its end a new workload-window waits for the partials of other telemetry partitions (windows)
SETTLE_WINDOWS = 2.0
#: how far (event time) a telemetry partition may trail the fastest one and still hold windows back (windows); one
#: further behind (idle, ended, or carrying none of this partition's accounts for a while) is not waited for
PARTITION_WAIT_WINDOWS = 15.0


def _side_time(rec: Side) -> float:
    return rec.updated_at if isinstance(rec, CipRecord) else rec.ts


class DetectStage:
    def __init__(self, policy: Policy, classifier: WorkloadClassifier | None = None, window_s: float = 60.0,
                 lateness_s: float = 3600.0, *, owners: Literal["local", "external"] = "local",
                 settle_s: float | None = None, partition_wait_s: float | None = None) -> None:
        self.policy = policy
        self.settle_s = SETTLE_WINDOWS * window_s if settle_s is None else settle_s
        self.partition_wait_s = PARTITION_WAIT_WINDOWS * window_s if partition_wait_s is None else partition_wait_s
        self.classifier = classifier
        self.window_s = window_s
        self.engine = DetectEngine(policy, classifier, window_s)  # owner messages: routed here (module docstring)
        self.owners = owners
        self.merger = WindowMerger(lateness_s)
        #: event time: the latest window end seen (the clock held records wait for)
        self.watermark = float("-inf")
        #: windows settling and CIP records / allocations ahead of the clock, in the order they apply:
        #: (event time, 0 = window (its end) / 1 = record, workload id ("" for a record), arrival seq, item)
        self._held: list[tuple[float, int, str, int, WindowKey | Side]] = []
        self._settling: set[tuple[str, float]] = set()
        self._seq = 0
        #: telemetry partition -> the latest window end seen from it (its ingest watermark, as far as seen here)
        self.progress: dict[int, float] = {}
        #: telemetry partitions the transport reported quiet (set_quiet): left out of the settling minimum
        self.quiet: frozenset[int] = frozenset()
        self._applied_to = float("-inf")
        #: within a batch (begin_batch .. end_batch): account -> the (workload, window start) of its corrections
        #: not yet handed to the engine, in arrival order
        self._corrections: dict[str, dict[tuple[str, float], None]] | None = None

    # -- inputs ------------------------------------------------------------------------------------------------

    def on_window(self, w: WindowAggregate) -> DetectOutput:
        key = (w.workload_id, w.window_start)
        applied_before = self.merger.has(key) and key not in self._settling
        # A partial seen before (a replay) hands over the same merge again: the engine skips a workload-window it
        # holds as is, and restores one its state lost (a crash between the partials and the engine checkpoint).
        merged = self.merger.add(w) or self.merger.current(w)
        self.watermark = max(self.watermark, w.window_end)
        if w.partition not in self.progress:  # a partition first seen: the windows still held wait for it too
            self._applied_to = float("-inf")
        self.progress[w.partition] = max(self.progress.get(w.partition, float("-inf")), w.window_end)
        self.quiet -= {w.partition}  # heard from again: waited for
        self._advance()
        out = DetectOutput()
        if applied_before:  # a correction or a trailing partial: the engine replaces the window now
            if merged is not None:
                out.accounts.add(w.account_id or "")
                if self._corrections is not None:  # in a batch: with the account's others, before its next input
                    self._corrections.setdefault(w.account_id or "", {})[key] = None
                else:
                    out.extend(self._routed(self.engine.on_window(merged)))
        elif key not in self._settling:
            self._settling.add(key)
            heapq.heappush(self._held, (w.window_end, 0, w.workload_id, self._seq,
                                        (w.workload_id, w.window_start, w.window_end)))
            self._seq += 1
        return out.extend(self._release(self.applied_to))

    def begin_batch(self) -> None:
        """From here to `end_batch`, a correction (a partial of a window already applied) waits, merged with the
        account's later ones, until the account's next input or the batch's end: consecutive corrections of an
        account re-decide once (DetectEngine.on_corrections), not once each."""
        if self._corrections is None:
            self._corrections = {}

    def end_batch(self) -> DetectOutput:
        """The batch's waiting corrections to the engine; corrections apply at once again."""
        out = self._corrected(None)
        self._corrections = None
        return out

    def on_windows(self, windows: Iterable[WindowAggregate]) -> DetectOutput:
        """`on_window` for each, as one batch (begin_batch / end_batch)."""
        self.begin_batch()
        out = DetectOutput()
        for w in windows:
            out.extend(self.on_window(w))
        return out.extend(self.end_batch())

    def _corrected(self, account: str | None) -> DetectOutput:
        """The waiting corrections of `account` (None: of every account) to the engine, before its next input."""
        if not self._corrections:
            return DetectOutput()
        accounts = list(self._corrections) if account is None else [account] if account in self._corrections else []
        out = DetectOutput()
        for a in accounts:
            merged = [m for m in map(self.merger.current_key, self._corrections.pop(a)) if m is not None]
            out.accounts.add(a)
            out.extend(self._routed(self.engine.on_corrections(merged)))
        return out

    @property
    def applied_to(self) -> float:
        """The event time the engine has reached: windows ending up to it are applied, records before it."""
        return self._applied_to

    def _advance(self) -> None:
        """applied_to after the progress changed: settle_s behind the slowest telemetry partition waited for (a
        window's other partials come from there), i.e. not reported quiet and within `partition_wait_s` of the
        clock; with none, settle_s behind the clock. A high-water mark (on_window resets it for a new partition)."""
        floor = self.watermark - self.partition_wait_s
        slowest = min((t for p, t in self.progress.items() if p not in self.quiet and t >= floor),
                      default=self.watermark)
        self._applied_to = max(self._applied_to, slowest - self.settle_s)

    def set_quiet(self, partitions: Iterable[int]) -> DetectOutput:
        """The transport's word on which telemetry partitions it has not heard from for a while (wall clock, which
        the stage does not read): they are no longer waited for, and what waited only for them applies now."""
        self.quiet = frozenset(partitions)
        self._advance()
        return self._release(self._applied_to)

    def on_cip(self, rec: CipRecord) -> DetectOutput:
        return self._side(rec)

    def on_allocation(self, ev: AllocationEvent) -> DetectOutput:
        return self._side(ev)

    def on_time(self) -> DetectOutput:
        """Let idle state expire at the event-time watermark (held records stay held)."""
        if self.watermark == float("-inf"):
            return DetectOutput()
        # A window still settling keeps its partials, however far behind (one waiting for a telemetry partition that
        # lags more than the lateness in event time: a fast replay's restart): forgotten, it would apply as nothing.
        self.merger.expire(self.watermark, keep=self._settling)
        self.engine.on_time(self.watermark)
        return self._routed([])

    def flush(self) -> DetectOutput:
        """Apply every settling window and held record (the windows stopped: end of input, or an idle partition)."""
        return self._release(float("inf"))

    @property
    def held(self) -> list[WindowKey | Side]:
        """What waits, in the order it will apply: settling windows' keys and CIP records / allocations."""
        return [x[-1] for x in sorted(self._held, key=lambda x: x[:4])]

    # -- internals ---------------------------------------------------------------------------------------------

    def _side(self, rec: Side) -> DetectOutput:
        t = _side_time(rec)
        if t < self.applied_to:  # behind the clock: applied now (a late CIP record revises)
            return self._apply(rec)
        heapq.heappush(self._held, (t, 1, "", self._seq, rec))
        self._seq += 1
        return DetectOutput()

    def _release(self, upto: float) -> DetectOutput:
        """Apply, in order, the windows ending at or before `upto` and the records before it."""
        out = DetectOutput()
        while self._held and (self._held[0][0] < upto or (self._held[0][0] == upto and self._held[0][1] == 0)):
            item = heapq.heappop(self._held)[-1]
            if isinstance(item, tuple):
                out.extend(self._apply_window(item))
            else:
                out.extend(self._apply(item))
        return out

    def _apply_window(self, key: WindowKey) -> DetectOutput:
        self._settling.discard((key[0], key[1]))
        merged = self.merger.current_key((key[0], key[1]))
        if merged is None:  # its partials expired meanwhile (a flush long after): nothing to apply
            return DetectOutput()
        out = self._corrected(merged.account_id or "")
        out.extend(self._routed(self.engine.on_window(merged)))
        out.accounts.add(merged.account_id or "")
        return out

    def _apply(self, rec: Side) -> DetectOutput:
        out = self._corrected(rec.account_id)
        if isinstance(rec, CipRecord):
            out.extend(self._routed(self.engine.on_cip(rec)))
            out.cips.append(rec)
        else:
            out.extend(self._routed(self.engine.on_allocation(rec)))
        out.accounts.add(rec.account_id)
        return out

    def _routed(self, dets: list[Detection]) -> DetectOutput:
        """The engine's detections plus its queued owner messages: applied here (local) or returned (external)."""
        out = DetectOutput(detections=dets)
        if self.owners == "local":
            out.detections += self.engine.apply_owner_messages()
        else:
            msgs, self.engine.owner_outbox = self.engine.owner_outbox, []
            out.owner_messages = [OwnerMessage.model_validate(m) for m in msgs]
        return out

    # -- state as plain data -------------------------------------------------------------------------------------

    def held_to_list(self) -> list[dict[str, Any]]:
        """What waits, as plain data, the telemetry partitions' progress that decides when it applies (kind
        "progress") and applied_to (kind "applied_to"): a runtime persisting only this list restores the whole
        settling state. The quiet partitions are not kept: after a restart every partition counts as heard from at
        the start (the transport's clock starts again), so a restored stage waits rather than releases early."""
        return [{"kind": "window", "key": list(r)} if isinstance(r, tuple) else
                {"kind": "cip" if isinstance(r, CipRecord) else "allocation", "record": r.model_dump(mode="json")}
                for r in self.held] + [{"kind": "progress", "partition": p, "end": t}
                                       for p, t in sorted(self.progress.items())] + (
            [{"kind": "applied_to", "t": self._applied_to}] if self._applied_to > float("-inf") else [])

    def load_held(self, items: list[dict[str, Any]]) -> None:
        self._held, self._settling = [], set()
        for x in items:
            if x["kind"] == "applied_to":
                self._applied_to = max(self._applied_to, float(x["t"]))
            elif x["kind"] == "progress":
                self.progress[int(x["partition"])] = max(self.progress.get(int(x["partition"]), float("-inf")),
                                                         float(x["end"]))
            elif x["kind"] == "window":
                wid, start, end = x["key"]
                self._settling.add((wid, start))
                heapq.heappush(self._held, (end, 0, wid, self._seq, (wid, start, end)))
            else:
                rec: Side = (CipRecord if x["kind"] == "cip" else AllocationEvent).model_validate(x["record"])
                heapq.heappush(self._held, (_side_time(rec), 1, "", self._seq, rec))
            self._seq += 1
        self._advance()

    @staticmethod
    def applied_in(held: list[dict[str, Any]]) -> float:
        """applied_to as held_to_list() kept it (-inf: nothing applied yet)."""
        return max((float(x["t"]) for x in held if x["kind"] == "applied_to"), default=float("-inf"))

    @property
    def settling(self) -> list[tuple[str, float]]:
        """The (workload, window start) of the windows waiting to settle (their partials must stay loaded)."""
        return sorted(self._settling)

    def to_dict(self) -> dict[str, Any]:
        return {"engine": self.engine.to_dict(), "merger": self.merger.to_dict(), "watermark": self.watermark,
                "held": self.held_to_list()}

    @classmethod
    def from_dict(cls, d: dict[str, Any], policy: Policy, classifier: WorkloadClassifier | None = None,
                  window_s: float = 60.0, *, owners: Literal["local", "external"] = "local") -> DetectStage:
        stage = cls(policy, classifier, window_s, owners=owners)
        stage.engine = DetectEngine.from_dict(d["engine"], policy, classifier)
        stage.merger = WindowMerger.from_dict(d["merger"])
        stage.watermark = d["watermark"]
        stage.load_held(d.get("held", []))
        return stage
