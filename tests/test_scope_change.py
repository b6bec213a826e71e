"""Change in scope: the per-account baseline on hand-built sequences, the detector in the engine, and the
evaluation on the simulator's `demo` scenario (acct-scope: serving on 2 L40S, then 16 B200 pretraining)."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from detectors.engine import DetectEngine
from detectors.scope_baseline import ScopeBaseline, ScopeParams
from pipeline.scope_eval import detect_folder, score
from pipeline.simulator import simulate
from tests.detector_builders import INFERENCE, T0, TRAINING, W, alloc, cip, demo, window

P = ScopeParams()


def feed(base: ScopeBaseline, seq: list[tuple[float, float, float]], *, i0: int = 0, wid: str = "wl"):
    """(devices, FLOP, P(training)) per window from window i0; the changes each window produced, with its index."""
    out = []
    for i, (dev, flop, p) in enumerate(seq, start=i0):
        for c in base.observe_window(end=T0 + (i + 1) * W, window_s=W, workload_id=wid, devices=dev, flop=flop,
                                     p_training=p, params=P):
            out.append((i, c))
    return out


SERVING = [(2.0, 2e15 * (1 + 0.3 * ((i * 7) % 5 - 2) / 2), 0.05) for i in range(120)]  # 2 h, bursty


def test_steady_use_raises_no_alarm():
    base = ScopeBaseline()
    assert feed(base, SERVING) == []
    assert base.established(P) and base.scale == pytest.approx(2.0)
    # Steady training is steady too: a training-like level that does not move is not a change.
    base2 = ScopeBaseline()
    assert feed(base2, [(16.0, 5e18 * (1 + 0.1 * (i % 3)), 0.9) for i in range(200)]) == []


def test_inference_then_large_training_alarms_once_naming_what_and_when():
    base = ScopeBaseline()
    feed(base, SERVING)
    start = len(SERVING)
    got = feed(base, [(18.0, 9e17, 0.5 if i < 2 else 0.92) for i in range(120)] + [(18.0, 9e17, 0.92)], i0=start)
    assert len(got) == 1
    i, c = got[0]
    assert c.kind == "use" and c.at == T0 + start * W  # dated to the first window of the new use
    assert i == start + P.dwell  # known once the dwell's last bucket closed
    assert c.confirmed_at == T0 + (start + P.dwell + 1) * W
    what = {x["what"]: x for x in c.changes}
    assert what["devices"]["factor"] == pytest.approx(9.0) and what["devices"]["before"] == pytest.approx(2.0)
    assert what["flop_per_s"]["factor"] > 100
    assert c.before["p_training"] < 0.1
    assert "devices 9.0x" in c.summary() and "inference-like to training-like" in c.summary()


def test_short_spike_and_inference_growth_are_not_changes():
    base = ScopeBaseline()
    feed(base, SERVING)
    n = len(SERVING)
    spike = [(16.0, 5e17, 0.9)] * (P.dwell - 1) + SERVING[:30]
    assert feed(base, spike, i0=n) == []  # shorter than the dwell
    # Serving that grows 8x is growth of inference, not a change of scope.
    assert feed(base, [(16.0, 2e16, 0.03)] * 30, i0=n + len(spike)) == []


def test_a_young_baseline_does_not_judge():
    base = ScopeBaseline()
    assert feed(base, SERVING[:10] + [(16.0, 5e17, 0.95)] * 20) == []


def test_reservation_growth_against_the_use_baseline():
    base = ScopeBaseline()
    assert base.observe_reservation(t=T0, reserved_devices=64, params=P) is None  # no use yet: the initial scope
    base = ScopeBaseline()
    feed(base, SERVING)
    t = T0 + len(SERVING) * W
    assert base.observe_reservation(t=t, reserved_devices=4, params=P) is None  # 2x use: not a change
    c = base.observe_reservation(t=t + 60, reserved_devices=16, params=P)
    assert c is not None and c.kind == "reservation" and c.at == t + 60
    assert c.changes[0]["what"] == "reserved_devices" and c.changes[0]["before"] == pytest.approx(4.0)
    assert c.changes[0]["after"] == 16
    assert base.observe_reservation(t=t + 120, reserved_devices=24, params=P) is None  # 1.5x the last


def test_out_of_order_and_redelivered_windows_and_state_round_trip_are_deterministic():
    seq = SERVING + [(18.0, 9e17, 0.92)] * 10
    a, b = ScopeBaseline(), ScopeBaseline()
    ra = feed(a, seq)
    # b: the same windows, each delivered twice, and the dwell window split over a save/restore.
    rb = []
    for i, (dev, flop, p) in enumerate(seq):
        for _ in range(2):
            rb += [(i, c) for c in b.observe_window(end=T0 + (i + 1) * W, window_s=W, workload_id="wl", devices=dev,
                                                    flop=flop, p_training=p, params=P)]
        b = ScopeBaseline.from_dict(orjson.loads(orjson.dumps(b.to_dict())))
    assert [(i, c.to_dict()) for i, c in ra] == [(i, c.to_dict()) for i, c in rb] and len(ra) == 1
    assert a.to_dict() == b.to_dict()


def test_detector_in_the_engine_reports_info_only():
    eng = DetectEngine(demo())
    eng.on_cip(cip("acct-sc"))
    dets = []
    for i in range(40):
        dets += eng.on_window(window("serve", "acct-sc", i, flop=1e15, features=INFERENCE, devices=2, nodes=1))
    dets += eng.on_allocation(alloc("acct-sc", "reserved", T0 + 40 * W, count=16, reserved_until=T0 + 400 * W))
    for i in range(40, 46):
        dets += eng.on_window(window("serve", "acct-sc", i, flop=1e15, features=INFERENCE, devices=2, nodes=1))
        dets += eng.on_window(window("train", "acct-sc", i, flop=1e16, features=TRAINING, devices=16))
    cs = [d for d in dets if d.detector_id == "change_in_scope"]
    assert all(d.outcome == "info" for d in cs)
    # The baseline's two findings (the threshold rule may add its own `scope_grew` beside them).
    base = [d for d in cs if d.reason != "scope_grew"]
    assert [d.reason for d in base] == ["reservation_outgrew_use", "use_changed"]
    use = base[1]
    assert use.event_time == T0 + 40 * W and use.run_id is not None
    assert {c["what"] for c in use.evidence["changes"]} >= {"devices"}
    assert use.evidence["before"]["baseline"]["devices"] == pytest.approx(2.0)
    # The state survives a round trip through plain data and replays emit nothing new.
    again = DetectEngine.from_dict(orjson.loads(orjson.dumps(eng.to_dict())), demo())
    assert again.on_window(window("train", "acct-sc", 45, flop=1e16, features=TRAINING, devices=16)) == []


@pytest.fixture(scope="module")
def demo_scored(tmp_path_factory: pytest.TempPathFactory) -> dict:
    folder: Path = simulate("demo", tmp_path_factory.mktemp("scope") / "demo", seed=0)
    truth = orjson.loads((folder / "ground_truth.json").read_bytes())
    return score(detect_folder(folder), truth, 60.0)


def test_demo_scope_change_is_detected_quickly_without_false_alarms(demo_scored: dict):
    row = demo_scored["per_account"]["acct-scope"]
    assert row["kind"] == "scope_change"
    assert row["delay_s"] is not None and 0 <= row["delay_s"] <= (P.dwell + 2) * W
    assert abs(row["dating_error_s"]) <= 2 * W
    assert "training-like" in row["what"] and "devices" in row["what"]
    assert row["false_alarms"] == 0 and "reservation_outgrew_use" in row["reasons"]
    steady = [a for a, r in demo_scored["per_account"].items() if r["kind"] == "no_training"]
    assert steady and demo_scored["false_alarms"]["n"] == 0
    assert all(not demo_scored["per_account"][a]["use_changed"] for a in steady)
