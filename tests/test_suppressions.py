"""Suppressions (issue 16) on a real chDB store: held findings open no case, the end releases what still holds with
knowledge per the policy, special measures and open reportable cases are never hidden, replays change nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from pipeline.cases import suppressions as sup_ops
from pipeline.cases.core import case_id_for
from pipeline.cases.service import CaseService
from pipeline.commands import suppress_cmd
from pipeline.store import Store
from schemas.policy import Suppressions
from tests.test_cases_core import BIS, DAY, NOW, T0, cip, det


def _add(store: Store, policy=BIS, **kw) -> str:
    args = {"scope": "account", "subject": "acct-1", "reason": "vendor benchmark, contract 42", "created_by": "alice",
            "created_at": NOW, "starts_at": T0 - DAY, "expires_at": T0 + DAY, **kw}
    sup = sup_ops.new_suppression(policy, **args)
    store.upsert_suppressions([sup])
    return sup.suppression_id


def test_held_finding_opens_nothing_until_the_end_then_opens_with_knowledge_at_the_end(store: Store):
    store.upsert_cip([cip()])
    sid = _add(store)
    svc = CaseService(store, BIS)
    finding = det(t=T0)
    assert svc.process([finding], NOW) == []
    assert store.list_cases() == []
    hits = store.suppression_hits(sid)
    assert [(h["detection_id"], h["state"]) for h in hits] == [(finding.detection_id, sup_ops.HELD)]
    assert svc.process([finding], NOW + 1) == [] and len(store.suppression_hits(sid)) == 1  # replay: same hit

    assert svc.tick(T0 + DAY - 1, NOW + 2) == []  # not over yet in event time
    msgs = svc.tick(T0 + DAY + 60, NOW + 3)
    case = store.get_case(case_id_for(finding))
    assert case is not None and case.status == "open"
    assert case.knowledge_at == T0 + DAY  # the documented determination stood until its end
    assert case.due_at == T0 + DAY + 15 * DAY
    entry = case.evidence["detections"][finding.detection_id]
    assert entry["evidence"]["suppression"] == {"suppression_id": sid, "held_event_time": T0, "released_at": T0 + DAY,
                                                "reason": "vendor benchmark, contract 42", "knowledge_from": "end"}
    opened = [e for e in store.case_events(case.case_id) if e.action == "opened"]
    assert opened[0].details["suppression_id"] == sid and opened[0].details["held_event_time"] == T0
    assert any(m.change.action == "opened" for m in msgs)  # on the feed
    assert [e.action for e in store.suppression_events(sid)] == ["held", "expired", "released"]
    assert store.suppression_hits(sid)[0]["state"] == sup_ops.RELEASED

    # replays after the release change nothing: the finding is held again by the same suppression
    assert svc.process([finding], NOW + 4) == [] and svc.tick(T0 + DAY + 120, NOW + 5) == []
    restarted = CaseService(store, BIS)
    assert restarted.process([finding], NOW + 6) == [] and restarted.tick(T0 + DAY + 180, NOW + 7) == []
    assert store.get_case(case.case_id).version == case.version
    assert len(store.list_cases()) == 1


def test_policy_may_count_knowledge_from_the_finding_itself(store: Store):
    strict = BIS.model_copy(update={"suppressions": Suppressions(knowledge_at="detection")})
    store.upsert_cip([cip()])
    _add(store, strict)
    svc = CaseService(store, strict)
    svc.process([det(t=T0)], NOW)
    svc.tick(T0 + 2 * DAY, NOW + 1)
    assert store.get_case(case_id_for(det(t=T0))).knowledge_at == T0


def test_never_hides_special_measures_or_an_open_reportable_case(store: Store):
    store.upsert_cip([cip()])
    svc = CaseService(store, BIS)
    opened = det(t=T0 - 2 * DAY)  # the case opens before the suppression
    svc.process([opened], NOW)
    _add(store)
    sm = det(t=T0, run=None, reason="special_measures", detector="special_measures")
    later = det(t=T0, detector="projection", reason="compute_projected")  # new evidence on the open case
    svc.process([sm, later], NOW + 1)
    assert store.get_case(case_id_for(sm)).status == "open"
    case = store.get_case(case_id_for(opened))
    assert later.detection_id in case.evidence["detections"]
    # under special measures nothing of the account is held, even a new run's finding
    other_run = det(t=T0 + 60, run="run-2")
    svc.process([other_run], NOW + 2)
    assert store.get_case(case_id_for(other_run)).status == "open"
    assert all(store.suppression_hits(s.suppression_id) == [] for s in store.list_suppressions())
    with pytest.raises(sup_ops.SuppressionError, match="special-measures"):
        sup_ops.new_suppression(BIS, scope="account", subject="acct-1", reason="x", created_by="a", created_at=NOW,
                                starts_at=T0, expires_at=T0 + DAY, detector_id="special_measures")


def test_owner_scope_matches_through_the_cip_record_and_detector_scope_narrows(store: Store):
    store.upsert_cip([cip("acct-1"), cip("acct-2")])  # both accounts owned by own-1
    sid = _add(store, scope="owner", subject="own-1", detector_id="compute_threshold")
    svc = CaseService(store, BIS)
    held = det(t=T0, account="acct-2")
    passed = det(t=T0, account="acct-1", detector="projection", reason="compute_projected")
    svc.process([held, passed], NOW)
    assert [h["detection_id"] for h in store.suppression_hits(sid)] == [held.detection_id]
    assert store.get_case(case_id_for(held)) is None
    assert store.get_case(case_id_for(passed)).status == "open"


def test_bad_suppressions_are_one_line_errors():
    base = {"scope": "account", "subject": "a", "reason": "r", "created_by": "u", "created_at": NOW,
            "starts_at": T0}
    with pytest.raises(sup_ops.SuppressionError, match="at most 90 days"):
        sup_ops.new_suppression(BIS, **base, expires_at=T0 + 91 * DAY)
    with pytest.raises(sup_ops.SuppressionError, match="expire after it starts"):
        sup_ops.new_suppression(BIS, **base, expires_at=T0)
    with pytest.raises(sup_ops.SuppressionError, match="reason"):
        sup_ops.new_suppression(BIS, **{**base, "reason": " "}, expires_at=T0 + DAY)
    with pytest.raises(sup_ops.SuppressionError, match="scope"):
        sup_ops.new_suppression(BIS, **{**base, "scope": "tenant"}, expires_at=T0 + DAY)


def test_cli_add_list_end_releases_at_once_and_audits(store: Store, store_path: Path):
    app = typer.Typer()
    suppress_cmd.register(app)
    app.command("noop")(lambda: None)  # a group with one command would become the app itself
    where = ["--store", f"chdb://{store_path}", "--database", store.database]
    run = CliRunner().invoke
    r = run(app, ["suppress", "add", "--account", "acct-1", "--reason", "load test", "--from", str(T0 - DAY),
                  "--days", "30", "--actor", "bob", "--policy", "bis-2024-proposed", *where])
    assert r.exit_code == 0, r.output
    sid = r.output.strip()
    again = run(app, ["suppress", "add", "--account", "acct-1", "--reason", "load test", "--from", str(T0 - DAY),
                      "--days", "30", "--actor", "bob", *where])
    assert again.output.strip() == sid and len(store.list_suppressions()) == 1  # same suppression, once
    bad = run(app, ["suppress", "add", "--account", "a", "--run", "r", "--reason", "x", "--days", "1", *where])
    assert bad.exit_code != 0 and "exactly one scope" in str(bad.exception)

    store.upsert_cip([cip()])
    CaseService(store, BIS).process([det(t=T0)], NOW)
    listed = run(app, ["suppress", "list", *where])
    assert sid in listed.output and "held 1" in listed.output

    r = run(app, ["suppress", "end", sid, "--reason", "contract over", "--at", "2026-03-03T10:00:00Z",
                  "--actor", "carol", *where])
    assert r.exit_code == 0, r.output
    case = store.get_case(case_id_for(det(t=T0)))
    assert case.status == "open" and case.knowledge_at == T0 + DAY  # 2026-03-03T10:00Z = T0 + 1 day
    ended = store.get_suppression(sid)
    assert ended.ended_by == "carol" and ended.end_reason == "contract over" and ended.version == 2
    assert [e.action for e in store.suppression_events(sid)] == ["added", "held", "ended", "released"]
    shown = run(app, ["suppress", "show", sid, *where])
    assert shown.exit_code == 0 and "released" in shown.output and "carol" in shown.output
    assert case.case_id in shown.output  # the audit names the case the release opened
    twice = run(app, ["suppress", "end", sid, "--reason", "again", *where])
    assert twice.exit_code != 0 and "already over" in str(twice.exception)


@pytest.mark.kafka
def test_suppression_on_kafka_holds_then_the_expiry_opens_the_case_on_the_feed(tmp_path: Path, kafka_bootstrap: str,
                                                                                unique_topic) -> None:
    """The faust detect + cases worker applies a suppression like the replay: acct-de-ai's findings are held while it
    stands; when the event-time watermark passes its expiry the deadline tick opens the case, knowledge_at at the
    expiry, and publishes it on the feed with the suppression id."""
    import os
    import subprocess
    import sys
    import uuid
    from datetime import UTC, datetime

    import orjson

    from pipeline.detect.topics import owners_topic
    from pipeline.simulator import simulate
    from tests.test_faust_detect import delivery_order, lag, produce, read_topic, reap, stage_topics, stop, wait_for

    repo = Path(__file__).resolve().parent.parent
    folder = simulate("demo", tmp_path / "demo")
    app_id = f"sup-{uuid.uuid4().hex[:8]}"
    topics = stage_topics(unique_topic, kafka_bootstrap, "sup", app_id)
    db, dsn = f"sup_{uuid.uuid4().hex[:10]}", f"chdb://{tmp_path / 'worker-store'}"
    env = {**os.environ, "TRAINWATCH_KAFKA__BOOTSTRAP_SERVERS": kafka_bootstrap, "TRAINWATCH_POLICY": "demo",
           "TRAINWATCH_CLICKHOUSE_DSN": dsn, "TRAINWATCH_DATABASE": db, "TRAINWATCH_DATA_DIR": str(tmp_path / "var"),
           "TRAINWATCH_MODEL_PATH": "rule", **{f"TRAINWATCH_TOPICS__{k.upper()}": t for k, t in topics.items()}}
    env.pop("TRAINWATCH_CONFIG", None)
    start, until = datetime(2025, 3, 3, tzinfo=UTC).timestamp(), datetime(2025, 3, 3, 1, tzinfo=UTC).timestamp()
    added = subprocess.run([sys.executable, "-m", "pipeline", "suppress", "add", "--account", "acct-de-ai", "--reason",
                            "vendor benchmark", "--from", str(start), "--until", str(until), "--actor", "alice"],
                           env=env, cwd=repo, capture_output=True, text=True, timeout=120)
    assert added.returncode == 0, added.stderr
    sid = added.stdout.strip()
    produce(kafka_bootstrap, topics, delivery_order(folder))
    log_path = tmp_path / "worker.log"
    cmd = [sys.executable, "-m", "pipeline", "run", "--stage", "detect", "--app-id", app_id]

    def opened_on_feed() -> list[dict]:
        return [m for m in read_topic(kafka_bootstrap, topics["cases"])
                if m["case"]["account_id"] == "acct-de-ai" and m["change"]["action"] == "opened"]

    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, env=env, cwd=repo, stdout=log, stderr=subprocess.STDOUT)
        try:
            chain = [topics["windows"], topics["cip"], topics["allocations"], owners_topic(app_id),
                     topics["detections"]]
            wait_for(lambda: lag(kafka_bootstrap, app_id, chain) == 0, "consumer lag 0", proc, log_path, 180.0)
            wait_for(lambda: bool(opened_on_feed()), "the released case on the feed", proc, log_path, 60.0)
            stop(proc, 60)
        finally:
            reap(proc)
    (msg,) = opened_on_feed()
    assert msg["case"]["knowledge_at"] == until and msg["change"]["details"]["suppression_id"] == sid
    assert msg["change"]["details"]["held_event_time"] < until
    script = ("import sys, orjson; from pipeline.store import Store\n"
              "s = Store.connect(sys.argv[1], sys.argv[2])\n"
              "print(orjson.dumps({'hits': s.suppression_hits(sys.argv[3]),"
              " 'events': [e.action for e in s.suppression_events(sys.argv[3])]}).decode())\n")
    got = orjson.loads(subprocess.run([sys.executable, "-c", script, dsn, db, sid], cwd=repo, capture_output=True,
                                      check=True, timeout=60).stdout)
    assert got["hits"] and all(h["state"] == 1 and h["account_id"] == "acct-de-ai" for h in got["hits"])
    assert got["events"][0] == "added" and "expired" in got["events"] and "released" in got["events"]
