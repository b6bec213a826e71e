"""Console actions reach the compliance feed as CLI actions do: with cases_feed = kafka an acknowledge or dismiss taken
in the console publishes the case's changes the feed lacks, once each, in the worker's format; otherwise the answer
says where the change is. Real broker, real chDB, the FastAPI app in-process (the browser flow is in
test_console_e2e)."""

from __future__ import annotations

import base64

import pytest
from argon2 import PasswordHasher
from fastapi.testclient import TestClient

from pipeline.cases.actions import feed_publisher
from pipeline.cases.feed import feed_messages
from pipeline.cases.service import CaseService
from pipeline.settings import load_settings
from pipeline.store import Store
from pipeline.web.app import create_app
from pipeline.web.config import ConsoleSettings, ConsoleUser
from pipeline.web.views import Console
from tests.test_cases_core import BIS, NOW, cip, det
from tests.test_feed_cli import _feed, opened_on_the_feed

_HASHER = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
CLEO = {"Authorization": "Basic " + base64.b64encode(b"cleo:cleo-pass-1").decode()}


def _client(store: Store) -> TestClient:
    users = {"cleo": ConsoleUser(role="compliance", password_hash=_HASHER.hash("cleo-pass-1"))}
    console = Console(store, "bis-2024-proposed", clock=lambda: NOW + 60, feed=feed_publisher(load_settings(), store))
    return TestClient(create_app(console, ConsoleSettings(users=users, secret_key="test-secret-key")))


def test_without_a_kafka_feed_the_answer_says_where_the_change_went(store: Store, monkeypatch) -> None:
    monkeypatch.setenv("TRAINWATCH_CASES_FEED", "off")
    store.upsert_cip([cip()])
    case = CaseService(store, BIS).process([det()], NOW)[0].case
    r = _client(store).post(f"/api/cases/{case.case_id}/actions/acknowledge", json={"reason": "taking it"},
                            headers=CLEO)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["status"] == "acknowledged" and out["feed"]["published"] == 0
    assert "not published (cases_feed = off)" in out["feed"]["note"] and store.database in out["feed"]["note"]


@pytest.mark.kafka
def test_console_actions_reach_the_feed_once_each(store: Store, kafka_bootstrap: str, unique_topic,
                                                  monkeypatch) -> None:
    topic = unique_topic("compliance-cases-console")
    opened = opened_on_the_feed(store, kafka_bootstrap, topic, monkeypatch)
    cid = opened[0].case.case_id
    client = _client(store)

    ack = client.post(f"/api/cases/{cid}/actions/acknowledge", json={"reason": "taking it"}, headers=CLEO).json()
    (ack_event,) = ack["events"]
    assert ack["feed"]["published"] == 1 and ack["feed"]["message_ids"] == [ack_event["event_id"]]
    assert ack["feed"]["topic"] == topic and ack_event["details"]["note"] == "taking it"  # in the audit trail
    refused = client.post(f"/api/cases/{cid}/actions/acknowledge", json={"reason": "again"}, headers=CLEO)
    assert refused.status_code == 409  # acknowledged already: nothing new written, nothing sent
    gone = client.post(f"/api/cases/{cid}/actions/dismiss", json={"reason": "U.S. subsidiary"}, headers=CLEO).json()
    (dismiss_event,) = gone["events"]
    assert gone["feed"]["message_ids"] == [dismiss_event["event_id"]]

    got = [m for _, m in _feed(kafka_bootstrap, topic, expect=3)]
    assert [m.message_id for m in got] == [opened[0].message_id, ack_event["event_id"], dismiss_event["event_id"]]
    assert [m.case.status for m in got] == ["open", "acknowledged", "dismissed"]
    # the message the worker's feed audit would send for the console's event (pipeline/detect/feed_audit.py)
    (audit,) = feed_messages([store.get_case(cid)], [e for e in store.case_events(cid) if e.action == "dismissed"],
                             BIS)
    assert got[2].model_dump(mode="json") == audit.model_dump(mode="json")
