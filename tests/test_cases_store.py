"""The case service on a real (embedded chDB) store, and the `trainwatch cases` / `report` CLI against it."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import pytest
import typer
from confluent_kafka import Consumer
from typer.testing import CliRunner

from pipeline.cases.core import IllegalTransition
from pipeline.cases.deadline import OVERDUE, REMINDER
from pipeline.cases.feed import CaseFeedMessage, CaseFeedProducer
from pipeline.cases.service import CaseService
from pipeline.commands import cases_cmd
from pipeline.detect.feed_audit import unpublished
from pipeline.settings import KafkaSettings, Settings
from pipeline.store import Store
from schemas import serde
from tests.test_cases_core import BIS, DAY, NOW, T0, cip, det


@pytest.fixture
def where(store: Store, store_path: Path) -> list[str]:
    """CLI options naming the fixture's database on the process's one chDB engine path."""
    return ["--store", f"chdb://{store_path}", "--database", store.database]


@pytest.fixture
def cli_app() -> typer.Typer:
    app = typer.Typer()
    cases_cmd.register(app)
    return app


def test_apply_and_replay_keep_one_case_and_no_duplicate_events(store: Store):
    store.upsert_cip([cip()])
    batch = [det(t=T0), det(t=T0 + 60, detector="projection", reason="compute_projected")]
    svc = CaseService(store, BIS)
    msgs = svc.process(batch, NOW)
    assert len(msgs) == 2 and {m.key for m in msgs} == {b"acct-1"}
    case = store.get_case(msgs[0].case.case_id)
    assert case.status == "open" and case.version == 1 and case.knowledge_at == T0
    assert case.identity["name"] == "Example Labs Ltd"  # CIP read from the store
    assert msgs[-1].report["draft"] is True

    assert svc.process(batch, NOW + 60) == []  # replay in the same process
    restarted = CaseService(store, BIS)  # restart: loads the store's cases
    assert restarted.process(batch, NOW + 120) == []
    assert len(store.list_cases()) == 1 and store.get_case(case.case_id).version == 1
    assert [e.action for e in store.case_events(case.case_id)] == ["opened", "evidence_added"]

    # an analyst change made elsewhere is not overwritten by the runner's next evidence
    other = CaseService(store, BIS, preload=False)
    other.ack(case.case_id, "alice", NOW + 200)
    svc.process([det(t=T0, evidence={"flop_used": 9e26})], NOW + 300)
    latest = store.get_case(case.case_id)
    assert latest.status == "acknowledged" and latest.version == 3


def test_a_crash_between_the_event_and_the_case_write_loses_no_event(store: Store, monkeypatch):
    """A change is two inserts (its events, its case). Killed after the first, the replayed detection (its offset
    was not committed) must leave the case and every event stored, once."""
    store.upsert_cip([cip()])
    batch = [det(t=T0)]
    svc = CaseService(store, BIS)
    writes: list[str] = []

    def first_write_only(name: str):
        real = getattr(store, name)

        def write(items):
            if writes:
                raise RuntimeError("killed between the two inserts")
            writes.append(name)
            return real(items)
        return write

    for name in ("upsert_cases", "append_case_events"):
        monkeypatch.setattr(store, name, first_write_only(name))
    with pytest.raises(RuntimeError):
        svc.process(batch, NOW)
    monkeypatch.undo()
    assert len(writes) == 1

    CaseService(store, BIS).process(batch, NOW + 5)  # restart, replay
    (case,) = store.list_cases()
    assert [e.action for e in store.case_events(case.case_id)] == ["opened"] and case.version == 1
    assert len(store.query("SELECT event_id FROM case_events")) == 1  # stored once, not only collapsed on read


def test_the_feed_audit_leaves_an_event_its_stored_case_does_not_hold_to_the_re_read_input(store: Store, monkeypatch):
    """Killed between a finding's event and its case version on a case already stored: the worker's feed audit must
    not publish that event with the case as it was, since the re-read input derives it again with the case that holds
    it, under the same message id (a duplicate on the feed in the quick chaos run, Dec 5)."""
    store.upsert_cip([cip()])
    svc = CaseService(store, BIS)
    published = {m.message_id for m in svc.process([det(t=T0)], NOW)}
    second = [det(t=T0 + 60, detector="projection", reason="compute_projected")]

    def killed(items):
        raise RuntimeError("killed between the two inserts")

    monkeypatch.setattr(store, "upsert_cases", killed)
    with pytest.raises(RuntimeError):
        svc.process(second, NOW + 10)
    monkeypatch.undo()
    (case,) = store.list_cases()
    orphan = [e for e in store.case_events(case.case_id) if e.event_id not in published]
    assert len(orphan) == 1 and case.version == 1  # the event stored, its case version not
    assert unpublished(Settings(), store, BIS, have=published) == []

    again = CaseService(store, BIS).process(second, NOW + 20)  # restart: the input read again
    assert [m.message_id for m in again] == [orphan[0].event_id] and again[0].case.version == 2
    # had the kill come after the case write, before the publish: the audit sends it, with the case holding it
    (gap,) = unpublished(Settings(), store, BIS, have=published)
    assert gap.message_id == orphan[0].event_id and gap.case.version == 2
    assert unpublished(Settings(), store, BIS, have=published | {gap.message_id}) == []


def test_deadline_events_are_stored_once_across_restarts(store: Store):
    svc = CaseService(store, BIS)
    case = svc.process([det()], NOW)[0].case
    first = svc.tick(case.due_at - 3 * DAY, recorded_at=NOW + 1)
    assert [(m.change.action, m.change.details.get("lead_days")) for m in first] == [(REMINDER, 7.0), (REMINDER, 3.0)]
    assert svc.tick(case.due_at - 3 * DAY, recorded_at=NOW + 2) == []
    again = CaseService(store, BIS)  # restart: knows what was emitted
    assert [m.change.action for m in again.tick(case.due_at, recorded_at=NOW + 3)] == [REMINDER, OVERDUE]
    actions = [e.action for e in store.case_events(case.case_id)]
    assert actions.count(REMINDER) == 3 and actions.count(OVERDUE) == 1


def test_cli_list_show_ack_report_dismiss(store: Store, cli_app: typer.Typer, where: list[str]):
    svc = CaseService(store, BIS)
    store.upsert_cip([cip(), cip("acct-2")])
    a = svc.process([det()], NOW)[0].case.case_id
    b = svc.process([det(account="acct-2", t=T0 + DAY)], NOW)[0].case.case_id
    runner = CliRunner()

    res = runner.invoke(cli_app, ["cases", "list", "--json", *where])
    assert res.exit_code == 0, res.output
    listed = json.loads(res.output)
    assert [c["case_id"] for c in listed] == [a, b]  # soonest due first
    assert all("identity" not in c for c in listed)

    res = runner.invoke(cli_app, ["cases", "ack", a, "--actor", "alice", "--at", str(NOW + 10), "--json", *where])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["case"]["status"] == "acknowledged"
    assert [(e["actor"], e["from_status"], e["to_status"]) for e in out["events"]] == [
        ("alice", "open", "acknowledged")]

    res = runner.invoke(cli_app, ["cases", "report", a, "--reference", "BIS-1", "--actor", "bob", "--json", *where])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["case"]["filing_reference"] == "BIS-1"

    res = runner.invoke(cli_app, ["cases", "dismiss", b, "--reason", "US subsidiary", "--actor", "c", "--json", *where])
    assert res.exit_code == 0, res.output
    assert store.get_case(b).status == "dismissed"

    res = runner.invoke(cli_app, ["cases", "show", a, "--json", *where])
    shown = json.loads(res.output)
    assert [e["action"] for e in shown["events"]] == ["opened", "acknowledged", "reported"]
    assert shown["case"]["identity"]["emails"] == ["ops@example.sg"]

    res = runner.invoke(cli_app, ["cases", "list", "--status", "reported", "--json", *where])
    assert [c["case_id"] for c in json.loads(res.output)] == [a]

    # an illegal action fails with the reason and changes nothing
    res = runner.invoke(cli_app, ["cases", "ack", a, "--actor", "alice", *where])
    assert res.exit_code != 0 and isinstance(res.exception, IllegalTransition)
    assert store.get_case(a).status == "reported"


def test_cli_report_markdown_and_json(store: Store, cli_app: typer.Typer, where: list[str]):
    store.upsert_cip([cip()])
    case = CaseService(store, BIS).process([det()], NOW)[0].case
    runner = CliRunner()
    res = runner.invoke(cli_app, ["report", case.case_id, "--json", *where])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.output)
    assert rep["draft"] and rep["foreign_person"]["name"] == "Example Labs Ltd"
    assert rep["dates"]["due_at"] == case.due_at
    res = runner.invoke(cli_app, ["report", case.case_id, "--markdown", *where])
    assert res.exit_code == 0 and res.output.startswith("> **DRAFT") and "Example Labs Ltd" in res.output


@pytest.mark.kafka
def test_feed_messages_reach_kafka_keyed_by_account(store: Store, kafka_bootstrap: str, unique_topic):
    topic = unique_topic("compliance-cases", partitions=2)
    msgs = CaseService(store, BIS).process([det(), det(account="acct-2", run="r-2")], NOW)
    producer = CaseFeedProducer(KafkaSettings(bootstrap_servers=kafka_bootstrap), topic)
    assert producer.publish(msgs) == 2
    producer.close()
    consumer = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": f"feed-{uuid.uuid4().hex}",
                         "auto.offset.reset": "earliest", "enable.auto.commit": False})
    got: list[CaseFeedMessage] = []
    try:
        consumer.subscribe([topic])
        deadline = time.monotonic() + 30.0
        while len(got) < 2 and time.monotonic() < deadline:
            m = consumer.poll(0.5)
            if m is None:
                continue
            assert m.error() is None, m.error()
            got.append(serde.decode(CaseFeedMessage, m.value()))
            assert m.key() == got[-1].case.account_id.encode()
    finally:
        consumer.close()
    assert sorted(g.message_id for g in got) == sorted(m.message_id for m in msgs)
    assert all(g.report["banner"].startswith("DRAFT") and g.change.action == "opened" for g in got)


def test_action_times_must_be_finite_and_within_the_case_life(store: Store):
    from pipeline.cases.actions import CaseActionError, CaseActions

    store.upsert_cip([cip()])
    case = CaseService(store, BIS).process([det()], NOW)[0].case
    opened = store.case_events(case.case_id)[0].at
    actions = CaseActions(store, "bis-2024-proposed", clock=lambda: NOW + 100)
    for bad, why in [(float("nan"), "finite"), (float("inf"), "finite"), (float("-inf"), "finite"),
                     (0.0, "before case"), (opened - 1, "before case"), (NOW + 100 + 3600, "in the future")]:
        with pytest.raises(CaseActionError, match=why):
            actions.ack(case.case_id, "alice", bad)
    assert store.get_case(case.case_id).status == "open" and len(store.case_events(case.case_id)) == 1
    with pytest.raises(CaseActionError, match="actor"):
        actions.ack(case.case_id, "  ", NOW)
    with pytest.raises(CaseActionError, match="--reason"):
        actions.dismiss(case.case_id, "alice", NOW, " ")

    actions.ack(case.case_id, "alice", NOW + 50)
    with pytest.raises(CaseActionError, match="latest status change"):  # the trail stays in order
        actions.report(case.case_id, "bob", NOW + 40, "BIS-1")
    assert actions.report(case.case_id, "bob", None, "BIS-1")[-1].change.at == NOW + 100  # default: the clock
    with pytest.raises(CaseActionError, match="not a case status"):
        actions.list(["open", "bogus"])
    assert [c.case_id for c in actions.list(["reported"])] == [case.case_id]


def test_cli_rejects_nan_and_bogus_status_and_show_survives_a_stored_nan(store: Store, cli_app: typer.Typer,
                                                                          where: list[str]):
    from pipeline.cases.actions import CaseActionError

    store.upsert_cip([cip()])
    case = CaseService(store, BIS).process([det()], NOW)[0].case
    runner = CliRunner()
    res = runner.invoke(cli_app, ["cases", "ack", case.case_id, "--at", "nan", *where])
    assert res.exit_code != 0 and isinstance(res.exception, CaseActionError)
    res = runner.invoke(cli_app, ["cases", "list", "--status", "bogus", *where])
    assert isinstance(res.exception, CaseActionError) and "bogus" in str(res.exception)
    # A NaN written before this check existed must not stop `cases show`.
    bad = store.case_events(case.case_id)[0].model_copy(update={"event_id": "cev-nan", "at": float("nan")})
    store.append_case_events([bad])
    res = runner.invoke(cli_app, ["cases", "show", case.case_id, *where])
    assert res.exit_code == 0 and "invalid time (nan)" in res.output


def test_a_redecided_detection_moves_the_stored_case_later_with_one_event_and_one_feed_message(store: Store):
    """The engine re-emits a detection it re-decided (same id, crossing 3 windows later): the stored case's
    knowledge_at and due_at move later, one `redecided` event, one feed message saying so; a redelivery of either
    version, in this process or after a restart, writes and sends nothing."""
    store.upsert_cip([cip()])
    first, later = det(t=T0), det(t=T0 + 180)
    svc = CaseService(store, BIS)
    for batch, now in (([first], NOW), ([later], NOW + 60)):
        store.insert_detections(batch)  # as the runner does: stored, then applied
        msgs = svc.process(batch, now)
    (msg,) = msgs
    case = store.get_case(msg.case.case_id)
    assert (case.knowledge_at, case.due_at, case.version) == (T0 + 180, T0 + 180 + 15 * DAY, 2)
    assert msg.change.action == "redecided" and msg.case.knowledge_at == T0 + 180
    assert msg.change.details["knowledge_at"] == {"from": T0, "to": T0 + 180}
    assert msg.change.details["due_at"] == {"from": T0 + 15 * DAY, "to": T0 + 180 + 15 * DAY}
    assert msg.report["dates"]["due_at"] == T0 + 180 + 15 * DAY and len(msg.report["evidence"]) == 1
    assert [e.action for e in store.case_events(case.case_id)] == ["opened", "redecided"]
    # the evidence, the detections table and so the console's evidence list hold the latest version only
    assert [e["event_time"] for e in case.evidence["detections"].values()] == [T0 + 180]
    assert store.list_detections() == [later]

    assert svc.process([later], NOW + 120) == []
    assert svc.process([first], NOW + 180) == []
    restarted = CaseService(store, BIS)
    assert restarted.process([first, later], NOW + 240) == []
    assert store.get_case(case.case_id).version == 2 and len(store.case_events(case.case_id)) == 2


def test_a_held_finding_redecided_before_the_release_is_released_at_its_latest_version(store: Store):
    """A suppression holds a finding, the engine re-decides it (same id, earlier crossing) while held: the end
    releases the latest version only, even after a redelivery of the older one."""
    from pipeline.cases import suppressions as sup_ops
    from tests.test_suppressions import _add

    store.upsert_cip([cip()])
    sid = _add(store, policy=BIS)
    first, redecided = det(t=T0 + 600), det(t=T0 + 300)
    svc = CaseService(store, BIS)
    assert svc.process([first], NOW) == [] and svc.process([redecided], NOW + 10) == []
    assert svc.process([first], NOW + 20) == []  # redelivery of the older version: held again, stays superseded
    states = {h["event_time"]: h["state"] for h in store.suppression_hits(sid)}
    assert states == {T0 + 600: sup_ops.SUPERSEDED, T0 + 300: sup_ops.HELD}
    # the suppression ends: one case opens, from the re-decided version alone
    svc.tick(T0 + DAY + 60, NOW + 30)
    (case,) = store.list_cases()
    (entry,) = case.evidence["detections"].values()
    assert entry["evidence"]["suppression"]["held_event_time"] == T0 + 300
    assert [e.action for e in store.case_events(case.case_id)] == ["opened"]
