"""The scope baseline under a flickering P(training): a grown account whose young run's P dips under p_low inside
the dwell is still detected, dated to its first window, the dips are not folded into the "before" level, and at
most `dwell` dips are held (a run that stays under p_low ends the dwell). Sequence from scope seed 2's
acct-smi-inference-to-training-1 (benchmarks/results/scope_trace_seed2.json): 4 devices serving at P 0.33, then
28 devices whose bucket P reads 0.284, 0.131, 0.362, 0.183, 0.354, ..."""

from __future__ import annotations

import orjson
import pytest

from detectors.scope_baseline import ScopeBaseline, ScopeParams, WindowUse, step
from tests.detector_builders import T0, W

P = ScopeParams()
SERVING = [(4.0, 4e15, 0.33)] * 60  # 1 h on 4 devices: the baseline is established
FLICKER = [0.284, 0.131, 0.362, 0.183, 0.354, 0.353, 0.197, 0.350, 0.350, 0.350, 0.350]


def feed(base: ScopeBaseline, seq: list[tuple[float, float, float]], *, i0: int = 0):
    out = []
    for i, (dev, flop, p) in enumerate(seq, start=i0):
        out += [(i, c) for c in base.observe_window(end=T0 + (i + 1) * W, window_s=W, workload_id="wl", devices=dev,
                                                    flop=flop, p_training=p, params=P)]
    return out


def test_grown_account_with_p_flickering_under_p_low_is_detected_from_its_first_window():
    base = ScopeBaseline()
    feed(base, SERVING)
    start = len(SERVING)
    got = feed(base, [(28.0, 28e15, p) for p in FLICKER], i0=start)
    assert len(got) == 1
    i, c = got[0]
    # Windows 0, 2, 4 are the dwell (1 and 3 held): dated to the change's first window, not to window 7 (+370 s
    # before the fix, when each dip restarted the dwell).
    assert c.at == T0 + start * W
    assert i == start + 5  # window 4's bucket closes when window 5 arrives
    # The dips were not folded: the report's "before" is the serving level, not 4.0 -> 4.41 -> 4.84 devices.
    assert c.before["devices"] == pytest.approx(4.0)
    assert {x["what"] for x in c.changes} == {"devices"}
    assert base.held == 0 and base.candidate == []


def test_at_most_dwell_dips_are_held_then_low_p_ends_the_dwell_and_is_folded():
    base = ScopeBaseline()
    feed(base, SERVING)
    start = len(SERVING)
    feed(base, [(28.0, 28e15, 0.3)] + [(28.0, 28e15, 0.1)] * P.dwell, i0=start)
    feed(base, [(28.0, 28e15, 0.1)], i0=start + 1 + P.dwell)  # closes the last held dip's bucket
    assert len(base.candidate) == 1 and base.held == P.dwell and base.scale == pytest.approx(4.0)
    # The next dip is over the bound: the dwell ends and the dip is folded as steady (inference-like) use.
    assert feed(base, [(28.0, 28e15, 0.1)] * 30, i0=start + 2 + P.dwell) == []
    assert base.candidate == [] and base.held == 0
    assert base.scale > 4.5  # the not-training growth is the new level, as before the fix


def test_a_dip_is_not_held_when_devices_have_not_grown():
    base = ScopeBaseline()
    feed(base, [(4.0, 4e15, 0.05)] * 60)
    start = 60
    # P into the training band on the same devices opens a dwell; a dip on those devices ends it (not held).
    feed(base, [(4.0, 4e15, 0.9), (4.0, 4e15, 0.1), (4.0, 4e15, 0.9)], i0=start)
    assert base.held == 0 and len(base.candidate) == 0


def test_held_survives_a_save_and_restore_and_older_state_defaults_to_zero():
    state = None
    for i, (dev, flop, p) in enumerate([*SERVING, (28.0, 28e15, 0.3), (28.0, 28e15, 0.1), (28.0, 28e15, 0.3)]):
        state, _ = step(state, WindowUse(T0 + (i + 1) * W, W, "wl", dev, flop, p), P)
    assert state["held"] == 1
    restored = ScopeBaseline.from_dict(orjson.loads(orjson.dumps(state)))  # as the engine's snapshot stores it
    assert restored.held == 1 and len(restored.candidate) == 1
    old = {k: v for k, v in state.items() if k != "held"}  # state saved before the field existed
    assert ScopeBaseline.from_dict(old).held == 0
