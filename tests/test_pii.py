"""PII where it belongs: CIP dead letters, the analyst grant, the compliance feed."""

from __future__ import annotations

import re

import orjson

from pipeline.cases.feed import feed_messages
from pipeline.cases.report import draft_report, render_markdown
from pipeline.store import MIGRATIONS_DIR, DeadLetter, Store, load_migrations, split_statements
from schemas.case import Case, CaseEvent
from schemas.policy import load_policy
from tests.test_store import make_case

BAD_CIP = (b'{"account_id": "acct-x", "updated_at": 1, "customer_name": "Jane Roe", "emails": ["jane@example.org"],'
           b' "national_id": "123-45-6789"}')
SECRETS = ("Jane Roe", "jane@example.org", "123-45-6789")


def _analyst_tables() -> set[str]:
    """Tables and views the example analyst role may read (whole, or by column list)."""
    text = (MIGRATIONS_DIR / "grants_server.sql.example").read_text()
    found = set()
    for st in split_statements(text):
        m = re.match(r"GRANT SELECT(?:\(.*?\))? ON trainwatch\.(\w+) TO trainwatch_analyst", st, re.S)
        if m:
            found.add(m.group(1))
    return found


def test_analyst_grant_reads_no_pii_table() -> None:
    tables = _analyst_tables()
    assert "dead_letters" in tables and "windows" in tables
    assert not tables & {"cip_identity", "dead_letter_payloads"}
    # cases: a column list without identity
    text = (MIGRATIONS_DIR / "grants_server.sql.example").read_text()
    cases_grant = re.search(r"GRANT SELECT\((.*?)\) ON trainwatch\.cases ", text, re.S)
    assert cases_grant and "identity" not in cases_grant.group(1)


def test_cip_letter_bytes_only_in_the_restricted_table(store: Store) -> None:
    cip = DeadLetter(reason="greater_than", detail="CipRecord.updated_at: Input should be greater than 946684800",
                     topic="accounts.cip", partition=0, offset=7, raw=BAD_CIP, at=1.0)
    tel = DeadLetter(reason="malformed_json", detail="x", topic="gpu.telemetry", partition=1, offset=3, raw=b"{oops",
                     at=1.0)
    store.insert_dead_letters([cip, tel, cip])  # a re-delivered letter lands on its row again

    # Everything an analyst can select from dead_letters, as text: no identity in it.
    rows = store.query("SELECT *, toString(raw) AS raw_text FROM dead_letters FINAL ORDER BY topic")
    assert len(rows) == 2
    assert not any(s in orjson.dumps(rows, default=str).decode() for s in SECRETS)
    by_topic = {r["topic"]: r for r in rows}
    assert by_topic["accounts.cip"]["raw_restricted"] and by_topic["accounts.cip"]["raw_size"] == len(BAD_CIP)
    assert by_topic["accounts.cip"]["raw_blake2b"] == cip.raw_hash()
    assert by_topic["accounts.cip"]["reason"] == "greater_than" and by_topic["accounts.cip"]["offset"] == 7
    assert by_topic["gpu.telemetry"]["raw_text"] == "{oops" and not by_topic["gpu.telemetry"]["raw_restricted"]

    # Compliance reads the bytes back intact, from the restricted table.
    assert [d.raw for d in store.dead_letters()] == [BAD_CIP, b"{oops"]
    assert [d.raw for d in store.dead_letters(restricted=False)] == [b"", b"{oops"]
    payload = store.query("SELECT count() AS n FROM dead_letter_payloads FINAL")
    assert payload == [{"n": 1}]


def test_pii_topics_follow_settings(store_path, store: Store) -> None:
    with Store.connect(f"chdb://{store_path}", store.database, pii_topics={"kyc.records"}) as other:
        other.insert_dead_letters([DeadLetter(reason="r", topic="kyc.records", raw=BAD_CIP, at=1.0)])
    assert store.query("SELECT raw, raw_restricted FROM dead_letters FINAL") == [{"raw": "", "raw_restricted": True}]


def test_migration_moves_cip_bytes_stored_before_it(store: Store) -> None:
    # A row as 0001's dead_letters held it, then the 0004 move statements run again (they are re-runnable).
    cols = ["dead_letter_id", "reason", "detail", "topic", "partition", "offset", "raw", "at"]
    store.client.insert("dead_letters", [["dlq-old", "schema_violation", "d", "accounts.cip", 0, 1, BAD_CIP, 1.0]],
                        column_names=cols)
    mig = next(m for m in load_migrations() if m.version == 4)
    for st in mig.statements:
        if st.startswith(("INSERT INTO dead_letter_payloads", "ALTER TABLE dead_letters UPDATE")):
            store.client.command(st)
    assert store.query("SELECT raw, raw_size FROM dead_letters FINAL") == [{"raw": "", "raw_size": len(BAD_CIP)}]
    assert [d.raw for d in store.dead_letters()] == [BAD_CIP]


def _event(case: Case) -> CaseEvent:
    return CaseEvent(event_id=f"ev-{case.case_id}", case_id=case.case_id, at=case.updated_at,
                     recorded_at=case.updated_at, actor="pipeline", action="opened", to_status=case.status)


def test_feed_carries_identity_once_and_only_for_reportable_cases() -> None:
    ident = {"cip_on_file": True, "name": "Jane Roe", "emails": ["jane@example.org"], "national_id": "123-45-6789"}
    open_case = make_case(1, identity=ident, status="open", policy_id="demo")
    us_case = make_case(2, identity=ident, status="monitored", policy_id="demo")
    msgs = feed_messages([open_case, us_case], [_event(open_case), _event(us_case)], load_policy("demo"))
    by_status = {m.case.status: m for m in msgs}

    reportable = orjson.loads(by_status["open"].model_dump_json())
    assert reportable["case"]["identity"] == {}
    assert reportable["identity"]["name"] == "Jane Roe"
    assert reportable["report"]["foreign_person"]["ref"] == "identity"
    text = orjson.dumps(reportable).decode()
    assert text.count("jane@example.org") == 1 and text.count("123-45-6789") == 1

    monitored = by_status["monitored"].model_dump_json()
    assert not any(s in monitored for s in SECRETS)
    assert by_status["monitored"].identity is None
    assert "not reportable" in by_status["monitored"].report["foreign_person"]["withheld"]

    # A feed report renders without the identity; the full draft (CLI, compliance) still has it.
    md = render_markdown(by_status["open"].report)
    assert "`identity` beside this report" in md and "Jane Roe" not in md
    assert draft_report(open_case)["foreign_person"]["name"] == "Jane Roe"


def test_replay_of_a_malformed_cip_record_keeps_identity_out_of_dead_letters(store: Store) -> None:
    from pipeline.classifier_loader import RULE, load_classifier
    from pipeline.runner import InProcessPipeline
    from pipeline.sources import Record

    policy = load_policy("demo")
    pipe = InProcessPipeline(store, policy, clock=lambda: 1_800_000_000.0, classifier=load_classifier(RULE, policy))
    pipe.run([Record("cip", 0, BAD_CIP, None)])
    public = store.query("SELECT *, toString(raw) AS raw_text FROM dead_letters FINAL")
    assert [(r["topic"], r["raw_restricted"]) for r in public] == [("accounts.cip", True)]
    assert not any(s in orjson.dumps(public, default=str).decode() for s in SECRETS)
    assert [d.raw for d in store.dead_letters()] == [BAD_CIP]
