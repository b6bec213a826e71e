"""CLI case actions reach the compliance feed (issue 16): with cases_feed = kafka, `cases ack` (and every action,
`suppress end`) publishes the case's changes the feed lacks in the worker's format, once; otherwise it says where
the change is. Real broker, real chDB."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest
import typer
from confluent_kafka import Consumer
from typer.testing import CliRunner

from pipeline.cases.core import IllegalTransition, case_id_for
from pipeline.cases.feed import CaseFeedMessage, CaseFeedProducer, feed_messages
from pipeline.cases.service import CaseService
from pipeline.commands import cases_cmd, suppress_cmd
from pipeline.settings import KafkaSettings
from pipeline.store import Store
from schemas import serde
from schemas.serde import loads
from tests.test_cases_core import BIS, DAY, NOW, T0, cip, det


@pytest.fixture
def where(store: Store, store_path: Path) -> list[str]:
    return ["--store", f"chdb://{store_path}", "--database", store.database]


@pytest.fixture
def cli_app() -> typer.Typer:
    app = typer.Typer()
    cases_cmd.register(app)
    suppress_cmd.register(app)
    return app


def _feed(bootstrap: str, topic: str, expect: int, settle_s: float = 2.0) -> list[tuple[bytes, CaseFeedMessage]]:
    """Everything on `topic`: read until `expect` messages came, then `settle_s` more to see any extra."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"feed-cli-{uuid.uuid4().hex}",
                  "auto.offset.reset": "earliest", "enable.auto.commit": False})
    got: list[tuple[bytes, CaseFeedMessage]] = []
    try:
        c.subscribe([topic])
        deadline, settled = time.monotonic() + 30.0, None
        while time.monotonic() < deadline and (settled is None or time.monotonic() < settled):
            m = c.poll(0.25)
            if m is not None and m.error() is None:
                got.append((m.key(), serde.decode(CaseFeedMessage, m.value())))
            if settled is None and len(got) >= expect:
                settled = time.monotonic() + settle_s
    finally:
        c.close()
    return got


def opened_on_the_feed(store: Store, bootstrap: str, topic: str, monkeypatch: pytest.MonkeyPatch
                       ) -> list[CaseFeedMessage]:
    """Settings for a Kafka feed on `topic`, and one case opened as the worker does it: stored, then published."""
    monkeypatch.setenv("TRAINWATCH_CASES_FEED", "kafka")
    monkeypatch.setenv("TRAINWATCH_KAFKA__BOOTSTRAP_SERVERS", bootstrap)
    monkeypatch.setenv("TRAINWATCH_TOPICS__CASES", topic)
    store.upsert_cip([cip()])
    opened = CaseService(store, BIS).process([det()], NOW)
    producer = CaseFeedProducer(KafkaSettings(bootstrap_servers=bootstrap), topic)
    producer.publish(opened)
    producer.close()
    return opened


def test_without_a_kafka_feed_an_action_says_where_the_change_went(store: Store, cli_app: typer.Typer,
                                                                   where: list[str], monkeypatch) -> None:
    monkeypatch.setenv("TRAINWATCH_CASES_FEED", "off")
    store.upsert_cip([cip()])
    case = CaseService(store, BIS).process([det()], NOW)[0].case
    r = CliRunner().invoke(cli_app, ["cases", "ack", case.case_id, "--actor", "alice", "--at", str(NOW + 10), *where])
    assert r.exit_code == 0, r.output
    assert "feed: not published (cases_feed = off)" in r.output and store.database in r.output
    assert "TRAINWATCH_CASES_FEED=kafka" in r.output
    assert store.get_case(case.case_id).status == "acknowledged"


