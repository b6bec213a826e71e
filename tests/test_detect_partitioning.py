"""The detect stage's decisions do not depend on how telemetry is partitioned (issue 12): a workload-window's
partials come from every telemetry partition carrying its nodes, and one partition may run minutes ahead of
another (on Kafka by fetch order; in process a batch of rows is read partition by partition). DetectStage settles
a window on the slowest telemetry partition's progress, so the engine sees each window whole in every arrival
order. Pure unit test first, then the in-process pipeline over a small simulated scenario."""

from __future__ import annotations

import uuid
from pathlib import Path

from pipeline.detect.stage import DetectStage
from pipeline.ingest.aggregate import WindowConfig
from pipeline.runner import InProcessPipeline
from pipeline.simulator import simulate
from pipeline.sources import read_folder
from pipeline.store import Store
from schemas.detection import Detection
from schemas.windows import WindowAggregate
from tests.detector_builders import T0, W, cip, demo

N = 24  # windows; at 2 x 3e16 FLOP a window the run crosses 1e18 in window 16


def partial(i: int, part: int) -> WindowAggregate:
    start = T0 + i * W
    return WindowAggregate(window_id=f"wl-p-{i}-{part}", workload_id="wl-p", account_id="acct-p", partition=part,
                           window_start=start, window_end=start + W, sample_count=16, device_count=4, node_count=1,
                           devices=[f"GPU-{part}-{d}" for d in range(4)], nodes=[f"n-{part}"], device_seconds=240.0,
                           flop=3e16, flop_low=3e16, flop_high=3e16, basis="tensor_active",
                           accelerators={"H100": 4})


def lockstep() -> list[WindowAggregate]:
    """Both partitions' partials of each window, one after the other."""
    return [partial(i, p) for i in range(N) for p in (0, 1)]


def lagging(lag: int) -> list[WindowAggregate]:
    """Partition 0 runs `lag` windows ahead of partition 1 (its windows i .. i+lag come before 1's window i)."""
    out = [partial(i, 0) for i in range(lag)]
    for i in range(N):
        if i + lag < N:
            out.append(partial(i + lag, 0))
        out.append(partial(i, 1))
    return out


def decisions(order: list[WindowAggregate], **kw: float) -> list[tuple[str, str, str, float]]:
    stage = DetectStage(demo(), None, W, **kw)
    dets: list[Detection] = list(stage.on_cip(cip("acct-p", updated_at=T0 - 3600)))
    for w in order:
        dets += stage.on_window(w)
    dets += stage.flush()
    return [(d.detection_id, d.detector_id, d.outcome, round(d.event_time, 3)) for d in dets]


def test_two_arrival_orders_of_the_same_partials_give_the_same_decisions() -> None:
    ref = decisions(lockstep())
    assert any(d[1] == "compute_threshold" for d in ref)  # the run crosses: there is a decision to compare
    assert decisions(lagging(4)) == ref
    assert decisions(lagging(9)) == ref


def test_a_partition_lagging_past_the_bound_is_not_waited_for() -> None:
    """The wait is bounded: with partition_wait_s = 2 windows, a partition 4 windows behind no longer holds the
    others back, so windows apply half-merged (as before the rule) and the crossing comes out differently."""
    assert decisions(lagging(4), partition_wait_s=2 * W) != decisions(lockstep())


def test_a_partition_going_quiet_holds_windows_back_once_and_the_state_round_trips() -> None:
    """Partition 1 stops (its nodes' jobs ended): windows wait for it until it is partition_wait_s behind, then settle
    settle_s behind partition 0 again, not partition_wait_s behind for ever. A restored stage keeps the progress.
    (The in-process rule, event time; the faust app leaves a partition out on the wall clock: test_detect_batch.)"""
    stage = DetectStage(demo(), None, W)
    for i in range(4):
        stage.on_window(partial(i, 0))
        stage.on_window(partial(i, 1))
    for i in range(4, 12):
        stage.on_window(partial(i, 0))
    assert stage.applied_to == T0 + 4 * W - 2 * W  # waiting for partition 1 (8 windows behind)
    for i in range(12, 30):
        stage.on_window(partial(i, 0))
    assert stage.applied_to == stage.watermark - 2 * W  # partition 1 is past the bound: not waited for
    back = DetectStage.from_dict(stage.to_dict(), demo(), None, W)
    assert back.progress == stage.progress and back.applied_to == stage.applied_to and back.held == stage.held


def test_settling_on_the_clock_alone_decided_on_half_windows() -> None:
    """What the rule is for: settling on the detect partition's own clock (a partition wait of 0, the stage before)
    handed the engine partition 0's half of each window first, and the crossing moved."""
    assert decisions(lagging(4), partition_wait_s=0.0) != decisions(lockstep())


def _replay(folder: Path, store_path: Path, partitions: int) -> tuple[set[tuple], set[tuple]]:
    """Cases (id, status, knowledge_at to the second) and detections (id, event time) of one in-process replay."""
    store = Store.connect(f"chdb://{store_path}", f"test_{uuid.uuid4().hex[:12]}")
    try:
        res = InProcessPipeline(store, demo(), window=WindowConfig(), telemetry_partitions=partitions,
                                clock=lambda: 4e9).run(read_folder(folder))
        cases = {(c.case_id, c.reason, c.beneficial_owner_id or c.account_id, c.status,
                  None if c.knowledge_at is None else round(c.knowledge_at), c.due_at is None or round(c.due_at - (
                      c.knowledge_at or 0.0)) == 15 * 86400) for c in store.list_cases()}
        return cases, {(d.detection_id, d.outcome, round(d.event_time)) for d in res.detections}
    finally:
        try:
            store.drop_database()
        finally:
            store.close()


def test_partitioned_and_unpartitioned_replays_give_the_same_cases(tmp_path: Path, store_path: Path) -> None:
    """A small simulated scenario (22 workloads, 14 min; a run crosses) at 1, 2 and 4 telemetry partitions: the same
    cases, knowledge_at to the second, and the same detections. Settled on the detect partition's own clock (the
    rule before), the 4-partition replay dated the crossing case 16 s earlier and four detections differed."""
    folder = simulate("eval", tmp_path / "eval", seed=0, scale=0.02)
    ref_cases, ref_dets = _replay(folder, store_path, 1)
    assert any(c[3] in ("open", "needs_review") for c in ref_cases)  # a case to compare
    for partitions in (2, 4):
        cases, dets = _replay(folder, store_path, partitions)
        assert cases == ref_cases
        assert dets == ref_dets
