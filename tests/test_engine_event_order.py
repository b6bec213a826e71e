"""Inputs fetched out of event-time order decide as in order (detectors/engine.py `_late_at`): a window or an
allocation that comes after later inputs of its account (another topic or partition read ahead, as after a
restart on Kafka) goes back to its place in the account's journal, and what it changes is decided again. The
detections' latest versions (what the store and the case book keep) equal the in-order run's; an input older than
the re-decide horizon is applied where it comes, as before."""

from __future__ import annotations

from typing import Any

import pytest

from detectors.classifier_base import Verdict
from detectors.engine import DetectEngine
from detectors.state import AccountState
from schemas.detection import Detection
from tests.detector_builders import INFERENCE, T0, W, alloc, cip, demo, owner, window


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


def test_an_owners_crossing_moved_by_a_late_window_of_the_same_account_is_a_new_version() -> None:
    """In process the engine remembers every detection id it emitted; the owner's crossing re-decided under the same
    id (the same crossing account) comes out again, with where it was before."""
    owned = [cip(a, us_person=True, country="US", owners=[owner("own-x", 50.0)]) for a in ("acct-a", "acct-b")]
    wins = [window("wl-b", "acct-b", i, flop=1e17) for i in range(2)]  # acct-b: 2e17 early on
    wins += [window("wl-a", "acct-a", i, flop=1e17) for i in range(10)]  # acct-a crosses with its 8th window
    wins.sort(key=lambda w: w.window_end)
    in_order, _ = run([*owned, *wins])
    late = next(w for w in wins if (w.account_id, w.window_start) == ("acct-a", T0 + 2 * W))
    shuffled, _ = run([*owned, *[w for w in wins if w is not late], late])
    ref = [d for d in in_order if d.reason == "owner_aggregate"]
    got = [d for d in shuffled if d.reason == "owner_aggregate"]
    assert len(ref) == 1 and ref[0].account_id == "acct-a" and ref[0].event_time == T0 + 8 * W
    assert len(got) == 2 and {d.detection_id for d in got} == {ref[0].detection_id}
    assert got[0].event_time == T0 + 9 * W and got[-1].event_time == ref[0].event_time
    assert got[-1].evidence["redecided_from"] == {"at": T0 + 9 * W, "account_id": "acct-a"}


def test_a_late_window_long_after_an_owners_crossing_leaves_it_where_it_was() -> None:
    """The owner's log holds the last REDECIDE_S; a crossing made before it stands (re-applying the log from its base,
    already over the threshold, would date it at the log's first entry: the demo's owner case moved 6 min late)."""
    owned = [cip(a, us_person=True, country="US", owners=[owner("own-x", 50.0)]) for a in ("acct-a", "acct-b")]
    # each account stays below T alone (110 x 6e15); together they cross in their 84th window
    wins = [window(f"wl-{a[-1]}", a, i, flop=6e15) for i in range(110) for a in ("acct-a", "acct-b")]
    in_order, _ = run([*owned, *wins])
    late = wins[-5]  # acct-a's 108th window, 24 windows after the crossing
    dets, eng = run([*owned, *[w for w in wins if w is not late], late])
    (ref,) = [d for d in in_order if d.reason == "owner_aggregate"]
    (oa,) = [d for d in dets if d.reason == "owner_aggregate"]
    assert T0 + 83 * W < ref.event_time < T0 + 84 * W and oa.event_time == ref.event_time
    assert eng.owners["own-x"].crossed["at"] == ref.event_time and eng.redecided["late_inputs"] == 1


def test_special_measures_re_dated_by_an_allocation_older_than_the_horizon() -> None:
    """The demo's acct-sm in a chaos run: a broker kill held the allocations topic back ~20 min of event time (past
    the journal), its reservation came after the windows, and the case was dated at the first window. The finding is
    dated by the first event after the record (Detector.dated_by_first_event): the earlier one supersedes."""
    rec = cip("acct-kp", country="KP", updated_at=T0 - 3600)
    resv = alloc("acct-kp", "reserved", T0 - 300, count=8, reserved_until=T0 + 3600)
    wins = [window("wl-kp", "acct-kp", i, flop=1e10, features=INFERENCE) for i in range(6)]
    in_order, _ = run([rec, resv, *wins], redecide_s=2 * W)
    late, eng = run([rec, *wins, resv], redecide_s=2 * W)
    assert eng.redecided["late_inputs"] == 0  # past the horizon: not re-decided, re-dated
    sm = [d for d in late if d.reason == "special_measures"]
    assert [d.event_time for d in sm] == [T0, T0 - 300]  # the first window's, then the reservation's, superseding
    assert latest(late) == latest(in_order)
    # a later event re-finds it dated later: the same finding, not emitted again
    assert run([rec, *wins, resv, window("wl-kp", "acct-kp", 9, flop=1e10, features=INFERENCE)],
               redecide_s=2 * W)[0] == late


