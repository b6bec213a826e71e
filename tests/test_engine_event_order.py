"""Inputs fetched out of event-time order decide as in order (detectors/engine.py `_late_at`): a window or an
allocation that comes after later inputs of its account (another topic or partition read ahead, as after a
restart on Kafka) goes back to its place in the account's journal, and what it changes is decided again. The
detections' latest versions (what the store and the case book keep) equal the in-order run's; an input older than
the re-decide horizon is applied where it comes, as before."""

from __future__ import annotations

from typing import Any

import pytest

from detectors.engine import DetectEngine
from schemas.detection import Detection
from tests.detector_builders import INFERENCE, T0, W, alloc, cip, demo, window


def latest(dets: list[Detection]) -> dict[str, tuple[str, str, float]]:
    """Detection id -> (outcome, reason, event time) of its latest version (later emissions supersede)."""
    return {d.detection_id: (d.outcome, d.reason, d.event_time) for d in dets}


def run(inputs: list[Any], **kw: Any) -> tuple[list[Detection], DetectEngine]:
    eng = DetectEngine(demo(), **kw)
    out: list[Detection] = []
    for x in inputs:
        out += eng.on_allocation(x) if hasattr(x, "kind") else eng.on_cip(x) if hasattr(x, "us_person") \
            else eng.on_window(x)
        out += eng.apply_owner_messages()
    return out, eng


def test_a_late_allocation_dates_special_measures_where_the_replay_does() -> None:
    """The demo's acct-sm on Kafka: its allocation at 55 min was applied after the window ending at 60 min, and the
    case was dated 60 min (the detection's id was already emitted, the earlier time dropped)."""
    rec = cip("acct-kp", country="KP", updated_at=T0 - 3600)
    start = alloc("acct-kp", "job_started", T0 + 10, workload="wl-kp")
    wins = [window("wl-kp", "acct-kp", i, flop=1e10, features=INFERENCE) for i in range(1, 6)]
    in_order, _ = run([rec, start, *wins])
    late, eng = run([rec, *wins[:3], start, *wins[3:]])
    assert [t for _, r, t in latest(in_order).values() if r == "special_measures"] == [T0 + 10]
    assert latest(late) == latest(in_order)
    assert eng.redecided["late_inputs"] == 1 and eng.redecided["superseded"] >= 1


@pytest.mark.parametrize("late_i", [1, 2, 3])
def test_a_window_fetched_after_later_ones_dates_the_crossing_as_in_order(late_i: int) -> None:
    """A whole workload-window read after later ones used to count "from the latest window end seen", and a crossing
    already made stood: the case was dated windows late."""
    wins = [window("wl-f", "acct-f", i, flop=3e17) for i in range(8)]
    in_order, _ = run([cip("acct-f"), *wins])
    shuffled = [w for i, w in enumerate(wins) if i != late_i] + [wins[late_i]]
    late, eng = run([cip("acct-f"), *shuffled])
    crossing = [t for _, r, t in latest(in_order).values() if r == "compute_used"]
    assert len(crossing) == 1
    assert latest(late) == latest(in_order)
    assert eng.redecided["late_inputs"] == 1


def test_an_input_older_than_the_horizon_is_applied_where_it_comes() -> None:
    """Past `redecide_s` the journal no longer holds the steps it belongs between: no re-decision, as before."""
    wins = [window("wl-f", "acct-f", i, flop=3e17) for i in range(8)]
    shuffled = [w for i, w in enumerate(wins) if i != 1] + [wins[1]]
    late, eng = run([cip("acct-f"), *shuffled], redecide_s=2 * W)
    assert eng.redecided["late_inputs"] == 0
    in_order, _ = run([cip("acct-f"), *wins], redecide_s=2 * W)
    assert latest(late) != latest(in_order)  # dated later: the crossing stood where it was first made


def test_a_late_input_delivered_again_changes_nothing() -> None:
    wins = [window("wl-f", "acct-f", i, flop=3e17) for i in range(8)]
    shuffled = [w for i, w in enumerate(wins) if i != 2] + [wins[2]]
    _, eng = run([cip("acct-f"), *shuffled])
    assert eng.on_window(wins[2]) == [] and eng.redecided["late_inputs"] == 1
