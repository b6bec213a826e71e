"""The pure case book and deadline monitor: knowledge and due dates in event time, idempotent replays, lifecycle."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from pipeline.cases.core import (
    CaseBook,
    CaseError,
    IllegalTransition,
    UnknownCase,
    add_business_days,
    case_id_for,
    fingerprint,
)
from pipeline.cases.deadline import OVERDUE, REMINDER, DeadlineMonitor
from pipeline.simulator.scenarios import T0 as T0_DEMO
from schemas.cip import BeneficialOwner, CipRecord, IpAccess
from schemas.detection import Detection
from schemas.ids import content_id
from schemas.policy import Policy, load_policy

BIS = load_policy("bis-2024-proposed")
EU = load_policy("eu-ai-act")  # needs_review is not knowledge there
DAY = 86_400.0
MONDAY = datetime(2026, 3, 2, 10, 0, tzinfo=UTC)  # a Monday
T0 = MONDAY.timestamp()
NOW = T0 + 120.0  # processing time, a little after the event time


def det(
    outcome: str = "reportable",
    *,
    t: float = T0,
    run: str | None = "run-1",
    account: str = "acct-1",
    reason: str = "compute_used",
    detector: str = "compute_threshold",
    owner: str | None = None,
    policy: Policy = BIS,
    evidence: dict[str, Any] | None = None,
) -> Detection:
    return Detection(
        detection_id=content_id("det", detector, policy.id, owner or account, run, reason),
        detector_id=detector,
        detector_version=1,
        severity="high",
        policy_id=policy.id,
        policy_version=policy.version,
        outcome=outcome,
        reason=reason,
        account_id=account,
        beneficial_owner_id=owner,
        run_id=run,
        workload_ids=[f"{account}-wl-1"],
        event_time=t,
        summary=f"{reason} at {t}",
        evidence={"flop_used": 1.2e26, "flop_low": 1.0e26, "flop_high": 2.4e26, "basis": "tensor_active"}
        if evidence is None
        else evidence,
        source_windows=[f"w-{int(t)}"],
    )


def cip(account: str = "acct-1") -> CipRecord:
    return CipRecord(
        account_id=account,
        updated_at=T0 - 30 * DAY,
        customer_name="Example Labs Ltd",
        customer_type="entity",
        country="SG",
        address="1 Example Road, Singapore",
        us_person=False,
        beneficial_owners=[BeneficialOwner(owner_id="own-1", name="A. Owner", ownership_pct=60, nationality="SG")],
        payment_means="credit card ending 4242",
        payment_source="Example Labs Ltd operating account, DBS Bank",
        emails=["ops@example.sg"],
        phones=["+65 5555 0100"],
        ip_addresses=[IpAccess(ip="203.0.113.7", accessed_at=T0 - DAY, purpose="administration")],
        verification_status="verified",
    )


def only(changes):
    assert len(changes.cases) == 1
    return changes.cases[0]


# ---- opening, knowledge, due dates -------------------------------------------------------------------------------


def test_reportable_opens_case_due_15_days_after_knowledge():
    book = CaseBook(BIS)
    d = det(t=T0)
    out = book.apply([d], {"acct-1": cip()}, NOW)
    case = only(out)
    assert case.case_id == case_id_for(d) == CaseBook(BIS).apply([d], {}, NOW + 99).cases[0].case_id
    assert (case.status, case.version, case.policy_id, case.policy_version) == ("open", 1, BIS.id, BIS.version)
    assert case.knowledge_at == T0 and case.detected_at == NOW  # event time vs processing time
    assert case.due_at == T0 + 15 * DAY
    assert case.identity["name"] == "Example Labs Ltd"
    assert [(e.action, e.from_status, e.to_status, e.at) for e in out.events] == [("opened", None, "open", T0)]


def test_owner_and_runless_cases_have_their_own_ids():
    by_account = case_id_for(det())
    by_owner = case_id_for(det(owner="own-1", reason="owner_aggregate", run=None))
    special = case_id_for(det(reason="special_measures", run=None))
    other_policy = case_id_for(det(policy=EU))
    assert len({by_account, by_owner, special, other_policy}) == 4
    # the same run seen by another detector lands on the same case
    assert case_id_for(det(detector="projection", reason="compute_projected")) == by_account


def test_late_detection_with_earlier_event_time_moves_knowledge_earlier():
    book = CaseBook(BIS)
    book.apply([det(t=T0)], {}, NOW)
    earlier = det(t=T0 - 3600, detector="projection", reason="compute_projected")
    case = only(book.apply([earlier], {}, NOW + 10))
    assert case.knowledge_at == T0 - 3600 and case.due_at == T0 - 3600 + 15 * DAY
    assert case.version == 2 and case.detectors == ["compute_threshold", "projection"]


def test_business_days_skip_weekends():
    friday = MONDAY + timedelta(days=4)
    saturday = MONDAY + timedelta(days=5)
    assert add_business_days(friday.timestamp(), 1) == (MONDAY + timedelta(days=7)).timestamp()
    # 15 business days from a Monday = three weeks later, same time of day
    assert add_business_days(T0, 15) == (MONDAY + timedelta(days=21)).timestamp()
    # knowledge on a weekend counts from Monday 00:00
    next_monday = datetime(2026, 3, 9, tzinfo=UTC)
    assert add_business_days(saturday.timestamp(), 1) == (next_monday + timedelta(days=1)).timestamp()

    business = BIS.model_copy(update={"reporting": BIS.reporting.model_copy(update={"day_kind": "business"})})
    case = only(CaseBook(business).apply([det(t=friday.timestamp())], {}, NOW))
    due = datetime.fromtimestamp(case.due_at, UTC)
    assert due == friday + timedelta(days=21) and due.weekday() == 4  # 15 business days = 3 weeks


# ---- idempotence -------------------------------------------------------------------------------------------------


def test_replay_produces_no_new_version_and_no_events():
    batch = [det(t=T0), det(t=T0 + 60, detector="projection", reason="compute_projected"), det(account="acct-2")]
    book = CaseBook(BIS)
    first = book.apply(batch, {}, NOW)
    assert len(first.cases) == 2 and len(first.events) == 3
    assert not book.apply(batch, {}, NOW + 3600)
    assert not book.apply(list(reversed(batch)), {}, NOW + 7200)
    # a restarted book loaded from the written cases replays to nothing as well
    restarted = CaseBook(BIS, first.cases)
    assert not restarted.apply(batch[:1], {}, NOW + 9999)
    # the same inputs on a fresh book give the same ids
    again = CaseBook(BIS).apply(list(reversed(batch)), {}, NOW)
    assert {c.case_id for c in again.cases} == {c.case_id for c in first.cases}
    assert {e.event_id for e in again.events} == {e.event_id for e in first.events}


def test_info_before_its_case_opens_is_attached_then_and_a_replay_changes_nothing():
    info = det("info", t=T0, detector="change_in_scope", reason="scope_grew")
    opener = det(t=T0 + 60)
    book = CaseBook(BIS)
    assert not book.apply([info], {}, NOW)  # info alone opens nothing
    first = book.apply([opener], {}, NOW)
    (case,) = first.cases
    assert [e.action for e in first.events] == ["opened", "evidence_added"]
    assert info.detection_id in case.evidence["detections"]
    # a restart loads the stored case and replays the same detections in the same batches: no change at all
    restarted = CaseBook(BIS, first.cases)
    assert not restarted.apply([info], {}, NOW + 10)
    assert not restarted.apply([opener], {}, NOW + 20)


def test_new_figures_update_evidence_and_bump_version():
    book = CaseBook(BIS)
    book.apply([det()], {}, NOW)
    updated = det(evidence={"flop_used": 3e26, "basis": "tensor_active"})
    case = only(book.apply([updated], {}, NOW + 60))
    assert case.version == 2 and case.status == "open" and case.updated_at == NOW + 60
    assert case.evidence["detections"][updated.detection_id]["evidence"]["flop_used"] == 3e26
    assert not book.apply([updated], {}, NOW + 120)


# ---- status rules ------------------------------------------------------------------------------------------------


def test_needs_review_confirmed_by_reportable_becomes_open_keeping_earliest_knowledge():
    book = CaseBook(BIS)
    review = only(book.apply([det("needs_review", t=T0, reason="compute_used_uncertain")], {}, NOW))
    assert review.status == "needs_review" and review.knowledge_at == T0 and review.suggested_inquiry
    out = book.apply([det("reportable", t=T0 + 5 * 3600)], {}, NOW + 10)
    case = only(out)
    assert case.status == "open" and case.knowledge_at == T0 and case.due_at == T0 + 15 * DAY
    assert [(e.action, e.from_status, e.to_status) for e in out.events] == [("confirmed", "needs_review", "open")]


def test_needs_review_is_not_knowledge_when_the_policy_says_so():
    book = CaseBook(EU)
    review = only(book.apply([det("needs_review", policy=EU, reason="uncertain")], {}, NOW))
    assert review.status == "needs_review" and review.knowledge_at is None and review.due_at is None
    case = only(book.apply([det("reportable", t=T0 + 3600, policy=EU)], {}, NOW + 10))
    assert case.status == "open" and case.knowledge_at == T0 + 3600 and case.due_at == T0 + 3600 + 14 * DAY


def test_monitored_has_no_clock_and_info_opens_nothing():
    book = CaseBook(BIS)
    assert not book.apply([det("info")], {}, NOW)
    case = only(book.apply([det("monitored")], {}, NOW))
    assert case.status == "monitored" and case.knowledge_at is None and case.due_at is None
    # a later CIP change makes the same run reportable: escalated, clock starts at that detection
    esc = only(book.apply([det("reportable", t=T0 + 600, detector="foreign_run")], {}, NOW + 5))
    assert esc.status == "open" and esc.knowledge_at == T0 + 600


# ---- analyst lifecycle -------------------------------------------------------------------------------------------


def test_lifecycle_ack_then_report_is_audited():
    book = CaseBook(BIS)
    cid = only(book.apply([det()], {}, NOW)).case_id
    acked = book.ack(cid, "alice", NOW + 100, "projected run of a foreign customer")
    assert only(acked).status == "acknowledged" and only(acked).version == 2
    ev = acked.events[0]
    assert ev.details == {"note": "projected run of a foreign customer"}  # the why is audited, not the case's
    assert (ev.actor, ev.action, ev.from_status, ev.to_status, ev.at) == ("alice", "acknowledged", "open",
                                                                         "acknowledged", NOW + 100)
    filed = book.report(cid, "bob", NOW + 200, "BIS-2026-0001")
    case = only(filed)
    assert case.status == "reported" and case.filing_reference == "BIS-2026-0001"
    assert filed.events[0].details["filing_reference"] == "BIS-2026-0001"
    # new evidence on a reported case is recorded but does not change the status
    later = only(book.apply([det(evidence={"flop_used": 5e26})], {}, NOW + 300))
    assert later.status == "reported" and later.version == 4


def test_illegal_transitions_raise_clear_errors():
    book = CaseBook(BIS)
    cid = only(book.apply([det()], {}, NOW)).case_id
    with pytest.raises(UnknownCase, match="no such case"):
        book.ack("case-nope", "alice", NOW)
    with pytest.raises(IllegalTransition, match="allowed from: needs_review"):
        book.decide_review(cid, "alice", NOW, True, "n/a")
    with pytest.raises(CaseError, match="filing reference is required"):
        book.report(cid, "alice", NOW, "  ")
    with pytest.raises(CaseError, match="reason is required"):
        book.dismiss(cid, "alice", NOW, "")
    book.report(cid, "alice", NOW + 1, "REF-1")
    with pytest.raises(IllegalTransition, match="'acknowledged' is not allowed on a case that is reported"):
        book.ack(cid, "alice", NOW + 2)
    with pytest.raises(IllegalTransition, match="that is reported"):
        book.dismiss(cid, "alice", NOW + 2, "changed my mind")
    assert book.get(cid).status == "reported" and book.get(cid).version == 2  # failed actions changed nothing


def test_review_decisions():
    book = CaseBook(EU)
    a = only(book.apply([det("needs_review", policy=EU, run="r-a")], {}, NOW)).case_id
    b = only(book.apply([det("needs_review", policy=EU, run="r-b")], {}, NOW)).case_id
    opened = only(book.decide_review(a, "carol", NOW + 50, True, "customer confirmed pre-training"))
    # EU profile: needs_review was no knowledge, so the analyst's decision starts the clock
    assert opened.status == "open" and opened.knowledge_at == NOW + 50 and opened.due_at == NOW + 50 + 14 * DAY
    dismissed = only(book.decide_review(b, "carol", NOW + 60, False, "inference service"))
    assert dismissed.status == "dismissed" and "inference service" in dismissed.dismiss_reason


def test_dismissed_case_reopens_only_on_new_stronger_evidence():
    book = CaseBook(BIS)
    cid = only(book.apply([det("needs_review", reason="uncertain")], {}, NOW)).case_id
    book.decide_review(cid, "carol", NOW + 10, False, "customer says fine-tuning eval only")
    # new figures at the same strength: kept as evidence, still dismissed
    same = book.apply([det("needs_review", reason="uncertain", evidence={"flop_used": 2e26})], {}, NOW + 20)
    assert only(same).status == "dismissed" and same.events[0].action == "evidence_added"
    # stronger (reportable) evidence reopens; the clock restarts at that detection
    out = book.apply([det("reportable", t=T0 + DAY)], {}, NOW + 30)
    case = only(out)
    assert case.status == "open" and case.knowledge_at == T0 + DAY and case.dismiss_reason is None
    assert (out.events[0].action, out.events[0].from_status) == ("reopened", "dismissed")

    # a dismissed projection reopens on actual use (new reason at the top outcome), not on new projection figures
    cid2 = only(book.apply([det(run="r2", reason="compute_projected")], {}, NOW)).case_id
    book.dismiss(cid2, "dave", NOW + 5, "reservation cancelled")
    assert only(book.apply([det(run="r2", reason="compute_projected", evidence={"x": 1})], {}, NOW + 6)).status \
        == "dismissed"
    assert only(book.apply([det(run="r2", reason="compute_used", detector="used")], {}, NOW + 7)).status == "open"


# ---- deadline monitor (event time) -------------------------------------------------------------------------------


def test_reminders_fire_at_7_3_1_days_and_overdue_at_due_once_each():
    book = CaseBook(BIS)
    case = only(book.apply([det()], {}, NOW))
    due = case.due_at
    mon = DeadlineMonitor(BIS)
    fired: list[tuple[str, float | None, float]] = []
    # step event time in 1-hour ticks plus the exact milestone instants, twice over each instant
    ticks = sorted({*(case.knowledge_at + h * 3600 for h in range((16 * 24) + 2)),
                    due - 7 * DAY - 1, due - 7 * DAY, due - 3 * DAY, due - DAY, due})
    for t in ticks:
        for _ in range(2):
            for e in mon.due([case], t, recorded_at=NOW):
                assert e.at <= t and e.recorded_at == NOW
                fired.append((e.action, e.details.get("lead_days"), e.at))
        if t == due - 7 * DAY - 1:
            assert not fired
    assert fired == [(REMINDER, 7.0, due - 7 * DAY), (REMINDER, 3.0, due - 3 * DAY), (REMINDER, 1.0, due - DAY),
                     (OVERDUE, None, due)]
    assert not mon.due([case], due - 7 * DAY - 1, NOW) and not DeadlineMonitor(BIS).due([case], due - 7 * DAY - 1, NOW)


def test_milestone_ids_are_deterministic_and_reported_cases_get_none():
    book = CaseBook(BIS)
    case = only(book.apply([det()], {}, NOW))
    late = DeadlineMonitor(BIS).due([case], case.due_at + DAY, NOW)  # jumped past everything: each fires once
    assert [e.action for e in late] == [REMINDER, REMINDER, REMINDER, OVERDUE]
    step = DeadlineMonitor(BIS)
    stepped = [e for t in (case.due_at - 7 * DAY, case.due_at) for e in step.due([case], t, NOW + 1)]
    assert [e.event_id for e in stepped] == [e.event_id for e in late]
    assert not DeadlineMonitor(BIS, emitted=[e.event_id for e in late]).due([case], case.due_at + DAY, NOW)
    reported = only(book.report(case.case_id, "alice", NOW + 5, "REF-9"))
    assert not DeadlineMonitor(BIS).due([reported], reported.due_at + DAY, NOW)
    monitored = only(book.apply([det("monitored", run="us-run")], {}, NOW))
    assert not DeadlineMonitor(BIS).due([monitored], T0 + 100 * DAY, NOW)


def test_newer_cip_record_refreshes_identity_of_pending_cases_only():
    book = CaseBook(BIS)
    open_id = only(book.apply([det()], {"acct-1": cip()}, NOW)).case_id
    filed_id = only(book.apply([det(run="r-filed")], {"acct-1": cip()}, NOW)).case_id
    book.report(filed_id, "alice", NOW + 1, "REF-2")
    newer = cip().model_copy(update={"updated_at": T0, "phones": ["+65 5555 0199"]})
    out = book.refresh_identity(newer, NOW + 2)
    assert [c.case_id for c in out.cases] == [open_id] and out.cases[0].identity["phones"] == ["+65 5555 0199"]
    assert out.events[0].action == "identity_updated" and out.cases[0].version == 2
    assert not book.refresh_identity(newer, NOW + 3)  # same record again: nothing
    assert book.get(filed_id).identity["phones"] == ["+65 5555 0100"]  # the filed report's snapshot stays


# ---- late CIP records revise (DetectStage + CaseBook, in process) --------------------------------------------------


def _detect_and_book(inputs: list[tuple[str, Any]], policy: Policy,
                     identity_first: bool = False) -> tuple[CaseBook, list]:
    """The demo's detect inputs through DetectStage into a CaseBook, as the runner carries them: CIP records as the
    stage applied them, then the detections. `identity_first`: every detection reaches the book after every
    identity update (on Kafka the detections travel through their topic, the identity update does not)."""
    from pipeline.detect.stage import DetectStage

    stage, book, cips, events, dets = DetectStage(policy), CaseBook(policy), {}, [], []
    take = {"win": stage.on_window, "cip": stage.on_cip, "alloc": stage.on_allocation}
    for out in [*(take[kind](ev) for kind, ev in inputs), stage.flush()]:
        cips |= {c.account_id: c for c in out.cips}
        if identity_first:
            dets += out.detections
        else:
            events += book.apply(out.detections, cips, 1.0).events
        for c in out.cips:
            events += book.refresh_identity(c, 1.0).events
    events += book.apply(dets, cips, 1.0).events
    return book, events


def _live(book: CaseBook) -> set[tuple]:
    return {(c.case_id, c.status, c.reason, c.knowledge_at) for c in book.cases if c.status != "dismissed"}


def test_a_late_cip_showing_a_us_person_revises_the_case_to_monitored(demo_inputs: list[tuple[str, Any]]):
    """acct-us-lab's CIP record (a U.S. person) arrives after all its windows: meanwhile the customer is unknown,
    counted as foreign, its training run opens a reportable case and a run the classifier is unsure of a
    needs_review one. The record revises the first to `monitored` and withdraws the second (knowledge and due date
    cleared, audit events); the cases left are those of the in-order delivery."""
    policy = load_policy("demo")
    late = [x for x in demo_inputs if x[0] == "cip" and x[1].account_id == "acct-us-lab"]
    assert late and late[0][1].us_person is True
    rest = [x for x in demo_inputs if not (x[0] == "cip" and x[1].account_id == "acct-us-lab")]
    ref, _ = _detect_and_book(demo_inputs, policy)
    book, events = _detect_and_book(rest + late, policy)

    (case,) = [c for c in book.cases if c.account_id == "acct-us-lab" and c.status != "dismissed"]
    mine = [e for e in events if e.case_id == case.case_id]
    assert (mine[0].action, mine[0].to_status) == ("opened", "open")  # judged while unknown
    revised = [e for e in mine if e.action == "revised"]
    assert len(revised) == 1 and revised[0].from_status == "open" and revised[0].to_status == "monitored"
    assert case.status == "monitored" and case.knowledge_at is None and case.due_at is None
    assert revised[0].details["knowledge_at"]["to"] is None
    for gone in [c for c in book.cases if c.account_id == "acct-us-lab" and c.status == "dismissed"]:
        (w,) = [e for e in events if e.case_id == gone.case_id and e.action == "withdrawn"]
        assert w.from_status in ("open", "needs_review") and gone.knowledge_at is None and gone.due_at is None
    assert _live(book) == _live(ref)


@pytest.mark.parametrize("late_s", [1200.0, 2700.0])
@pytest.mark.parametrize("identity_first", [False, True])
def test_a_cip_read_behind_the_windows_gives_the_in_order_cases(demo_inputs: list[tuple[str, Any]], late_s: float,
                                                                identity_first: bool):
    """acct-us-serve (a U.S. person) crosses the threshold 8 minutes in, on a run the classifier is unsure of: in
    order a `monitored` case. Its CIP record read after the windows of the first `late_s` (the cip topic behind the
    windows at a worker's start, as a Kafka chaos run met): meanwhile the customer is unknown, counted as foreign,
    and the crossing opens needs_review. Within the journal (20 min) the record goes back to its place and the
    engine re-decides the crossing (a monitored finding); past it the finding stands and the book revises the case
    (a U.S. person's unsure run is monitored). Either way, and whether the identity update or the detections reach
    the book first, the cases are those of the in-order delivery. Before: the case was withdrawn (dismissed), and
    with the identity update first it stayed needs_review, a reportable case the replay does not have."""
    policy = load_policy("demo")
    late = [x for x in demo_inputs if x[0] == "cip" and x[1].account_id == "acct-us-serve"]
    assert late and late[0][1].us_person is True
    rest = [x for x in demo_inputs if not (x[0] == "cip" and x[1].account_id == "acct-us-serve")]
    at = next(i for i, (kind, x) in enumerate(rest) if kind == "win" and x.window_end > T0_DEMO + late_s)
    ref, _ = _detect_and_book(demo_inputs, policy)
    book, events = _detect_and_book(rest[:at] + late + rest[at:], policy, identity_first)
    serve = [c for c in book.cases if c.account_id == "acct-us-serve"]
    assert {c.status for c in serve} == {"monitored"} and len(serve) == 2
    opened = [e for e in events if e.case_id in {c.case_id for c in serve} and e.to_status == "needs_review"]
    assert opened, "the crossing was made while the customer was unknown"
    assert _live(book) == _live(ref) and len(book.cases) == len(ref.cases)


def test_held_cip_is_applied_in_event_time_whatever_the_fetch_order(demo_inputs: list[tuple[str, Any]]):
    """Every CIP record and allocation delivered first (a whole topic read before the windows, as faust may fetch):
    the stage holds each until the windows reach its event time, so the cases are those of the in-order delivery."""
    policy = load_policy("demo")
    side = [x for x in demo_inputs if x[0] != "win"]
    wins = [x for x in demo_inputs if x[0] == "win"]
    ref, _ = _detect_and_book(demo_inputs, policy)
    book, events = _detect_and_book(side + wins, policy)
    assert not [e for e in events if e.action == "revised"]
    assert _live(book) == _live(ref) and len(book.cases) == len(ref.cases)


def test_info_held_for_a_case_not_yet_open_survives_a_restart(store) -> None:
    """A restart between an info detection and the detection that opens its case (the cases agent killed): the
    held info is re-derived from the stored detections, and the case opens with it, as without the restart."""
    from pipeline.cases.service import CaseService

    info = det("info", t=T0, detector="change_in_scope", reason="scope_grew")
    opener = det(t=T0 + 60)
    store.insert_detections([info])  # the runner and the cases agent store detections before applying them
    assert CaseService(store, BIS).process([info], NOW) == []
    store.insert_detections([opener])
    CaseService(store, BIS).process([opener], NOW + 10)  # a new process: nothing in memory
    (case,) = store.list_cases()
    assert info.detection_id in case.evidence["detections"]
    assert sorted(e.action for e in store.case_events(case.case_id)) == ["evidence_added", "opened"]


# ---- re-decided detections (the engine re-emits a detection under its id with other content) ---------------------


def test_a_redecided_detection_moves_knowledge_later_once_and_a_redelivery_changes_nothing():
    book = CaseBook(BIS)
    first = det(t=T0)
    opened = only(book.apply([first], {}, NOW))
    assert opened.knowledge_at == T0 and opened.due_at == T0 + 15 * DAY
    # the engine re-decided the run on a corrected window: same id, the crossing 3 windows later
    later = det(t=T0 + 180)
    assert later.detection_id == first.detection_id
    out = book.apply([later], {}, NOW + 60)
    case = only(out)
    assert case.knowledge_at == T0 + 180 and case.due_at == T0 + 180 + 15 * DAY and case.version == 2
    (event,) = out.events
    assert (event.action, event.from_status, event.to_status, event.at) == ("redecided", "open", "open", T0 + 180)
    assert event.details["knowledge_at"] == {"from": T0, "to": T0 + 180}
    assert event.details["due_at"] == {"from": T0 + 15 * DAY, "to": T0 + 180 + 15 * DAY}
    assert event.details["why"] == "detection_redecided" and event.details["supersedes"]["event_time"] == T0
    # the evidence holds the latest version only
    (entry,) = case.evidence["detections"].values()
    assert entry["event_time"] == T0 + 180
    # at-least-once redelivery of either version (same id, same content) changes nothing
    assert not book.apply([later], {}, NOW + 120)
    assert not book.apply([first], {}, NOW + 180)
    assert not CaseBook(BIS, [case]).apply([first, later], {}, NOW + 240)


def test_special_measures_keeps_its_earliest_date_whatever_order_its_versions_come_in():
    """A finding dated by its first event (Detector.dated_by_first_event): after a restart the engine can make its
    later dating again (from state before the earlier event was read again), which on Kafka dated the demo's acct-sm
    case 300 s late (test_faust_detect, CI at 2324641). A later version is received and kept out; an earlier one
    dates the case earlier, as any earlier finding does."""
    sm = {"run": None, "reason": "special_measures", "detector": "special_measures", "evidence": {"matches": ["x"]}}
    early, late = det(t=T0, **sm), det(t=T0 + 300, **sm)
    assert early.detection_id == late.detection_id
    book = CaseBook(BIS)
    assert only(book.apply([early], {}, NOW)).knowledge_at == T0
    out = book.apply([late], {}, NOW + 60)
    case = only(out)
    assert case.knowledge_at == T0 and case.due_at == T0 + 15 * DAY and case.status == "open"
    assert case.evidence["detections"][early.detection_id]["event_time"] == T0
    (event,) = out.events
    assert event.action == "evidence_added" and event.details["kept"]["event_time"] == T0
    assert not book.apply([late], {}, NOW + 120) and not book.apply([early], {}, NOW + 180)  # redeliveries
    other = CaseBook(BIS)  # the other order: the later dating first, then the earlier one
    assert only(other.apply([late], {}, NOW)).knowledge_at == T0 + 300
    assert only(other.apply([early], {}, NOW + 60)).knowledge_at == T0
    assert not other.apply([late], {}, NOW + 120)


def test_a_redecided_detection_dates_the_case_from_the_other_findings_still_counted():
    book = CaseBook(BIS)
    used = det(t=T0)
    projected = det(t=T0 + 120, detector="projection", reason="compute_projected")
    book.apply([used, projected], {}, NOW)
    # the finding that dated the case moves 10 min later: the projection (T0 + 120) now dates it
    out = book.apply([det(t=T0 + 600)], {}, NOW + 60)
    assert only(out).knowledge_at == T0 + 120 and out.events[0].action == "redecided"
    # a finding that did not date the case moves: the date stands, the evidence takes the new figures
    out = book.apply([det(t=T0 + 900)], {}, NOW + 120)
    assert only(out).knowledge_at == T0 + 120 and out.events[0].action == "evidence_added"
    assert out.events[0].details["supersedes"]["event_time"] == T0 + 600
    # re-decided earlier: it moves earlier, audited the same way
    out = book.apply([det(t=T0 - 60)], {}, NOW + 180)
    assert only(out).knowledge_at == T0 - 60 and out.events[0].details["knowledge_at"] == {"from": T0 + 120,
                                                                                            "to": T0 - 60}


def test_versions_of_one_id_in_one_batch_count_in_arrival_order():
    book = CaseBook(BIS)
    # re-decided earlier within the same batch: the later-received version wins, whatever its event time
    out = book.apply([det(t=T0 + 300), det(t=T0)], {}, NOW)
    case = only(out)
    assert case.knowledge_at == T0 and [e.action for e in out.events] == ["opened"]
    assert [e["event_time"] for e in case.evidence["detections"].values()] == [T0]


def test_a_redecided_detection_that_no_longer_meets_the_standard_leaves_the_date():
    book = CaseBook(EU)  # needs_review is not knowledge
    book.apply([det(t=T0, policy=EU)], {}, NOW)
    out = book.apply([det("needs_review", t=T0 + 300, policy=EU)], {}, NOW + 60)
    case = only(out)
    assert case.status == "open" and case.knowledge_at == T0  # the pipeline never downgrades; an analyst decides
    assert out.events[0].action == "evidence_added" and out.events[0].details["supersedes"]["outcome"] == "reportable"


def test_a_reopened_case_is_redated_only_from_findings_after_the_dismissal():
    book = CaseBook(BIS)
    cid = only(book.apply([det("needs_review", t=T0, reason="uncertain")], {}, NOW)).case_id
    book.dismiss(cid, "carol", NOW + 10, "eval job")
    assert only(book.apply([det(t=T0 + DAY)], {}, NOW + 20)).knowledge_at == T0 + DAY  # reopened
    # the reopening finding is re-decided later: the dismissed uncertain finding (T0) does not count again
    case = only(book.apply([det(t=T0 + DAY + 300)], {}, NOW + 30))
    assert case.status == "open" and case.knowledge_at == T0 + DAY + 300


def test_an_uncertain_finding_redecided_as_training_later_confirms_and_dates_the_case_then():
    book = CaseBook(BIS)  # needs_review counts as knowledge
    book.apply([det("needs_review", t=T0)], {}, NOW)
    # the same finding (same id) re-decided on the corrected window: training, its crossing 2 windows later
    out = book.apply([det("reportable", t=T0 + 120)], {}, NOW + 60)
    case = only(out)
    assert case.status == "open" and case.knowledge_at == T0 + 120 and case.due_at == T0 + 120 + 15 * DAY
    (event,) = out.events
    assert event.action == "confirmed" and event.details["why"] == "detection_redecided"
    assert event.details["knowledge_at"] == {"from": T0, "to": T0 + 120}


# ---- telling a redelivery from a new version: fingerprints kept per detection id, not per case ----------------------


def test_a_redelivered_old_version_is_never_applied_again_however_many_other_versions_the_case_took():
    """The case used to keep the last 512 fingerprints of the whole case: a redelivery of a version pushed out of
    that list by other findings' versions came back as new, superseded the latest and moved knowledge_at back."""
    book = CaseBook(BIS)
    first, redecided = det(t=T0), det(t=T0 + 180)  # the engine re-decided the crossing 3 windows later
    book.apply([first], {}, NOW)
    assert only(book.apply([redecided], {}, NOW + 1)).knowledge_at == T0 + 180
    # another finding on the same case is re-decided 600 times (far more than the old per-case list held)
    for i in range(600):
        book.apply([det(t=T0 + 600 + i, detector="projection", reason="compute_projected")], {}, NOW + 2 + i)
    case = book.get(case_id_for(first))
    assert case.knowledge_at == T0 + 180
    # at-least-once redelivery of the old version, of the latest, and of an early version of the other finding
    assert not book.apply([first], {}, NOW + 1000)
    assert not book.apply([redecided], {}, NOW + 1001)
    assert not book.apply([det(t=T0 + 600 + 540, detector="projection", reason="compute_projected")], {}, NOW + 1002)
    assert book.get(case.case_id).version == case.version and book.get(case.case_id).knowledge_at == T0 + 180
    versions = case.evidence["versions"]  # per id, in arrival order; the other id's newest 64
    assert versions[first.detection_id] == [fingerprint(first), fingerprint(redecided)] and len(versions) == 2
    # ... also in a book loaded from the stored case (a restart)
    assert not CaseBook(BIS, [case]).apply([first, redecided], {}, NOW + 1003)


def test_a_case_stored_before_per_id_versions_still_skips_what_its_case_wide_list_holds():
    book = CaseBook(BIS)
    first = det(t=T0)
    case = only(book.apply([first], {}, NOW))
    legacy = case.model_copy(update={"evidence": {**{k: v for k, v in case.evidence.items() if k != "versions"},
                                                  "applied": [fingerprint(first)]}})
    old = CaseBook(BIS, [legacy])
    assert not old.apply([first], {}, NOW + 1)  # found in the old case-wide list
    later = det(t=T0 + 180)
    assert only(old.apply([later], {}, NOW + 2)).knowledge_at == T0 + 180  # a new version still applies
    assert old.get(case.case_id).evidence["versions"] == {first.detection_id: [fingerprint(later)]}
    assert not old.apply([first], {}, NOW + 3) and not old.apply([later], {}, NOW + 4)


def test_a_redelivered_older_version_of_a_pending_info_detection_never_replaces_the_newer():
    book = CaseBook(BIS)
    info_v1 = det("info", t=T0 - 300, detector="change_in_scope", reason="use_changed", evidence={"v": 1})
    info_v2 = det("info", t=T0 - 240, detector="change_in_scope", reason="use_changed", evidence={"v": 2})
    assert info_v1.detection_id == info_v2.detection_id
    for d in (info_v1, info_v2, info_v1):  # the second v1 is a redelivery while the case is not open yet
        assert not book.apply([d], {}, NOW)
    case = only(book.apply([det(t=T0)], {}, NOW + 1))  # the case opens: the held info attaches, as v2
    assert case.evidence["detections"][info_v1.detection_id]["evidence"] == {"v": 2}
    assert case.evidence["versions"][info_v1.detection_id] == [fingerprint(info_v1), fingerprint(info_v2)]
    assert not book.apply([info_v1], {}, NOW + 2)  # and after it opened


def test_versions_superseded_within_one_batch_were_received_too():
    """Of several versions of an id in one batch only the last applies; the others were received all the same, so a
    later redelivery of one of them (alone) is no new version."""
    book = CaseBook(BIS)
    a, b, c = det(t=T0), det(t=T0 + 180), det(t=T0 + 60)
    case = only(book.apply([a, b], {}, NOW))  # opens at b
    assert case.knowledge_at == T0 + 180
    assert not book.apply([a], {}, NOW + 1)  # the old book applied it: knowledge_at back to T0, a redecided event
    out = book.apply([det(t=T0 + 240), c], {}, NOW + 2)  # a merge: c applies, T0 + 240 was received before it
    assert only(out).knowledge_at == T0 + 60
    assert book.get(case.case_id).evidence["versions"][a.detection_id] == [
        fingerprint(x) for x in (a, b, det(t=T0 + 240), c)]
    assert not book.apply([det(t=T0 + 240)], {}, NOW + 3) and not book.apply([b], {}, NOW + 4)
    info_a = det("info", t=T0, detector="change_in_scope", reason="use_changed", run="run-9", evidence={"v": 1})
    info_b = det("info", t=T0, detector="change_in_scope", reason="use_changed", run="run-9", evidence={"v": 2})
    assert not book.apply([info_a, info_b], {}, NOW + 5)  # held for run-9's case, as info_b
    assert not book.apply([info_a], {}, NOW + 6)
    opened = only(book.apply([det(t=T0 + 60, run="run-9")], {}, NOW + 7))
    assert opened.evidence["detections"][info_a.detection_id]["evidence"] == {"v": 2}


def test_the_case_service_hands_the_book_a_batchs_superseded_versions_too(store) -> None:
    """On chDB, through CaseService (which counts a batch once per id): the version superseded within the batch is
    kept as received, with and without a suppression standing, also after a restart."""
    from pipeline.cases.service import CaseService
    from tests.test_suppressions import _add

    store.upsert_cip([cip()])
    a, b = det(t=T0), det(t=T0 + 180)
    svc = CaseService(store, BIS)
    (msg,) = svc.process([a, b], NOW)
    assert msg.case.knowledge_at == T0 + 180
    assert svc.process([a], NOW + 1) == [] and CaseService(store, BIS).process([a], NOW + 2) == []
    _add(store, subject="acct-other")  # a suppression that holds none of these: the split runs, passes both
    other_run_a, other_run_b = det(t=T0, run="run-2"), det(t=T0 + 120, run="run-2")
    (msg,) = CaseService(store, BIS).process([other_run_a, other_run_b], NOW + 3)
    assert msg.case.knowledge_at == T0 + 120
    assert CaseService(store, BIS).process([other_run_a], NOW + 4) == []
    assert {c.run_id: c.version for c in store.list_cases()} == {"run-1": 1, "run-2": 1}


def test_the_bound_a_return_to_an_earlier_versions_exact_content_reads_as_a_redelivery():
    """Versions carry no order but arrival: the engine re-deciding A -> B -> A sends A again, byte for byte what a
    redelivery of A would be. The case keeps B (no event, no version) until the id's next version; this pins the
    documented bound (pipeline/cases/core.py, Idempotence) so a change to it is deliberate."""
    book = CaseBook(BIS)
    a, b, c = det(t=T0), det(t=T0 + 180), det(t=T0 + 120)
    book.apply([a], {}, NOW)
    book.apply([b], {}, NOW + 1)
    assert not book.apply([a], {}, NOW + 2)
    case = book.get(case_id_for(a))
    assert case.knowledge_at == T0 + 180 and case.version == 2
    out = book.apply([c], {}, NOW + 3)  # the next version applies as usual
    assert only(out).knowledge_at == T0 + 120 and out.events[0].action == "redecided"


def test_the_case_reason_is_the_finding_that_dates_it_in_any_arrival_order() -> None:
    """A run's used crossing can reach the case book before the projected crossing that dates the run earlier (on
    Kafka, the projection re-decided on a correction after the used crossing was sent): the case ends the same."""
    used, projected = det(t=T0 + 68.6, reason="compute_used"), det(t=T0, reason="compute_projected")
    ends = []
    for order in ([projected, used], [used, projected]):
        book = CaseBook(BIS)
        for d in order:
            book.apply([d], {}, NOW)
        (case,) = book.cases
        ends.append((case.case_id, case.reason, case.knowledge_at, case.due_at))
    assert ends[0] == ends[1] and ends[0][1:3] == ("compute_projected", T0)
    later = CaseBook(BIS)
    later.apply([used], {}, NOW)
    out = later.apply([projected], {}, NOW)
    assert out.events[-1].details["reason"] == {"from": "compute_used", "to": "compute_projected"}
    tie = CaseBook(BIS)  # a finding at the same time as the one that dates the case changes nothing
    tie.apply([used], {}, NOW)
    tie.apply([det(t=T0 + 68.6, reason="compute_projected")], {}, NOW)
    assert tie.cases[0].reason == "compute_used"