def test_special_measures_a_record_after_many_events_dates_the_first_of_them() -> None:
    """A CIP record that comes after more windows than an account remembered single events for (64) was dated at
    the oldest one remembered; the account's activity is kept as spans, so the first event is never forgotten."""
    wins = [window("wl-kp", "acct-kp", i, flop=1e10, features=INFERENCE) for i in range(80)]
    rec = cip("acct-kp", country="KP", updated_at=T0 - 3600)
    late, eng = run([*wins, rec])
    assert [d.event_time for d in late if d.reason == "special_measures"] == [T0]
    assert eng.accounts["acct-kp"].active == [[T0, T0 + 79 * W]]
    assert AccountState.from_dict({"account_id": "a", "recent_events": [T0 + W, T0]}).active == [[T0, T0], [T0 + W,
                                                                                                        T0 + W]]
    # a record dated inside the activity: the moment it names (a window covers it); after a gap: the next event
    gap = [*wins[:10], *wins[20:30]]
    for at, want in ((T0 + 5 * W + 7, T0 + 5 * W + 7), (T0 + 12 * W, T0 + 20 * W)):
        got, _ = run([*gap, cip("acct-kp", country="KP", updated_at=at)])
        assert [d.event_time for d in got if d.reason == "special_measures"] == [want]


def test_a_re_decision_never_moves_special_measures_later_again() -> None:
    """Re-deciding replays the journal from a snapshot before the late reservation's date was emitted: the finding,
    re-found at the first window first, is not emitted again later (it was, and the case flapped)."""
    rec = cip("acct-kp", country="KP", updated_at=T0 - 3600)
    resv = alloc("acct-kp", "reserved", T0 - 300, count=8, reserved_until=T0 + 3600)
    wins = [window("wl-kp", "acct-kp", i, flop=1e10, features=INFERENCE) for i in range(6)]
    _, eng = run([rec, *wins, resv], redecide_s=3 * W)
    corrected = window("wl-kp", "acct-kp", 4, flop=2e10, features=INFERENCE)  # a late partial of a journaled window
    assert eng.on_window(corrected) == [] and eng.redecided["corrections"] == 1


def test_special_measures_re_dated_when_the_record_and_the_reservation_come_after_the_first_windows() -> None:
    """Re-deciding from before the account's first input (its state is dropped there) keeps the date emitted: the
    late CIP record and reservation, each put back in its place, date the finding earlier, as in order."""
    rec = cip("acct-kp", country="KP", updated_at=T0 - 3600)
    resv = alloc("acct-kp", "reserved", T0 - 300, count=8, reserved_until=T0 + 3600)
    wins = [window("wl-kp", "acct-kp", i, flop=1e10, features=INFERENCE) for i in range(6)]
    in_order, _ = run([rec, resv, *wins])
    late, eng = run([*wins[:3], rec, resv, *wins[3:]])
    assert eng.redecided["late_inputs"] == 2
    assert [d.event_time for d in late if d.reason == "special_measures"] == [T0, T0 - 300]
    assert latest(late) == latest(in_order)


