"""The detect core end to end over hand-built inputs: outcomes, knowledge times, stitching, owners, determinism."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import orjson
import pytest

from detectors import registry
from detectors.base import DetectContext, Detector
from detectors.engine import DetectEngine
from detectors.owner_aggregate import (
    QUIET,
    EventTimeOwners,
    OwnerAggregate,
    OwnerAggregator,
    membership,
    partition_mark,
    retraction,
)
from detectors.snapshot import from_split, split, split_dirty
from detectors.state import RUN_IDS_K
from detectors.windows import WorkloadWindow
from pipeline.detect.stage import DetectStage
from pipeline.detect.tables import MemoryTable
from schemas.detection import Detection
from tests.detector_builders import INFERENCE, SMI_ONLY, T0, TRAINING, W, alloc, cip, demo, owner, window, with_foreign

T = 1e18  # demo policy training threshold


def by(dets: list[Detection], detector: str) -> list[Detection]:
    return [d for d in dets if d.detector_id == detector]


def feed(engine: DetectEngine, windows) -> list[Detection]:
    """Windows to the engine, its owner messages applied in process after each (as DetectStage does)."""
    out: list[Detection] = []
    for w in windows:
        out += engine.on_window(w)
        out += owners_here(engine)
    return out


def owners_here(engine: DetectEngine) -> list[Detection]:
    """The engine's queued owner messages applied in process (the route DetectStage takes with owners="local")."""
    return engine.apply_owner_messages()


