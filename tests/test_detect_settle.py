"""DetectStage settles a workload-window before the engine sees it (issue 12): the partials of one window come from
several telemetry partitions at different moments, and the engine decides on what it is handed, so it must be
handed the whole window, as in the single-partition replay. Pure: no Kafka."""

from __future__ import annotations

from typing import Any

from pipeline.detect.stage import DetectStage
from schemas.windows import WindowAggregate
from tests.detector_builders import T0, W, alloc, demo


def partial(start: float, part: int, workload: str = "wl-s") -> WindowAggregate:
    return WindowAggregate(window_id=f"{workload}-{start}-{part}", workload_id=workload, account_id="acct-s",
                           partition=part, window_start=start, window_end=start + W, sample_count=16,
                           device_count=4, node_count=1, devices=[f"GPU-{part}-{i}" for i in range(4)],
                           nodes=[f"n-{part}"], device_seconds=240.0, flop=1e15, flop_low=1e15, flop_high=1e15,
                           basis="tensor_active")


def handed(stage: DetectStage) -> list[tuple[float, int]]:
    """Record (window start, device count) of every merge the engine is handed."""
    seen: list[tuple[float, int]] = []
    on_window = stage.engine.on_window

    def spy(w: Any) -> Any:
        seen.append((w.window_start, w.device_count))
        return on_window(w)

    stage.engine.on_window = spy  # type: ignore[method-assign]
    return seen


def feed(stage: DetectStage) -> None:
    """Partition 0 runs a window ahead of partition 1: window 0's second partial comes after window 1's first."""
    for w in (partial(T0, 0), partial(T0 + W, 0), partial(T0, 1), partial(T0 + 2 * W, 0), partial(T0 + W, 1),
              partial(T0 + 3 * W, 0), partial(T0 + 2 * W, 1), partial(T0 + 4 * W, 0), partial(T0 + 3 * W, 1)):
        stage.on_window(w)


def test_the_engine_is_handed_whole_windows_in_event_time_order() -> None:
    stage = DetectStage(demo(), None, W)
    seen = handed(stage)
    feed(stage)
    # the slowest telemetry partition's latest window end (partition 1: T0 + 4W) less two windows
    assert stage.applied_to == T0 + 4 * W - 2 * W
    assert seen == [(T0, 8), (T0 + W, 8)]  # the windows ending by then, each whole
    assert [k[:2] for k in stage.held] == [("wl-s", T0 + 2 * W), ("wl-s", T0 + 3 * W), ("wl-s", T0 + 4 * W)]
    stage.flush()  # the end of the input: everything applies
    assert seen == [(T0 + i * W, 8) for i in range(4)] + [(T0 + 4 * W, 4)]


def test_without_settling_the_engine_decides_on_half_windows() -> None:
    """What settling is for: with settle_s = 0 (the stage before) window 0 reached the engine with 4 of 8 devices."""
    stage = DetectStage(demo(), None, W, settle_s=0.0)
    seen = handed(stage)
    feed(stage)
    assert seen[:2] == [(T0, 4), (T0 + W, 4)]


def test_a_partial_after_its_window_settled_replaces_it_at_once_and_the_held_state_round_trips() -> None:
    stage = DetectStage(demo(), None, W)
    seen = handed(stage)
    feed(stage)
    stage.on_window(partial(T0, 2))  # a third partition's partial, trailing by more than the settle time
    assert seen[-1] == (T0, 12)
    back = DetectStage.from_dict(stage.to_dict(), demo(), None, W)
    assert back.held == stage.held and back.settling == stage.settling
    seen2 = handed(back)
    back.flush()
    assert back.progress == stage.progress == {0: T0 + 5 * W, 1: T0 + 4 * W, 2: T0 + W}
    assert [s for s, _ in seen2] == [T0 + 2 * W, T0 + 3 * W, T0 + 4 * W]


def test_in_a_batch_an_accounts_corrections_wait_for_its_next_input_and_re_decide_once() -> None:
    """DetectStage.on_windows: a trailing partial of a window already applied waits, merged with the account's other
    corrections, until the account's next input or the batch's end; then one rollback for them all."""
    stage = DetectStage(demo(), None, W, settle_s=0.0)
    for i in range(4):
        stage.on_window(partial(T0 + i * W, 0))
    seen, red = handed(stage), stage.engine.redecided
    stage.on_windows([partial(T0 + W, 1), partial(T0 + 2 * W, 1)])
    assert seen == [] and red["corrections"] == 2 and red["rollbacks"] == 1  # through on_corrections
    stage.begin_batch()
    stage.on_window(partial(T0 + W, 2))
    stage.on_allocation(alloc("acct-s", "reserved", T0 + W, reserved_until=T0 + 7200))  # behind the clock: now
    # the account's correction went first (one rollback), then the allocation went back to its place (another)
    assert red["corrections"] == 3 and red["late_inputs"] == 1 and red["rollbacks"] == 3
    stage.on_window(partial(T0 + 2 * W, 2))
    assert red["corrections"] == 3
    stage.end_batch()
    assert seen == [] and red["corrections"] == 4 and red["rollbacks"] == 4
    stage.on_window(partial(T0 + 3 * W, 1))  # outside a batch: at once, as before
    assert seen == [(T0 + 3 * W, 8)] and red["rollbacks"] == 5