@pytest.mark.kafka
def test_an_ack_reaches_the_feed_once_even_when_run_twice(store: Store, cli_app: typer.Typer, where: list[str],
                                                          kafka_bootstrap: str, unique_topic, monkeypatch) -> None:
    topic = unique_topic("compliance-cases-cli")
    opened = opened_on_the_feed(store, kafka_bootstrap, topic, monkeypatch)
    cid = opened[0].case.case_id
    run = CliRunner().invoke

    r = run(cli_app, ["cases", "ack", cid, "--actor", "alice", "--at", str(NOW + 10), "--json", *where])
    assert r.exit_code == 0, r.output
    out = loads(r.stdout)
    (ack_event,) = out["events"]
    assert out["feed"]["published"] == 1 and out["feed"]["message_ids"] == [ack_event["event_id"]]
    assert out["feed"]["topic"] == topic
    again = run(cli_app, ["cases", "ack", cid, "--actor", "alice", "--at", str(NOW + 20), *where])
    assert isinstance(again.exception, IllegalTransition)  # acknowledged already: nothing new to send
    catch_up = run(cli_app, ["cases", "publish", cid, *where])
    assert catch_up.exit_code == 0 and "0 message(s) published" in catch_up.output  # already on the feed

    got = _feed(kafka_bootstrap, topic, expect=2)
    assert [m.message_id for _, m in got] == [opened[0].message_id, ack_event["event_id"]]  # each once, in order
    key, ack = got[1]
    assert key == b"acct-1" and ack.change.action == "acknowledged" and ack.case.status == "acknowledged"
    assert ack.case.identity == {} and ack.identity and ack.report["draft"]  # the worker's format: PII beside
    # the message the worker's feed audit would send for this event (pipeline/detect/feed_audit.py)
    (audit,) = feed_messages([store.get_case(cid)], [e for e in store.case_events(cid) if e.action == "acknowledged"],
                             BIS)
    assert ack.model_dump(mode="json") == audit.model_dump(mode="json")


@pytest.mark.kafka
def test_suppress_end_sends_the_cases_it_opens_and_an_action_sends_what_the_worker_never_did(
        store: Store, cli_app: typer.Typer, where: list[str], kafka_bootstrap: str, unique_topic, monkeypatch) -> None:
    topic = unique_topic("compliance-cases-cli")
    monkeypatch.setenv("TRAINWATCH_CASES_FEED", "kafka")
    monkeypatch.setenv("TRAINWATCH_KAFKA__BOOTSTRAP_SERVERS", kafka_bootstrap)
    monkeypatch.setenv("TRAINWATCH_TOPICS__CASES", topic)
    run = CliRunner().invoke
    r = run(cli_app, ["suppress", "add", "--account", "acct-1", "--reason", "load test", "--from", str(T0 - DAY),
                      "--days", "30", "--actor", "bob", "--policy", "bis-2024-proposed", *where])
    assert r.exit_code == 0, r.output
    sid = r.output.strip()
    store.upsert_cip([cip()])
    assert CaseService(store, BIS).process([det(t=T0)], NOW) == []  # held: no case, nothing for the feed
    # a second case the worker stored but never published (a crash between the store write and the send)
    other = CaseService(store, BIS).process([det(account="acct-2", run="r-2")], NOW)[0]

    r = run(cli_app, ["suppress", "end", sid, "--reason", "contract over", "--at", str(T0 + DAY), "--actor", "c",
                      *where])
    assert r.exit_code == 0, r.output
    assert "1 case change(s)" in r.output and f"feed: 1 message(s) published to {topic}" in r.output
    r = run(cli_app, ["cases", "dismiss", other.case.case_id, "--reason", "US subsidiary", "--actor", "c",
                      "--at", str(NOW + 10), *where])
    assert r.exit_code == 0 and "feed: 2 message(s) published" in r.output, r.output  # opened first, then this

    got = [m for _, m in _feed(kafka_bootstrap, topic, expect=3)]
    released = case_id_for(det(t=T0))
    assert [(m.case.case_id, m.change.action) for m in got] == [
        (released, "opened"), (other.case.case_id, "opened"), (other.case.case_id, "dismissed")]
    assert got[0].case.knowledge_at == T0 + DAY and sid in str(got[0].change.details)
    assert len({m.message_id for m in got}) == 3
