"""A run counts each workload-window once however large the run: the keys of windows that can still be delivered are
remembered, so a late correction replaces what it corrects (exactly once where totals are summed)."""

from __future__ import annotations

import pytest

from detectors import state
from detectors.state import REPLACE_HORIZON_S, SEEN_PRUNE_FROM, RunState

W = 60.0
T0 = 1_700_000_000.0


def _fill(run: RunState, workloads: int, windows: int, flop: float = 1e15) -> None:
    for i in range(windows):
        for n in range(workloads):
            assert run.add_window(f"wl-{n}|{T0 + i * W!r}", T0 + (i + 1) * W, (flop, flop, flop), W)


def test_a_late_copy_of_a_window_of_a_200_workload_run_replaces_it() -> None:
    """200 workloads x 50 windows (10,000 keys, all within the horizon): until Dec 7 only 8,192 were kept, and a
    re-delivery of one of the oldest counted the whole window again."""
    run = RunState("run-big", "acct-x")
    _fill(run, 200, 50)
    assert run.used == pytest.approx(200 * 50 * 1e15)
    key, end = f"wl-0|{T0 + 2 * W!r}", T0 + 3 * W  # 47 windows back: inside the 1 h horizon
    assert run.add_window(key, end, (1e15, 1e15, 1e15), W) and run.used == pytest.approx(200 * 50 * 1e15)
    assert run.add_window(key, end, (1.1e15, 1.1e15, 1.1e15), W)  # a correction: its difference only
    assert run.used == pytest.approx(200 * 50 * 1e15 + 1e14)


def test_past_the_bound_a_forgotten_window_is_not_counted_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """Beyond SEEN_K the oldest keys go, and every window at least as old is treated as one past the horizon:
    not counted when it comes again (it may have been counted), never counted twice."""
    monkeypatch.setattr(state, "SEEN_K", 100)
    run = RunState("run-big", "acct-x")
    _fill(run, 10, 12)  # 120 keys: the first 20 (windows 0 and 1) forgotten
    assert len(run.seen) == 100 and run.seen_floor == T0 + 2 * W
    used = run.used
    assert not run.add_window(f"wl-0|{T0!r}", T0 + W, (1e15, 1e15, 1e15), W) and run.used == used
    assert not run.add_window(f"wl-99|{T0 + W!r}", T0 + 2 * W, (1e15, 1e15, 1e15), W)  # as old, never seen
    assert run.add_window(f"wl-0|{T0 + 2 * W!r}", T0 + 3 * W, (2e15, 2e15, 2e15), W)  # remembered: replaced
    assert run.used == pytest.approx(used + 1e15)


def test_a_long_run_keeps_only_what_can_still_be_delivered() -> None:
    """One workload over 3,000 windows (50 h): keys past the horizon are dropped in batches, not on every window."""
    run = RunState("run-long", "acct-x")
    _fill(run, 1, 3000)
    assert len(run.seen) <= SEEN_PRUNE_FROM + 1
    horizon = REPLACE_HORIZON_S / W
    oldest = min(float(k.rsplit("|", 1)[1]) for k in run.seen)
    assert (run.last_end - oldest) / W >= horizon  # every window that can still come is remembered