def expected_crossing(flop: float, n: int) -> float:
    """Event time at which n windows of `flop` each, uniform within each window, first reach T."""
    k = int(T // flop)  # full windows before the crossing window
    return T0 + k * W + (T - k * flop) / flop * W


def test_used_crossing_of_a_foreign_training_run_is_reportable():
    eng = DetectEngine(demo())
    eng.on_cip(cip("acct-f"))
    dets = feed(eng, [window("wl-1", "acct-f", i, flop=3e17) for i in range(8)])
    ct = by(dets, "compute_threshold")
    assert [(d.outcome, d.reason) for d in ct] == [("reportable", "compute_used")]
    d = ct[0]
    assert d.event_time == pytest.approx(expected_crossing(3e17, 8))
    ev = d.evidence
    assert ev["used_flop"] >= T and ev["used_flop_low"] < ev["used_flop"] < ev["used_flop_high"]
    assert ev["policy"] == {"id": "demo", "version": "1.0.0", "demo": True}
    assert ev["classifier"]["band"] == "training" and ev["classifier"]["top_features"]
    assert ev["foreign_person"]["is_foreign"] and "customer_not_us_person" in ev["foreign_person"]["reasons"]
    assert d.run_id and d.workload_ids == ["wl-1"] and d.source_windows
    assert ev["basis"] == {"tensor_active": 4}  # 4 windows of 3e17 reach T = 1e18
    run = ev["run"]
    assert (run["run_id"], run["accelerators"], run["device_count"], run["node_count"]) == (d.run_id, {"H100": 8}, 8, 2)
    assert (run["start"], run["end"], run["workload_ids"], run["job_ids"]) == (T0, T0 + 4 * W, ["wl-1"], [])


def test_projected_crossing_with_a_reservation():
    eng = DetectEngine(demo())
    eng.on_cip(cip("acct-p"))
    res = eng.on_allocation(alloc("acct-p", "reserved", T0, reserved_until=T0 + 3600))
    assert [(d.detector_id, d.outcome) for d in res] == [("reservation_potential", "info")]
    dets = feed(eng, [window("wl-p", "acct-p", i, flop=1e17) for i in range(3)])
    ct = by(dets, "compute_threshold")
    assert [(d.outcome, d.reason) for d in ct] == [("reportable", "compute_projected")]
    # used 1e17 after one window; rate 1e17/60 over the remaining 3540 s reserved -> projected >> T at the first end
    assert ct[0].event_time == T0 + W
    assert ct[0].evidence["projected_flop"] == pytest.approx(1e17 + 1e17 / W * (3600 - W))


def test_no_reservation_means_no_projection():
    eng = DetectEngine(demo())
    eng.on_cip(cip("acct-np"))
    assert by(feed(eng, [window("wl", "acct-np", i, flop=1e17) for i in range(5)]), "compute_threshold") == []


def test_us_person_over_threshold_is_monitored():
    eng = DetectEngine(demo())
    eng.on_cip(cip("acct-us", us_person=True, country="US"))
    ct = by(feed(eng, [window("wl-us", "acct-us", i, flop=5e17) for i in range(4)]), "compute_threshold")
    assert [d.outcome for d in ct] == ["monitored"]


def test_non_training_workload_opens_no_compute_case():
    eng = DetectEngine(demo())
    eng.on_cip(cip("acct-inf"))
    assert feed(eng, [window("wl-i", "acct-inf", i, flop=5e17, features=INFERENCE) for i in range(6)]) == []


def test_uncertain_workload_over_threshold_needs_review_with_an_inquiry():
    eng = DetectEngine(demo())
    eng.on_cip(cip("acct-u"))
    ct = by(feed(eng, [window("wl-u", "acct-u", i, flop=4e17, features=SMI_ONLY) for i in range(4)]),
            "compute_threshold")
    assert [d.outcome for d in ct] == ["needs_review"]
    assert "attest" in ct[0].evidence["suggested_inquiry"] and ct[0].evidence["classifier"]["band"] == "uncertain"


@pytest.mark.parametrize("order", ["event_time", "one_account_first"])
def test_owner_split_across_two_accounts_is_caught(order: str):
    eng = DetectEngine(demo())
    for a in ("acct-a", "acct-b"):  # U.S.-incorporated customers, each 50 % owned by one foreign owner
        eng.on_cip(cip(a, us_person=True, country="US", owners=[owner("own-x", 50.0)]))
    wins = {a: [window(f"wl-{a[-1]}", a, i, flop=1e17) for i in range(6)] for a in ("acct-a", "acct-b")}
    if order == "event_time":
        dets = feed(eng, [w for pair in zip(wins["acct-a"], wins["acct-b"], strict=True) for w in pair])
    else:  # acct-b's windows come after all of acct-a's (out of event-time order): the owner re-decides
        dets = feed(eng, wins["acct-a"] + wins["acct-b"])
    assert by(dets, "compute_threshold") == []  # each account alone stays below T
    oa = by(dets, "owner_aggregate")
    assert len(oa) == (1 if order == "event_time" else 2)  # out of order: first via acct-a, then moved earlier
    d = oa[-1]
    assert (d.reason, d.beneficial_owner_id, d.account_id, d.outcome) == (
        "owner_aggregate", "own-x", "acct-b", "reportable")
    assert d.evidence["used_flop"] >= T and sorted(d.workload_ids) == ["wl-a", "wl-b"]
    assert d.evidence["basis"] == {"tensor_active": 10}
    assert d.evidence["run"]["device_count"] == 16 and d.evidence["run"]["workload_ids"] == ["wl-a", "wl-b"]
    assert d.event_time == pytest.approx(T0 + 5 * W)  # 5 + 5 windows of 1e17: the 5th of wl-b crosses at its end
    if order != "event_time":
        assert oa[0].account_id == "acct-a" and oa[0].event_time == pytest.approx(T0 + 6 * W)
        assert eng.owners["own-x"].crossed["redecided_from"]["account_id"] == "acct-a"


def test_owner_contributions_from_separate_engines_give_the_in_process_detection():
    """Two engines (two partitions), one account each, owners aggregated elsewhere from their contributions."""
    def cips(eng: DetectEngine, accts: tuple[str, ...]) -> None:
        for a in accts:
            eng.on_cip(cip(a, us_person=True, country="US", owners=[owner("own-x", 50.0)]))

    ref = DetectEngine(demo())
    cips(ref, ("acct-a", "acct-b"))
    ws = [window(f"wl-{a[-1]}", a, i, flop=1e17) for i in range(6) for a in ("acct-a", "acct-b")]
    expected = by(feed(ref, ws), "owner_aggregate")
    assert len(expected) == 1

    parts = {a: DetectEngine(demo()) for a in ("acct-a", "acct-b")}
    agg = OwnerAggregator(demo(), detector=OwnerAggregate())
    got: list[Detection] = []
    sent: list[dict] = []
    for a, eng in parts.items():
        cips(eng, (a,))
    for w in ws:
        eng = parts[w.account_id]
        assert by(eng.on_window(w), "owner_aggregate") == []  # never decided inside a partition's engine
        sent += [orjson.loads(orjson.dumps(c)) for c in eng.owner_outbox]  # as plain data over a topic
        eng.owner_outbox.clear()
    for c in sent:
        got += agg.apply(c)
    assert got == expected
    # Replaying the contributions (at-least-once) changes nothing: cumulative figures replace, never add.
    before = agg.to_dict()
    assert [d for c in sent for d in agg.apply(c)] == []
    assert agg.to_dict() == before
    # A CIP that stops naming the owner retracts that account's runs from the owner's sum.
    eng_a = parts["acct-a"]
    eng_a.on_cip(cip("acct-a", us_person=True, country="US", owners=[], updated_at=T0 + 10 * W))
    assert eng_a.owner_outbox == [retraction("own-x", "acct-a")]
    agg.apply(eng_a.owner_outbox[0])
    assert agg.owners["own-x"].accounts == ["acct-b"]
    assert {r["account_id"] for r in agg.owners["own-x"].runs.values()} == {"acct-b"}


def _partition_engine(accts: tuple[str, ...], owners: list | None = None) -> DetectEngine:
    eng = DetectEngine(demo())
    for a in accts:
        eng.on_cip(cip(a, us_person=True, country="US", owners=owners or [owner("own-x", 50.0)]))
    return eng


def _drain(eng: DetectEngine, part: int) -> list[dict]:
    """The outbox as the faust app sends it: plain data, with the partition and its watermark (after the batch)."""
    out = [orjson.loads(orjson.dumps({**c, "partition": part, "wm": eng.watermark})) for c in eng.owner_outbox]
    eng.owner_outbox.clear()
    return out


def _split_owner() -> tuple[list, Detection, dict[str, DetectEngine]]:
    """Owner own-x's two accounts, 9 windows each: the windows, the in-process owner detection, one engine per
    account's partition."""
    ws = [window(f"wl-{a[-1]}", a, i, flop=1e17) for i in range(9) for a in ("acct-a", "acct-b")]
    ref = DetectEngine(demo())
    for a in ("acct-a", "acct-b"):
        ref.on_cip(cip(a, us_person=True, country="US", owners=[owner("own-x", 50.0)]))
    (expected,) = by(feed(ref, ws), "owner_aggregate")
    return ws, expected, {"acct-a": _partition_engine(("acct-a",)), "acct-b": _partition_engine(("acct-b",))}


def _marked(eng: DetectEngine, part: int) -> list[dict]:
    """One batch's owner messages as the faust app sends them, then the partition's mark (after the batch)."""
    return [*_drain(eng, part), partition_mark(part, eng.watermark)]


def test_owner_crossing_in_event_time_whatever_the_partitions_interleaving():
    """Partition A's windows all arrive before partition B's: summed as they come, the owner would cross at B's first
    window (A's 9 windows plus 1 of B's); held until every source partition's mark passes them, it crosses where the
    in-process runner (one stream, in event time) sees it: at the end of the 5th window."""
    ws, expected, parts = _split_owner()
    pno = {"acct-a": 0, "acct-b": 1}
    msgs = [m for a, eng in parts.items() for m in _drain(eng, pno[a])]  # the memberships (CIP first)
    assert [(m["kind"], m["account_id"]) for m in msgs] == [("member", "acct-a"), ("member", "acct-b")]
    for a in ("acct-a", "acct-b"):  # skewed: one batch per window, all of A's before any of B's
        for w in (w for w in ws if w.account_id == a):
            parts[a].on_window(w)
            msgs += _marked(parts[a], pno[a])
    msgs += [partition_mark(0, QUIET), partition_mark(1, QUIET)]  # the end of the input

    naive = OwnerAggregator(demo(), detector=OwnerAggregate())
    arrival = [d for m in msgs for d in naive.apply(m)]
    assert expected.event_time == pytest.approx(T0 + 5 * W)
    # Applied as they come, B's windows are late: each re-decides from the owner's log, and the crossing moves (a
    # version per move) until it is the in-process one. The clock below holds them instead: one detection.
    assert len(arrival) > 1 and arrival[0].event_time > expected.event_time
    assert (arrival[-1].account_id, arrival[-1].event_time) == (expected.account_id, expected.event_time)

    timed = EventTimeOwners(OwnerAggregator(demo(), detector=OwnerAggregate()), sources=2, skew_s=W)
    got: list[Detection] = []
    for m in msgs:
        got += timed.receive(m)
        if m["partition"] == 0 and m["wm"] < QUIET:
            assert got == []  # A alone runs ahead: nothing is decided past B's watermark
    assert got == [expected]
    # Through plain data (the faust table) and a replay of everything: nothing new.
    again = EventTimeOwners(OwnerAggregator(demo(), detector=OwnerAggregate()), sources=2, skew_s=W)
    again.load_owner("own-x", orjson.loads(orjson.dumps(timed.owner_to_dict("own-x"))))
    again.load_parts(0, timed.parts_to_dict(0))
    assert [d for m in msgs for d in again.receive(m)] == []
    assert again.owner_to_dict("own-x")["owner"] == timed.owner_to_dict("own-x")["owner"]


def test_owner_waits_for_an_account_whose_cip_its_partition_has_not_applied_yet():
    """The 4-partition Kafka flake: acct-b's partition is slow, so the owners agent has not even heard that acct-b
    belongs to the owner when acct-a's windows come in. Waiting only for known members let acct-a's figures run
    ahead; acct-b's early windows then crossed with acct-a's later figures (knowledge half an hour early). The
    horizon waits for every source partition, so the crossing is the in-process one."""
    ws, expected, parts = _split_owner()
    msgs = _marked(parts["acct-a"], 0)
    for w in (w for w in ws if w.account_id == "acct-a"):
        parts["acct-a"].on_window(w)
        msgs += _marked(parts["acct-a"], 0)
    msgs += _marked(parts["acct-b"], 1)  # B's CIP (its membership) only now
    for w in (w for w in ws if w.account_id == "acct-b"):
        parts["acct-b"].on_window(w)
        msgs += _marked(parts["acct-b"], 1)
    msgs += [partition_mark(0, QUIET), partition_mark(1, QUIET)]
    timed = EventTimeOwners(OwnerAggregator(demo(), detector=OwnerAggregate()), sources=2, skew_s=W)
    assert [d for m in msgs for d in timed.receive(m)] == [expected]
    members_only = EventTimeOwners(OwnerAggregator(demo(), detector=OwnerAggregate()), sources=1, skew_s=W)
    moved = [d for m in msgs for d in members_only.receive(m)]  # partition 1 not waited on: acct-a ran ahead
    assert len(moved) > 1 and moved[0].event_time > expected.event_time + W  # decided before B's windows came,
    assert moved[-1].event_time == pytest.approx(expected.event_time)  # re-decided as they did


def test_quiet_partition_stops_holding_the_others_back():
    """acct-b's partition goes silent after one window: acct-a's windows are held until it is marked QUIET (the faust
    app does so after `detect.owner_idle_s` without input), then applied in event time and the owner crosses. When
    acct-b's partition marks a real watermark again, newer windows wait for it again."""
    timed = EventTimeOwners(OwnerAggregator(demo(), detector=OwnerAggregate()), sources=2, skew_s=W)
    eng_a, eng_b = _partition_engine(("acct-a",)), _partition_engine(("acct-b",))
    got: list[Detection] = []
    eng_b.on_window(window("wl-b", "acct-b", 0, flop=1e17))
    for m in _drain(eng_a, 0) + _marked(eng_b, 1):
        got += timed.receive(m)
    for i in range(10):
        eng_a.on_window(window("wl-a", "acct-a", i, flop=1e17))
        for m in _marked(eng_a, 0):
            got += timed.receive(m)
    assert got == [] and len(timed.clocks["own-x"]["pending"]) == 11  # all held: B has reached T0 + W, less the skew
    assert timed.held("own-x")
    (det,) = timed.receive(partition_mark(1, QUIET))
    assert by([det], "owner_aggregate") == [det] and det.beneficial_owner_id == "own-x"
    assert [c["t"] for c in timed.clocks["own-x"]["pending"]] == [T0 + 10 * W]  # A's own mark, less the skew
    eng_b.on_window(window("wl-b", "acct-b", 1, flop=1e17))
    for m in _marked(eng_b, 1):
        timed.receive(m)
    eng_a.on_window(window("wl-a", "acct-a", 10, flop=1e17))
    for m in _marked(eng_a, 0):
        timed.receive(m)
    assert [c["account_id"] for c in timed.clocks["own-x"]["pending"]] == ["acct-a", "acct-a"]


def test_owner_removal_lost_in_a_crash_is_re_derived_from_the_restored_state():
    """A CIP stops naming the owner; the engine checkpoint holds it but the retraction was never sent (crash). The
    replayed CIP is a no-op, yet the restored engine's owner_snapshot re-sends the retraction (and re-sending the
    snapshot again changes nothing)."""
    eng_a, eng_b = _partition_engine(("acct-a",)), _partition_engine(("acct-b",))
    agg = EventTimeOwners(OwnerAggregator(demo(), detector=OwnerAggregate()), sources=2, skew_s=0.0)
    for i in range(3):
        for p, (a, eng) in enumerate((("acct-a", eng_a), ("acct-b", eng_b))):
            eng.on_window(window(f"wl-{a[-1]}", a, i, flop=1e17))
            for m in _marked(eng, p):
                agg.receive(m)
    assert agg.agg.owners["own-x"].accounts == ["acct-a", "acct-b"]
    removal = cip("acct-a", us_person=True, country="US", owners=[], updated_at=T0 + 10 * W)
    eng_a.on_cip(removal)
    assert eng_a.owner_outbox == [retraction("own-x", "acct-a")]
    shared, parts = orjson.loads(orjson.dumps(split(eng_a)))  # checkpoint written; the outbox is lost
    eng_a = from_split(shared, parts, demo())
    assert eng_a.on_cip(removal) == [] and eng_a.owner_outbox == []  # the replay alone re-sends nothing
    assert "acct-a" in agg.agg.owners["own-x"].accounts
    snap = eng_a.owner_snapshot()
    assert retraction("own-x", "acct-a") in snap
    eng_a.owner_outbox += snap
    sent = _marked(eng_a, 0)
    for m in sent + _marked(eng_b, 1):
        agg.receive(m)
    assert agg.agg.owners["own-x"].accounts == ["acct-b"]
    assert {r["account_id"] for r in agg.agg.owners["own-x"].runs.values()} == {"acct-b"}
    before = agg.owner_to_dict("own-x")
    for m in sent:  # idempotent: a second restart re-sends the same
        agg.receive(m)
    assert agg.owner_to_dict("own-x") == before
    # An account that still names its owner re-sends its membership and each live run's latest figures.
    snap_b = eng_b.owner_snapshot()
    assert snap_b[0] == membership("own-x", "acct-b")
    assert [(c["run_id"], c["entry"]["used"]) for c in snap_b[1:]] == [(r.run_id, r.used) for r in eng_b.runs.values()]


def test_owner_below_min_pct_is_not_aggregated():
    eng = DetectEngine(demo())
    for a in ("acct-c", "acct-d"):
        eng.on_cip(cip(a, us_person=True, country="US", owners=[owner("own-y", 10.0)]))
    dets = feed(eng, [window("wl-c", "acct-c", i, flop=1e17) for i in range(6)])
    dets += feed(eng, [window("wl-d", "acct-d", i, flop=1e17) for i in range(6)])
    assert by(dets, "owner_aggregate") == []


def test_special_measures_once_at_first_event_after_the_cip_record():
    eng = DetectEngine(demo())  # jurisdictions KP, IR
    eng.on_cip(cip("acct-kp", country="KP", updated_at=T0 + 30))
    assert eng.on_allocation(alloc("acct-kp", "job_started", T0, workload="wl-kp")) == []  # before the record
    dets = feed(eng, [window("wl-kp", "acct-kp", i, flop=1e10, features=INFERENCE) for i in range(3)])
    sm = by(dets, "special_measures")
    assert len(sm) == 1 and sm[0].outcome == "reportable" and sm[0].run_id is None
    assert sm[0].event_time == T0 + 30  # the first window covers the record's time
    assert "customer_country:KP" in sm[0].evidence["matches"]


def test_special_measures_by_owner_residence_when_cip_arrives_late():
    eng = DetectEngine(demo())
    feed(eng, [window("wl-ir", "acct-ir", i, flop=1e10, features=INFERENCE) for i in range(5)])
    late = eng.on_cip(cip("acct-ir", updated_at=T0 + 2 * W + 5, owners=[owner("own-ir", 30, nationality="IR")]))
    sm = by(late, "special_measures")
    assert len(sm) == 1 and sm[0].event_time == T0 + 2 * W + 5


def test_cip_missing_is_foreign_by_default_and_a_late_cip_adds_nothing():
    eng = DetectEngine(demo())
    ct = by(feed(eng, [window("wl-m", "acct-m", i, flop=3e17) for i in range(5)]), "compute_threshold")
    assert [d.outcome for d in ct] == ["reportable"]
    assert ct[0].evidence["flags"] == ["cip_missing"] and ct[0].evidence["foreign_person"]["status"] == "unknown"
    assert by(eng.on_cip(cip("acct-m", updated_at=T0 + 10 * W)), "compute_threshold") == []


def test_cip_late_knowledge_is_when_the_record_made_them_foreign():
    eng = DetectEngine(with_foreign(demo(), unknown_is_foreign=False))
    ct = by(feed(eng, [window("wl-l", "acct-l", i, flop=3e17) for i in range(5)]), "compute_threshold")
    assert [d.outcome for d in ct] == ["monitored"]  # unknown, and unknown is not foreign under this policy
    crossing = expected_crossing(3e17, 5)
    late = by(eng.on_cip(cip("acct-l", updated_at=T0 + 20 * W)), "compute_threshold")
    assert [d.outcome for d in late] == ["reportable"]
    assert late[0].event_time == T0 + 20 * W and late[0].event_time > crossing
    assert late[0].evidence["knowledge_at_from"]["crossing"] == pytest.approx(crossing)


def test_cip_record_older_than_the_crossing_but_delivered_late_keeps_the_crossing_time():
    eng = DetectEngine(with_foreign(demo(), unknown_is_foreign=False))
    feed(eng, [window("wl-o", "acct-o", i, flop=3e17) for i in range(5)])
    late = by(eng.on_cip(cip("acct-o", updated_at=T0 - 100)), "compute_threshold")
    assert [d.event_time for d in late] == [pytest.approx(expected_crossing(3e17, 5))]


def test_conflicting_cip_latest_wins_and_the_conflict_is_noted():
    eng = DetectEngine(demo())
    eng.on_cip(cip("acct-k", us_person=True, country="US", updated_at=T0 + 10))
    eng.on_cip(cip("acct-k", us_person=False, country="DE", updated_at=T0 - 10))  # older: ignored
    assert eng.determination("acct-k").status == "us_person"
    ct = by(feed(eng, [window("wl-k", "acct-k", i, flop=5e17) for i in range(3)]), "compute_threshold")
    assert ct[0].outcome == "monitored"
    assert ct[0].evidence["cip_notes"][0]["conflict"] == "stale_record_ignored"


def run_of(dets_or_engine: DetectEngine, workload: str) -> str:
    return dets_or_engine.stitcher.workload_run[workload]


@pytest.mark.parametrize("gap_windows, same", [(10, True), (40, False)])
def test_restart_under_a_new_job_id_without_label_is_stitched_by_footprint(gap_windows, same):
    eng = DetectEngine(demo())
    eng.on_cip(cip("acct-r"))
    feed(eng, [window("job-1", "acct-r", i, flop=1e16, job="j1") for i in range(5)])
    feed(eng, [window("job-2", "acct-r", 5 + gap_windows + i, flop=1e16, job="j2") for i in range(3)])
    assert (run_of(eng, "job-1") == run_of(eng, "job-2")) is same


def test_restart_with_a_different_footprint_or_concurrent_lookalike_is_a_new_run():
    eng = DetectEngine(demo())
    feed(eng, [window("job-1", "acct-s", i, flop=1e16) for i in range(5)])
    feed(eng, [window("job-2", "acct-s", 6 + i, flop=1e16, devices=16) for i in range(3)])
    assert run_of(eng, "job-1") != run_of(eng, "job-2")
    feed(eng, [window("job-3", "acct-s", 8 + i, flop=1e16, devices=16) for i in range(2)])  # beside job-2
    assert run_of(eng, "job-3") != run_of(eng, "job-2")


def _resume_inputs() -> tuple[list[Any], list[Any]]:
    """Job 1 (8 H100, 5 windows) and its resume job 2 two windows later; job 2's first window a partial merge (4 of
    its 8 devices), as Kafka may hand it over before the other partials. (allocations, windows) in event time."""
    allocs = [alloc("acct-o", "job_started", T0, workload="job-1"), alloc("acct-o", "job_stopped", T0 + 5 * W,
                                                                         workload="job-1"),
              alloc("acct-o", "job_started", T0 + 7 * W, workload="job-2")]
    ws = [window("job-1", "acct-o", i, flop=1e16) for i in range(5)]
    ws += [window("job-2", "acct-o", 7, flop=5e15, devices=4)] + [window("job-2", "acct-o", 7 + i, flop=1e16)
                                                                   for i in range(4)]
    return allocs, ws


@pytest.mark.parametrize("order", ["event_time", "windows_first", "allocations_last_of_each_job"])
def test_resume_is_stitched_whatever_came_first_window_or_allocation(order):
    """The run a job joins does not depend on arrival order (the replay sees each allocation before its job's
    windows; a restarted faust worker often reads a backlog of windows first): a job first placed on a partial
    window or without its allocation is moved into the run it resumes, its windows with it, and the run id is the
    same as in event time."""
    allocs, ws = _resume_inputs()
    eng = DetectEngine(demo())
    if order == "event_time":
        items = sorted([(a.ts, 0, a) for a in allocs] + [(w.window_start, 1, w) for w in ws], key=lambda x: x[:2])
        seq = [x[2] for x in items]
    elif order == "windows_first":
        seq = [*ws, *allocs]
    else:
        seq = [*ws[:5], allocs[0], allocs[1], *ws[5:], allocs[2]]
    for x in seq:
        if hasattr(x, "kind"):
            eng.on_allocation(x)
        else:
            eng.on_window(x)
    assert run_of(eng, "job-1") == run_of(eng, "job-2")
    (run,) = eng.runs.values()
    assert run.run_id == run_of(eng, "job-1") and run.used == pytest.approx(9e16)  # the partial replaced, not added
    assert sorted(eng.stitcher.runs[run.run_id].workloads) == ["job-1", "job-2"]


def test_restart_with_run_label_is_stitched_across_a_long_gap_and_sums_compute():
    eng = DetectEngine(demo())
    eng.on_cip(cip("acct-lb"))
    d1 = feed(eng, [window("job-a", "acct-lb", i, flop=2e17, label="llm-7") for i in range(3)])
    d2 = feed(eng, [window("job-b", "acct-lb", 200 + i, flop=2e17, label="llm-7", devices=16) for i in range(3)])
    assert run_of(eng, "job-a") == run_of(eng, "job-b")
    ct = by(d1 + d2, "compute_threshold")
    assert len(ct) == 1 and sorted(ct[0].workload_ids) == ["job-a", "job-b"]
    run = ct[0].evidence["run"]
    assert run["stitching"][0]["by"] == "run_label"
    # the description spans both jobs: the larger footprint, first start to last end
    assert (run["accelerators"], run["device_count"], run["workload_ids"]) == ({"H100": 16}, 16, ["job-a", "job-b"])
    assert run["start"] == T0 and T0 + 200 * W < run["end"] <= T0 + 203 * W


def test_label_from_allocation_stitches_unlabeled_telemetry():
    eng = DetectEngine(demo())
    eng.on_allocation(alloc("acct-al", "job_started", T0, workload="job-x", label="big"))
    eng.on_allocation(alloc("acct-al", "job_started", T0 + 9000, workload="job-y", label="big"))
    feed(eng, [window("job-x", "acct-al", 0, flop=1e16), window("job-y", "acct-al", 150, flop=1e16)])
    assert run_of(eng, "job-x") == run_of(eng, "job-y")


def test_change_in_scope_from_inference_to_training():
    eng = DetectEngine(demo())
    eng.on_cip(cip("acct-cs"))
    dets = feed(eng, [window("serve", "acct-cs", i, flop=1e15, features=INFERENCE, devices=2) for i in range(5)])
    dets += feed(eng, [window("train", "acct-cs", 100 + i, flop=4e17) for i in range(4)])
    cs = by(dets, "change_in_scope")
    assert len(cs) == 1 and cs[0].outcome == "info" and cs[0].reason == "scope_grew"
    assert cs[0].evidence["before"]["runs"][0]["band"] == "not_training"
    assert cs[0].run_id == by(dets, "compute_threshold")[0].run_id


def test_change_in_scope_when_a_reservation_grows_past_the_threshold_potential():
    eng = DetectEngine(demo())
    eng.on_cip(cip("acct-rg"))
    assert eng.on_allocation(alloc("acct-rg", "reserved", T0, count=1, reserved_until=T0 + 60)) == []
    dets = eng.on_allocation(alloc("acct-rg", "reservation_changed", T0 + 60, count=64, reserved_until=T0 + 7200))
    cs = by(dets, "change_in_scope")
    assert len(cs) == 1 and cs[0].reason == "reservation_grew" and cs[0].event_time == T0 + 60
    assert cs[0].evidence["before"]["max_possible_flop"] < T <= cs[0].evidence["after"]["max_possible_flop"]


def test_redelivered_window_does_not_double_count():
    eng = DetectEngine(demo())
    eng.on_cip(cip("acct-dup"))
    w = window("wl-dup", "acct-dup", 0, flop=6e17)
    assert feed(eng, [w, w, w]) == []
    assert eng.runs[run_of(eng, "wl-dup")].used == pytest.approx(6e17)


def rebuilt_from_split(eng: DetectEngine) -> DetectEngine:
    """Through the per-account split and JSON (as the faust tables hold it)."""
    shared, parts = orjson.loads(orjson.dumps(split(eng)))
    return from_split(shared, parts, eng.policy)


def scenario(eng: DetectEngine, split_at: int | None = None, by_account: bool = False) -> list[Detection]:
    """A mixed stream; with split_at, the engine is serialised to plain data and rebuilt half-way (by_account:
    through its per-account split)."""
    events = [("cip", cip("acct-1")), ("cip", cip("acct-2", us_person=True, country="US",
                                                  owners=[owner("own-z", 60)])),
              ("cip", cip("acct-3", us_person=True, country="US", owners=[owner("own-z", 60)])),
              ("alloc", alloc("acct-1", "reserved", T0, reserved_until=T0 + 1800)),
              ("alloc", alloc("acct-2", "job_stopped", T0 - 60, workload="w-never-seen"))]
    for i in range(8):
        events += [("win", window("w1", "acct-1", i, flop=5e16)), ("win", window("w2", "acct-2", i, flop=7e16)),
                   ("win", window("w3", "acct-3", i, flop=6e16, features=SMI_ONLY))]
    out: list[Detection] = []
    for n, (kind, ev) in enumerate(events):
        if split_at is not None and n == split_at:
            eng = rebuilt_from_split(eng) if by_account else DetectEngine.from_dict(eng.to_dict(), eng.policy)
        out += {"cip": eng.on_cip, "alloc": eng.on_allocation, "win": eng.on_window}[kind](ev)
        out += owners_here(eng)
    return out


def test_same_inputs_give_the_same_detections_and_state_round_trips():
    a = scenario(DetectEngine(demo()))
    b = scenario(DetectEngine(demo()))
    c = scenario(DetectEngine(demo()), split_at=13)
    s = scenario(DetectEngine(demo()), split_at=13, by_account=True)
    assert a, "the scenario must detect something"
    key = [(d.detection_id, d.event_time, d.outcome) for d in a]
    assert key == [(d.detection_id, d.event_time, d.outcome) for d in b]
    assert key == [(d.detection_id, d.event_time, d.outcome) for d in c]
    assert key == [(d.detection_id, d.event_time, d.outcome) for d in s]
    assert {d.detector_id for d in a} >= {"compute_threshold", "owner_aggregate", "reservation_potential"}


def test_state_split_by_account_round_trips():
    eng = DetectEngine(demo())
    scenario(eng)
    shared, _ = split(eng)
    assert "w-never-seen" in shared["stitcher"]["stopped"]  # no run yet: no account to file it under
    assert rebuilt_from_split(eng).to_dict() == eng.to_dict()
    eng.on_time(T0 + 5 * 86400)  # some state expires; emitted ids stay, with their account
    eng.on_window(window("w-late", "acct-4", 0, flop=6e17))
    shared, parts = split(eng)
    assert set(parts) == {"acct-1", "acct-2", "acct-3", "acct-4"}
    # An expired account keeps its emitted ids (never emitted twice) and nothing else.
    assert any(p["emitted"] and p["account"] is None and not p["runs"] for p in parts.values())
    assert rebuilt_from_split(eng).to_dict() == eng.to_dict()


def test_odd_input_never_raises_and_state_expires():
    eng = DetectEngine(demo())
    assert eng.on_window(window("orphan", None, 0)) == []
    assert eng.on_window(window("nofeat", "acct-z", 0, features=None, flop=float("nan"))) == []
    assert eng.on_window({"workload_id": "dictwin", "account_id": "acct-z", "window_start": T0,
                          "window_end": T0 + W}) == []
    eng.on_time(T0 + 10 * 86400)
    assert not eng.runs and "acct-z" not in eng.accounts
    many = [window(f"job-{i}", "acct-m", i, flop=1e10, label="same") for i in range(3 * RUN_IDS_K)]
    feed(eng, many)
    (run,) = eng.runs.values()
    assert len(run.workload_ids) == RUN_IDS_K and run.workload_ids[-1] == f"job-{3 * RUN_IDS_K - 1}"  # bounded
    assert TRAINING  # the builders' training features stay the default


# -- incremental checkpoints (split_dirty): the marked parts, applied to the last ones, are the whole split -------


def _canon(d: object) -> str:
    return json.dumps(d, sort_keys=True)  # stdlib: the shared part may hold ±inf


def full_entries(eng: DetectEngine) -> dict[str, str]:
    shared, parts = split(eng)
    return {"shared": _canon(shared)} | {aid: _canon(p) for aid, p in parts.items()}


def apply_dirty(entries: dict[str, str], eng: DetectEngine) -> tuple[set[str], bool]:
    """Write what split_dirty returns into `entries` (as the faust agent does); returns (accounts, shared?)."""
    shared, parts, deleted = split_dirty(eng)
    assert not set(parts) & set(deleted)
    if shared is not None:
        entries["shared"] = _canon(shared)
    entries |= {aid: _canon(p) for aid, p in parts.items()}
    for aid in deleted:
        entries.pop(aid, None)
    return set(parts), shared is not None


@pytest.mark.parametrize("batch", [10, 100])
def test_dirty_checkpoints_of_the_demo_add_up_to_the_full_split(demo_inputs: list[tuple[str, Any]], batch: int):
    stage = DetectStage(demo())
    entries: dict[str, str] = {}
    kinds = {"win": stage.on_window, "cip": stage.on_cip, "alloc": stage.on_allocation}
    wrote = 0  # account parts serialised
    for i in range(0, len(demo_inputs), batch):
        for kind, ev in demo_inputs[i:i + batch]:
            kinds[kind](ev)
        stage.on_time()  # as the faust agent: idle state expires at the batch's watermark
        accounts, _ = apply_dirty(entries, stage.engine)
        wrote += len(accounts)
        assert entries == full_entries(stage.engine), f"batch at event {i}"
        if i == len(demo_inputs) // 2:  # a restart from the entries: nothing is marked, and it carries on alike
            restored = json.loads(json.dumps(split(stage.engine)))
            stage.engine = from_split(*restored, stage.policy)
            assert split_dirty(stage.engine)[1:] == ({}, [])
    assert len(full_entries(stage.engine)) > 5
    stage.engine.on_time(stage.watermark + 30 * 86400)  # everything idle expires: emitted ids stay
    apply_dirty(entries, stage.engine)
    assert entries == full_entries(stage.engine)
    assert wrote > 0


def test_dirty_checkpoints_cover_owners_stops_expiry_and_deletion():
    """In-process owners (shared), a stop before any window (shared, then the run's account), a workload id
    reused by another account, a restored engine, idle expiry, and accounts that vanish entirely."""
    eng = DetectEngine(demo())
    entries: dict[str, str] = {}
    events = [("cip", cip("acct-1")), ("cip", cip("acct-2", us_person=True, country="US",
                                                  owners=[owner("own-z", 60)])),
              ("cip", cip("acct-3", us_person=True, country="US", owners=[owner("own-z", 60)])),
              ("alloc", alloc("acct-1", "reserved", T0, reserved_until=T0 + 1800)),
              ("cip", cip("acct-1", updated_at=T0 - 7200, country="FR")),  # stale: only a note on the account
              ("alloc", alloc("acct-2", "job_stopped", T0 - 60, workload="w-later")),
              ("win", window("w-later", "acct-2", 0, flop=1e10, features=INFERENCE)),
              ("win", window("w-tiny", "acct-5", 0, flop=1e3, features=INFERENCE))]
    for i in range(8):
        events += [("win", window("w1", "acct-1", i, flop=5e16)), ("win", window("w2", "acct-2", i, flop=7e16)),
                   ("win", window("w3", "acct-3", i, flop=6e16, features=SMI_ONLY))]
    events += [("alloc", alloc("acct-9", "job_stopped", T0 + 9 * W, workload="w1")),  # another account stops w1
               ("win", window("w1", "acct-9", 9, flop=5e16))]  # and sends a window under it
    for n, (kind, ev) in enumerate(events):
        {"cip": eng.on_cip, "alloc": eng.on_allocation, "win": eng.on_window}[kind](ev)
        owners_here(eng)
        apply_dirty(entries, eng)
        assert entries == full_entries(eng), f"after event {n}"
        if n == 12:
            eng = rebuilt_from_split(eng)
    assert json.loads(entries["shared"])["owners"], "owners are summed in process here"
    deleted: list[str] = []
    for t in (T0 + 3 * 3600, T0 + 7 * 3600, T0 + 30 * 86400):
        eng.on_time(t)
        shared, parts, gone = split_dirty(eng)
        entries |= {aid: _canon(p) for aid, p in parts.items()} | ({"shared": _canon(shared)} if shared else {})
        for aid in gone:
            entries.pop(aid)
        deleted += gone
        assert entries == full_entries(eng)
    assert "acct-5" in deleted  # no detection ids: nothing of it is kept


def test_a_batch_touching_one_account_serialises_only_that_account(demo_inputs: list[tuple[str, Any]]):
    stage = DetectStage(demo())
    for kind, ev in demo_inputs:
        {"win": stage.on_window, "cip": stage.on_cip, "alloc": stage.on_allocation}[kind](ev)
    stage.on_time()
    entries: dict[str, str] = {}
    apply_dirty(entries, stage.engine)
    assert len(entries) > 5 and apply_dirty(entries, stage.engine) == (set(), False)  # nothing new: nothing
    aid = sorted(stage.engine.accounts)[0]
    t = stage.watermark
    stage.engine.on_window(window("w-one", aid, 0, flop=1e12, t0=t))
    stage.engine.on_allocation(alloc(aid, "reserved", t + 30, reserved_until=t + 3600))
    accounts, _ = apply_dirty(entries, stage.engine)
    assert accounts == {aid}
    assert entries == full_entries(stage.engine)
    stage.engine.on_cip(cip(aid, updated_at=t))  # a CIP record alone: its account (and shared if owners move)
    assert apply_dirty(entries, stage.engine)[0] == {aid}
    assert entries == full_entries(stage.engine)


def test_a_replayed_window_never_counts_twice_however_many_workloads_the_run_has():
    """Exactly once where totals are summed: a run of 12 workloads x 70 windows (840 workload-windows, more than any
    count-capped memory of 256); re-delivering windows (a replay of offsets) within the allowed lateness replaces
    them, and one forgotten past the horizon is not counted again."""
    eng = DetectEngine(demo())
    eng.on_cip(cip("acct-big", us_person=True, country="US"))
    ws = [window(f"wl-{k}", "acct-big", i, flop=1e12, label="big") for i in range(70) for k in range(12)]
    feed(eng, ws)
    (run,) = eng.runs.values()
    used = run.used
    assert used == pytest.approx(840 * 1e12)
    feed(eng, [w for w in ws if w.window_start >= T0 + 20 * W])  # 50 windows back: inside the hour of lateness
    feed(eng, ws[:24])  # the first two windows: past the horizon, still remembered here: replaced
    assert run.used == pytest.approx(used)
    # A window past the horizon that is not remembered (forgotten, or data later than the allowed lateness).
    assert feed(eng, [window("wl-late", "acct-big", 0, flop=1e12, label="big")]) == []
    assert run.used == pytest.approx(used) and eng.errors.get("window_beyond_horizon") == 1


_Table = MemoryTable  # pipeline/detect/tables.py


def test_window_partials_survive_a_restart_each_written_once():
    """Two telemetry partitions' partials of one workload-window reach detect in different batches, with a worker
    restart between them: the restored stage merges the second with the first (the run counts both, not the second
    alone), and the partials changelog holds each partial once (not the window's set again with each new one)."""
    from pipeline.detect.tables import StageTables
    from pipeline.settings import Settings
    from schemas.windows import WindowAggregate

    def partial(part: int, flop: float) -> WindowAggregate:
        return WindowAggregate(window_id=f"w-{part}", workload_id="wl-t", account_id="acct-t", partition=part,
                               window_start=T0, window_end=T0 + W, sample_count=6, device_count=4, node_count=1,
                               devices=[f"GPU-{part}-{i}" for i in range(4)], nodes=[f"n-{part}"],
                               device_seconds=240.0, flop=flop, flop_low=flop, flop_high=flop, basis="tensor_active")

    settings = Settings(model_path="rule")
    engine, partials = _Table(), _Table()
    tabs = StageTables(engine, partials, settings, demo(), None)
    st, new = tabs.stage(0)
    assert new
    first = partial(0, 1e15)
    tabs.before_window(0, st, first)
    st.on_window(first)
    tabs.before_window(0, st, first)  # a replayed partial: nothing new to write
    st.on_window(first)
    tabs.save(0, st)
    assert [k for _, k, _ in partials.sent] == [f"0|wl-t|{T0!r}|w-0".encode()]

    tabs2 = StageTables(_Table(engine.data), _Table(partials.data), settings, demo(), None)  # after a restart
    st2, _ = tabs2.stage(0)
    second = partial(1, 2e15)
    tabs2.before_window(0, st2, second)
    st2.on_window(second)
    tabs2.save(0, st2)
    assert st2.settling == [("wl-t", T0)]  # the window waits to settle (DetectStage), across the restart too
    st2.flush()
    (run,) = st2.engine.runs.values()
    assert run.used == pytest.approx(3e15)
    assert [k for _, k, _ in tabs2.partials.sent] == [f"0|wl-t|{T0!r}|w-1".encode()]


# -- a detector the engine has never heard of, through the public plug-in API (README "Adding a detector") -------


class _ToyWindows(Detector):
    """Counts an account's windows in its own state (`update`), flags a run at the third, claims that run as its own
    case (`claims_run`) and re-reads each run when a CIP record arrives (`reevaluates_runs_on_cip`)."""

    id = "toy_windows"
    description = "toy: the third window of an account"
    reevaluates_runs_on_cip = True

    def update(self, state: DetectContext, event: Any) -> None:
        if state.account is not None and state.run is not None and isinstance(event, WorkloadWindow):
            state.account.activity["toy"] = state.account.activity.get("toy", 0) + 1

    def detect(self, state: DetectContext, event: Any) -> list[Detection]:
        n = state.account.activity.get("toy", 0) if state.account is not None else 0
        if state.run is None or n < 3:
            return []
        reason = "toy_window" if isinstance(event, WorkloadWindow) else "toy_cip"
        return [self.detection(state, outcome="needs_review", reason=reason, event_time=state.run.last_end,
                               summary=f"{n} windows", evidence={"windows": n}, run_id=state.run.run_id)]

    def claims_run(self, det: Detection) -> bool:
        return True


class _ToyOwner(Detector):
    """Runs only where an owner's sum crosses (`owner_level`); on an account's input it would raise (counted)."""

    id = "toy_owner"
    description = "toy: an owner's sum crossed"
    owner_level = True

    def detect(self, state: DetectContext, event: Any) -> list[Detection]:
        owner = state.owner
        assert event is None and owner is not None and owner.crossed is not None
        return [self.detection(state, outcome="info", reason="toy_owner", event_time=owner.crossed["at"],
                               summary="owner crossed", evidence={}, beneficial_owner_id=owner.owner_id)]


def _toy_engine(*toys: type[Detector]) -> DetectEngine:
    return DetectEngine(demo(), detectors=registry.build(classes=(*registry.DETECTORS, *toys)))


def test_a_new_detector_runs_through_the_engine_unchanged():
    eng = _toy_engine(_ToyWindows, _ToyOwner)
    eng.on_cip(cip("acct-t", us_person=True, country="US"))
    dets = feed(eng, [window("wl-t", "acct-t", i, flop=1e16) for i in range(5)])
    (toy,) = by(dets, "toy_windows")  # update ran before detect; later windows repeat the same content id
    assert (toy.reason, toy.evidence["windows"], toy.event_time) == ("toy_window", 3, T0 + 3 * W)
    assert eng.runs[toy.run_id].own_case  # its claim, not the engine, made the run a case of its own
    late = by(eng.on_cip(cip("acct-t", us_person=True, country="US", updated_at=T0 + 10 * W)), "toy_windows")
    assert [(d.reason, d.run_id) for d in late] == [("toy_cip", toy.run_id)]
    assert by(dets, "toy_owner") == [] and eng.errors == {}  # never run on an account's input


def both_accounts() -> list[WorkloadWindow]:
    """Six windows of acct-a and of acct-b, in event-time order."""
    return [window(f"wl-{a[-1]}", a, i, flop=1e17) for i in range(6) for a in ("acct-a", "acct-b")]


def test_a_new_owner_level_detector_runs_where_owner_sums_cross():
    eng = _toy_engine(_ToyOwner)
    for a in ("acct-a", "acct-b"):
        eng.on_cip(cip(a, us_person=True, country="US", owners=[owner("own-x", 50.0)]))
    dets = feed(eng, both_accounts())
    (oa,), (toy,) = by(dets, "owner_aggregate"), by(dets, "toy_owner")
    assert (toy.beneficial_owner_id, toy.account_id, toy.event_time) == ("own-x", "acct-b", oa.event_time)
    assert eng.errors == {}
    # A detector that claims each run as its own case takes the runs out of the owner's sum: nothing crosses.
    claimed = _toy_engine(_ToyWindows, _ToyOwner)
    for a in ("acct-a", "acct-b"):
        claimed.on_cip(cip(a, us_person=True, country="US", owners=[owner("own-x", 50.0)]))
    dets = feed(claimed, both_accounts())
    assert len(by(dets, "toy_windows")) == 2 and by(dets, "owner_aggregate") == by(dets, "toy_owner") == []


# -- corrected windows: each window once, and decisions as if the whole window had come first ------------------------

def _half(w: WorkloadWindow) -> WorkloadWindow:
    """The window as a first, partial merge delivers it: half its devices and FLOP (a slow partition's rows later)."""
    n = w.device_count // 2
    return dataclasses.replace(w, devices=w.devices[:n], device_count=n, flop=w.flop / 2, flop_low=w.flop_low / 2,
                               flop_high=w.flop_high / 2, sample_count=w.sample_count // 2, accelerators={"H100": n})


def _stream(deliver_partial: bool, redecide_s: float | None = None, n: int = 8,
            late: int = 3) -> tuple[DetectEngine, list[Detection]]:
    """Account acct-c (foreign) runs n windows of 3e17 (crossing T inside window 3); acct-o runs beside it. With
    `deliver_partial`, window `late` first comes half-merged and its rest two windows later, with a CIP update of
    another account and an allocation of acct-c between."""
    eng = DetectEngine(demo()) if redecide_s is None else DetectEngine(demo(), redecide_s=redecide_s)
    out = eng.on_cip(cip("acct-c")) + eng.on_cip(cip("acct-o"))
    for i in range(n):
        w = window("wl-c", "acct-c", i, flop=3e17)
        out += feed(eng, [_half(w) if deliver_partial and i == late else w, window("wl-o", "acct-o", i, flop=1e16)])
        if i == late + 1:
            out += eng.on_allocation(alloc("acct-c", "reserved", T0 + i * W + W, reserved_until=T0 + 7200))
            out += eng.on_cip(cip("acct-o", updated_at=T0 + i * W + W))  # in order (not a late input)
        if deliver_partial and i == late + 2:
            out += feed(eng, [window("wl-c", "acct-c", late, flop=3e17)])  # the late rows, merged: the whole window
    return eng, out


def _latest(dets: list[Detection]) -> dict[str, tuple[float, str, str]]:
    """Each detection id as finally stated (a re-decided detection supersedes the one emitted under its id)."""
    return {d.detection_id: (d.event_time, d.outcome, d.reason) for d in dets}


def test_a_window_delivered_twice_or_corrected_is_held_once_and_counted_once():
    whole, _ = _stream(False)
    partial, _ = _stream(True)
    twice, _ = _stream(False)
    feed(twice, [window("wl-c", "acct-c", 6, flop=3e17), window("wl-o", "acct-o", 2, flop=1e16)])  # re-delivered
    for eng in (partial, twice):
        (run,) = [r for r in eng.runs.values() if r.account_id == "acct-c"]
        keys = [(h["workload_id"], h["window_start"]) for h in run.history]
        assert len(keys) == len(set(keys)) == 8
        assert (run.used, run.used_low, run.used_high) == pytest.approx((8 * 3e17, 8 * 2.7e17, 8 * 6e17))
        assert run.basis == {"tensor_active": 8} and run.judged["windows"] == 8 and sum(run.bands_seen.values()) == 8
        # Re-decided from the snapshot before the partial window: the very state of the single delivery.
        assert eng.to_dict() == whole.to_dict()
    # The same when the corrected window completes a block of 16 (the verdict summary folds it in: a snapshot sharing
    # the summary it folded into would be changed by the first delivery).
    long_whole, _ = _stream(False, n=24, late=15)
    long_partial, _ = _stream(True, n=24, late=15)
    assert long_partial.redecided["corrections"] == 1 and long_partial.to_dict() == long_whole.to_dict()
    # Past the re-decide horizon a correction replaces the window's figures; its totals are still counted once.
    old, _ = _stream(True, redecide_s=30.0)
    (run,) = [r for r in old.runs.values() if r.account_id == "acct-c"]
    assert old.redecided["too_old"] == 1 and old.redecided["corrections"] == 0
    assert run.used == pytest.approx(8 * 3e17) and run.basis == {"tensor_active": 8}
    assert sorted(h["window_start"] for h in run.history) == [T0 + i * W for i in range(8)]
    assert next(h for h in run.history if h["window_start"] == T0 + 3 * W)["device_count"] == 8


def test_a_corrected_window_gives_the_detections_of_the_whole_window_first():
    _, whole = _stream(False)
    eng, partial = _stream(True)
    ct = by(whole, "compute_threshold")
    assert [(d.outcome, d.event_time) for d in ct] == [("reportable", pytest.approx(expected_crossing(3e17, 8)))]
    # On the half window the crossing was interpolated 40 s into window 3 (not 20 s); the correction re-decides it
    # under the same id (a superseding version).
    first = by(partial, "compute_threshold")[0]
    assert first.detection_id == ct[0].detection_id and first.event_time == pytest.approx(T0 + 3 * W + 40)
    assert _latest(partial) == _latest(whole)
    assert eng.redecided["corrections"] == 1 and eng.redecided["superseded"] == 1 and eng.redecided["stood"] == 0
    # Idempotent: the correction again, or any earlier delivery again, changes nothing and emits nothing.
    again = feed(eng, [window("wl-c", "acct-c", 3, flop=3e17), window("wl-c", "acct-c", 5, flop=3e17)])
    assert again == [] and eng.redecided["corrections"] == 1
    # Without re-deciding, the decision taken on the half window would stand.
    _, stood = _stream(True, redecide_s=0.0)
    assert _latest(stood) != _latest(whole)


def _two_late(batched: bool) -> tuple[DetectEngine, list[Detection]]:
    """_stream with windows 3 and 4 of acct-c first half-merged, both corrected two windows after window 4: in one
    batch (on_corrections, with a replay of window 6 between) or one by one (on_window each)."""
    eng = DetectEngine(demo())
    out = eng.on_cip(cip("acct-c")) + eng.on_cip(cip("acct-o"))
    for i in range(8):
        w = window("wl-c", "acct-c", i, flop=3e17)
        out += feed(eng, [_half(w) if i in (3, 4) else w, window("wl-o", "acct-o", i, flop=1e16)])
        if i == 4:
            out += eng.on_allocation(alloc("acct-c", "reserved", T0 + i * W + W, reserved_until=T0 + 7200))
            out += eng.on_cip(cip("acct-o", updated_at=T0 + i * W + W))  # in order (not a late input)
        if i == 6:
            late = [window("wl-c", "acct-c", 3, flop=3e17), window("wl-o", "acct-o", 6, flop=1e16),
                    window("wl-c", "acct-c", 4, flop=3e17)]
            out += eng.on_corrections(late) + owners_here(eng) if batched else feed(eng, late)
    return eng, out


def test_an_accounts_corrections_in_one_batch_roll_back_once_to_the_state_of_the_whole_windows():
    whole, whole_dets = _stream(False)
    batched, dets = _two_late(True)
    one_by_one, _ = _two_late(False)
    assert batched.redecided["corrections"] == one_by_one.redecided["corrections"] == 2
    assert batched.redecided["rollbacks"] == 1 and one_by_one.redecided["rollbacks"] == 2
    assert batched.redecided["inputs"] < one_by_one.redecided["inputs"]
    assert batched.to_dict() == one_by_one.to_dict() == whole.to_dict()
    assert _latest(dets) == _latest(whole_dets)
    assert batched.on_corrections([window("wl-c", "acct-c", 3, flop=3e17)]) == []  # as applied: nothing to do