@pytest.mark.parametrize("resv_at", [T0 - 300, T0 + W, T0 + 2 * W + 30])
def test_a_reservation_read_after_the_windows_past_the_journal_dates_the_projected_crossing_as_in_order(
        resv_at: float) -> None:
    """The demo's acct-us-fo and acct-scope with allocations held back past the journal: their reservations came
    after the runs had crossed on used compute, and the cases opened as compute_used, minutes late. The reservation
    now re-dates the run's crossing to the window end the in-order run projected it at (the first one after the
    reservation), superseding under the same id."""
    resv = alloc("acct-f", "reserved", resv_at, count=8, reserved_until=T0 + 3600)
    wins = [window("wl-f", "acct-f", i, flop=3e17) for i in range(8)]
    in_order, _ = run([cip("acct-f"), *[w for w in wins if w.window_end <= resv_at], resv,
                       *[w for w in wins if w.window_end > resv_at]], redecide_s=2 * W)
    late, eng = run([cip("acct-f"), *wins, resv], redecide_s=2 * W)
    assert eng.redecided["late_inputs"] == 0 and eng.redecided["late_reservation"] == 1
    want = {d.event_time for d in in_order if d.reason == "compute_projected"}
    assert want == {max(T0 + W, (resv_at // W + 1) * W)}
    assert [d.reason for d in late if d.detector_id == "compute_threshold"] == ["compute_used", "compute_projected"]
    # the used crossing already emitted stands (another finding of the same run's case, dated later); the case
    # is dated by its earliest finding, the projected one, as in order
    extra = {k: v for k, v in latest(late).items() if k not in latest(in_order)}
    assert [r for _, r, _ in extra.values()] == ["compute_used"] and min(t for _, _, t in extra.values()) > min(want)
    assert {k: v for k, v in latest(late).items() if k not in extra} == latest(in_order)
    (run_state,) = eng.runs.values()
    assert run_state.crossed["at"] == min(want) and run_state.crossed["used"] == pytest.approx(
        3e17 * ((min(want) - T0) / W))


def test_a_reservation_read_after_a_run_crossed_before_it_changes_nothing() -> None:
    """A reservation made after the run's used crossing: the in-order run crossed on used compute first too."""
    wins = [window("wl-f", "acct-f", i, flop=3e17) for i in range(8)]
    resv = alloc("acct-f", "reserved", T0 + 5 * W, count=8, reserved_until=T0 + 3600)
    late, eng = run([cip("acct-f"), *wins, resv], redecide_s=2 * W)
    in_order, _ = run([cip("acct-f"), *wins[:5], resv, *wins[5:]], redecide_s=2 * W)
    assert eng.redecided["late_reservation"] == 0 and latest(late) == latest(in_order)
    assert [d.reason for d in late if d.detector_id == "compute_threshold"] == ["compute_used"]


def test_a_reservation_read_late_before_the_run_crossed_dates_it_at_once() -> None:
    """Below the threshold on used compute, the late reservation makes the projected crossing now, dated at the
    first window after it (not at the next window to come)."""
    wins = [window("wl-f", "acct-f", i, flop=3e17) for i in range(3)]
    resv = alloc("acct-f", "reserved", T0 - 300, count=8, reserved_until=T0 + 3600)
    late, eng = run([cip("acct-f"), *wins, resv], redecide_s=W)
    in_order, _ = run([cip("acct-f"), resv, *wins], redecide_s=W)
    assert latest(late) == latest(in_order) and eng.redecided["late_reservation"] == 1
    assert [(d.reason, d.event_time) for d in late if d.detector_id == "compute_threshold"] == [
        ("compute_projected", T0 + W)]


class _YoungUncertain:
    """Uncertain on a run's first 3 windows (as the shipped model's short-history rule), then confidently and
    explainedly not_training: a not_training that closes the question under the demo policy."""

    def predict(self, history: Any) -> Verdict:
        if len(history) < 4:
            return Verdict(0.5, "uncertain", [], "young", "", reasons=("short_history",), in_distribution=True)
        return Verdict(0.01, "not_training", [("mean_gpu_util", -0.4)], "young", "", in_distribution=True)


def test_a_reservation_read_late_decides_the_re_dated_crossing_on_the_verdict_of_its_time() -> None:
    """The scope scenario's reservation-growth accounts with allocations delayed 1500 s: the runs were projected over
    the threshold at their first window, uncertain then (needs_review in order); read late, the reservation found
    them confidently not_training and the case was lost. The re-dated crossing is decided on the verdict the run had
    at its time, and on each one after it."""
    resv = alloc("acct-f", "reserved", T0 - 300, count=8, reserved_until=T0 + 20 * 3600)
    wins = [window("wl-f", "acct-f", i, flop=1e15, features=INFERENCE) for i in range(10)]
    in_order, _ = run([cip("acct-f"), resv, *wins], classifier=_YoungUncertain())
    late, eng = run([cip("acct-f"), *wins, resv], classifier=_YoungUncertain(), redecide_s=2 * W)
    assert [(d.outcome, d.reason, d.event_time) for d in in_order if d.detector_id == "compute_threshold"] == [
        ("needs_review", "compute_projected", T0 + W)]
    # the change in scope the crossing makes (scope_grew, Detector.reads_run_crossing) too, dated with it
    assert [(d.reason, d.event_time) for d in late if d.detector_id == "change_in_scope"] == [("scope_grew", T0 + W)]
    assert eng.redecided["late_reservation"] == 1 and latest(late) == latest(in_order)
    (r,) = eng.runs.values()
    assert [sp["band"] for sp in r.spells] == ["uncertain", "not_training"] and r.verdict["band"] == "not_training"


def test_a_reservation_read_late_is_compared_with_the_use_of_its_own_time() -> None:
    """The demo's acct-scope with allocations 1500 s late: its reservation grew while the account used a few devices
    (reservation_outgrew_use in order), but it was read after the use had grown too, and nothing was found. The
    scope baseline keeps its levels of use (ScopeBaseline.levels), so the reservation meets the use of its time."""
    resv = alloc("acct-g", "reserved", T0 + 40 * W - 30, count=64, reserved_until=T0 + 7200)
    wins = [window("wl-g", "acct-g", i, flop=1e12, devices=2 if i < 45 else 64, nodes=1 if i < 45 else 8)
            for i in range(60)]
    in_order, _ = run([cip("acct-g"), *wins[:40], resv, *wins[40:]])
    late, eng = run([cip("acct-g"), *wins, resv], redecide_s=2 * W)

    def outgrew(dets: list[Detection]) -> list[float]:
        return [d.event_time for d in dets if d.reason == "reservation_outgrew_use"]

    assert outgrew(in_order) == [T0 + 40 * W - 30]
    assert outgrew(late) == outgrew(in_order) and eng.redecided["late_inputs"] == 0
    assert latest(late) == latest(in_order)
