"""The knowledge store on embedded chDB: migrations, idempotent sinks, views and full round trips."""

from __future__ import annotations

import shutil
import uuid
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from pipeline.store import (
    MIGRATIONS_DIR,
    DeadLetter,
    MigrationError,
    Store,
    StoreError,
    chdb_path,
    load_migrations,
    split_statements,
)
from schemas.case import REPORTABLE_STATUSES, Case, CaseEvent
from schemas.cip import BeneficialOwner, CipRecord, IpAccess, Reseller
from schemas.detection import Detection
from schemas.ids import content_id
from schemas.policy import load_policy
from schemas.windows import WindowAggregate

T0 = 1_718_000_000.123456  # epoch seconds with a fraction, so float round trips are really tested
W = 60.0


def make_case(n: int, **over: object) -> Case:
    fields: dict = dict(
        case_id=content_id("case", "pol", f"acct-{n}", f"run-{n}"),
        account_id=f"acct-{n}",
        beneficial_owner_id=f"owner-{n}",
        run_id=f"run-{n}",
        policy_id="bis-2024-proposed",
        policy_version="2024.1",
        reason="compute_used",
        status="open",
        knowledge_at=T0 + n,
        detected_at=T0 + n + 0.5,
        due_at=T0 + n + 15 * 86400,
        updated_at=T0 + n + 1.25,
        detectors=["compute_threshold", "classifier"],
        evidence={"flop": 1.5e26, "windows": ["w-1", "w-2"], "nested": {"k": [1, None, True]}},
        identity={"name": "Example Ltd", "country": "XX", "owners": [{"id": "o1", "pct": 51.0}]},
        suggested_inquiry="Please describe the workload.",
        filing_reference="BIS-0001",
        dismiss_reason="none",
        version=3,
    )
    fields.update(over)
    return Case(**fields)


def make_event(case_id: str, i: int) -> CaseEvent:
    at = T0 + i * 10.5
    return CaseEvent(
        event_id=content_id("evt", case_id, f"action-{i}", at),
        case_id=case_id,
        at=at,
        recorded_at=at + 0.25,
        actor="pipeline" if i % 2 else "analyst-7",
        action=f"action-{i}",
        from_status="open" if i else None,
        to_status="acknowledged",
        details={"i": i, "note": "é unicode", "nested": [1.5, None]},
    )


def make_window(workload: str, account: str | None, start: float, revision: int = 0, partition: int = 0, **over):
    flop = 1e18 * (1 + revision) + start % 7
    fields: dict = dict(
        window_id=content_id("win", workload, start, partition, revision),
        workload_id=workload,
        account_id=account,
        job_id="job-1",
        run_label="run-a",
        partition=partition,
        revision=revision,
        window_start=start,
        window_end=start + W,
        sample_count=120,
        device_count=8,
        node_count=1,
        devices=["GPU-a", "GPU-b"],
        nodes=["node-1"],
        device_seconds=480.0 + revision,
        flop=flop,
        flop_low=flop * 0.5,
        flop_high=flop * 2.0,
        basis="tensor_active",
        accelerators={"H100-SXM": 8},
        unknown_accelerators=["Mystery-X"],
        sums={"tensor_active.sum": 3.5, "tensor_active.n": 120.0},
        features={"tensor_active_mean": 0.71, "power_cv": None},
        missing_fields=["DCGM_FI_PROF_PIPE_FP8_ACTIVE"],
        offsets={"gpu.telemetry:0": [10, 129]},
    )
    fields.update(over)
    return WindowAggregate(**fields)


def make_detection(detector: str, version: int, outcome: str, account: str, n: int) -> Detection:
    return Detection(
        detection_id=content_id("det", detector, account, n),
        detector_id=detector,
        detector_version=version,
        severity="high",
        policy_id="bis-2024-proposed",
        policy_version="2024.1",
        outcome=outcome,
        reason="compute_projected",
        account_id=account,
        beneficial_owner_id="owner-1",
        run_id="run-1",
        workload_ids=["wl-1", "wl-2"],
        event_time=T0 + n,
        summary="projected total crosses the threshold",
        evidence={"used": 1e25, "projected": 2e26, "basis": "tensor_active"},
        source_windows=["win-1"],
    )


def make_cip(account: str, updated_at: float, owners: list[BeneficialOwner]) -> CipRecord:
    return CipRecord(
        account_id=account,
        updated_at=updated_at,
        customer_name="Example Ltd",
        customer_type="entity",
        country="XX",
        address="1 Main St",
        us_person=False,
        beneficial_owners=owners,
        reseller=Reseller(name="Resell Co", country="YY"),
        payment_means="card",
        payment_source="bank-1",
        emails=["a@example.com"],
        phones=["+1 555 0100"],
        ip_addresses=[IpAccess(ip="192.0.2.1", accessed_at=updated_at - 5, purpose="administration")],
        national_id="ID-123",
        verification_status="verified",
        verified_at=updated_at - 100,
        special_measures=["flag-1"],
    )


def owner(owner_id: str, pct: float | None, control: bool = False, us_person: bool | None = False
          ) -> BeneficialOwner:
    return BeneficialOwner(
        owner_id=owner_id,
        name=f"Name {owner_id}",
        ownership_pct=pct,
        control=control,
        nationality="XX",
        residence="XX",
        us_person=us_person,
    )


def schema_snapshot(s: Store) -> tuple[list[dict], list[dict]]:
    migrations = s.query("SELECT * FROM schema_migrations ORDER BY version")
    tables = s.query(
        "SELECT name, engine, create_table_query FROM system.tables WHERE database = {db:String} ORDER BY name",
        {"db": s.database},
    )
    return migrations, tables


# ---- migrations ---------------------------------------------------------------------------------------------------


def test_second_connect_applies_nothing_and_changes_nothing(store: Store, store_path: Path) -> None:
    expected = [f"{m.version:04d}_{m.name}" for m in load_migrations()]
    assert store.applied == expected
    before = schema_snapshot(store)
    assert [(r["version"], r["checksum"]) for r in before[0]] == [(m.version, m.checksum) for m in load_migrations()]

    with Store.connect(f"chdb://{store_path}", store.database) as again:
        assert again.applied == []
        assert schema_snapshot(again) == before


def test_changed_migration_is_refused_and_new_one_applied(store_path: Path, tmp_path: Path) -> None:
    mig_dir = tmp_path / "migrations"
    shutil.copytree(MIGRATIONS_DIR, mig_dir)
    db = f"test_{uuid.uuid4().hex[:12]}"
    first = Store.connect(f"chdb://{store_path}", db, migrations_dir=mig_dir)
    try:
        (mig_dir / "0099_extra.sql").write_text(
            "CREATE TABLE IF NOT EXISTS extra (x UInt8) ENGINE = MergeTree ORDER BY x;\n"
        )
        with Store.connect(f"chdb://{store_path}", db, migrations_dir=mig_dir) as second:
            assert second.applied == ["0099_extra"]
            assert second.query("SELECT count() AS n FROM extra") == [{"n": 0}]

        edited = mig_dir / "0002_identity.sql"
        edited.write_text(edited.read_text() + "\n-- an innocent-looking edit\n")
        with pytest.raises(MigrationError, match=r"0002_identity\.sql was changed after it was applied"):
            Store.connect(f"chdb://{store_path}", db, migrations_dir=mig_dir)
    finally:
        first.drop_database()
        first.close()


def test_server_grants_file_is_not_a_migration_and_parses(store: Store) -> None:
    grants = MIGRATIONS_DIR / "grants_server.sql.example"
    assert grants.name not in {m.path.name for m in load_migrations()}
    statements = split_statements(grants.read_text())
    assert len(statements) > 10
    for statement in statements:  # chDB has no access control, but its parser knows the syntax
        store.client.command(f"EXPLAIN AST {statement}")


def test_dsn_parsing() -> None:
    assert chdb_path("chdb:///abs/path") == "/abs/path"
    assert chdb_path("chdb://./var/trainwatch.chdb") == "./var/trainwatch.chdb"
    assert chdb_path("chdb://:memory:") is None
    assert chdb_path("chdb:./var/trainwatch.chdb") == "./var/trainwatch.chdb"  # the default's form
    assert chdb_path("chdb:var/x") == "var/x"
    with pytest.raises(StoreError, match="unsupported ClickHouse DSN"):
        Store.connect("postgres://x", "db")
    with pytest.raises(StoreError, match="database name"):
        Store.connect("chdb:///x", "bad-name; DROP")


def test_two_stores_share_the_one_engine_path_but_not_another(store: Store, store_path: Path, tmp_path: Path) -> None:
    with Store.connect(f"chdb://{store_path}", store.database) as other:
        other.upsert_cases([make_case(1)])
        assert store.get_case(make_case(1).case_id) == make_case(1)
    # chDB hosts one engine path per process: a second path is refused while clients are open.
    with pytest.raises(StoreError, match="already initialized"):
        Store.connect(f"chdb://{tmp_path / 'elsewhere'}", "other")
    assert store.get_case(make_case(1).case_id) == make_case(1)


# ---- idempotent sinks ---------------------------------------------------------------------------------------------


def test_case_upsert_is_idempotent_and_highest_version_wins(store: Store) -> None:
    v1 = make_case(1, version=1, status="needs_review")
    store.upsert_cases([v1])
    store.upsert_cases([v1])
    assert store.list_cases() == [v1]
    assert store.query("SELECT count() AS n FROM cases FINAL") == [{"n": 1}]

    v2 = v1.model_copy(update={"version": 2, "status": "acknowledged", "updated_at": v1.updated_at + 60})
    store.upsert_cases([v2])
    store.upsert_cases([v1])  # a late replay of the old version must not win
    assert store.get_case(v1.case_id) == v2
    assert store.list_cases() == [v2]
    assert store.get_case("case-missing") is None


def test_case_events_replay_adds_no_duplicates(store: Store) -> None:
    case_a, case_b = make_case(1).case_id, make_case(2).case_id
    events = [make_event(case_a, i) for i in range(6)] + [make_event(case_b, i) for i in range(4)]
    batch = list(reversed(events))  # inserted out of time order on purpose
    store.append_case_events(batch)
    store.append_case_events(events)  # a retry of the same events (other order): dropped at insert by its token
    assert store.query("SELECT count() AS n FROM case_events") == [{"n": len(events)}]

    store.append_case_events(events[2:5])  # a replay re-batched differently: collapsed by event_id
    assert store.case_events(case_a) == events[:6]
    assert store.case_events(case_b) == events[6:]
    assert store.case_events("case-none") == []


def test_windows_detections_dead_letters_upsert_by_id(store: Store) -> None:
    windows = [make_window("wl-1", "acct-1", T0 + i * W) for i in range(3)]
    dets = [make_detection("compute", 1, "reportable", "acct-1", i) for i in range(2)]
    letters = [DeadLetter(reason="malformed_json", topic="gpu.telemetry", partition=1, offset=7, raw=b"{", at=T0)]
    for _ in range(2):
        store.insert_windows(windows)
        store.insert_detections(dets)
        store.insert_dead_letters(letters)
    assert store.query("SELECT count() AS n FROM windows FINAL") == [{"n": 3}]
    assert store.query("SELECT count() AS n FROM detections FINAL") == [{"n": 2}]
    assert store.dead_letters() == letters


# ---- round trips --------------------------------------------------------------------------------------------------


def test_every_model_field_round_trips(store: Store) -> None:
    window = make_window("wl-1", "acct-1", T0, revision=2, partition=3)
    bare_window = make_window("wl-2", None, T0, job_id=None, run_label=None, features={}, offsets={}, sums={})
    detection = make_detection("classifier", 4, "needs_review", "acct-1", 1)
    case = make_case(1)
    bare_case = Case(
        case_id="case-bare",
        account_id="acct-2",
        policy_id="p",
        policy_version="1",
        reason="special_measures",
        status="needs_review",
        knowledge_at=None,
        detected_at=T0,
        updated_at=T0,
    )
    event = make_event(case.case_id, 0)
    cip = make_cip("acct-1", T0, [owner("o1", 51.0, control=True), owner("o2", None)])
    letters = [
        DeadLetter(
            reason="bad_bytes", detail="not UTF-8", topic="t", partition=0, offset=None, raw=b"\xff\x00\xfe", at=T0
        ),
        DeadLetter(reason="too_late", topic="t", partition=2, offset=99, raw=b'{"a": 1}', at=T0 + 1),
    ]

    store.insert_windows([window, bare_window])
    store.insert_detections([detection])
    store.upsert_cases([case, bare_case])
    store.append_case_events([event])
    store.upsert_cip([cip])
    store.insert_dead_letters(letters)

    assert sorted(store.list_windows(), key=lambda w: w.window_id) == sorted(
        [window, bare_window], key=lambda w: w.window_id
    )
    assert store.list_windows(account_id="acct-1") == [window]
    assert store.list_detections() == [detection]
    assert store.get_case(case.case_id) == case
    assert store.get_case("case-bare") == bare_case
    assert store.case_events(case.case_id) == [event]
    assert store.get_cip("acct-1") == cip
    assert store.dead_letters() == letters
    assert store.dead_letters(topic="nope") == []


def test_list_cases_filters_and_orders_by_due(store: Store) -> None:
    cases = [
        make_case(1, due_at=T0 + 300, status="open"),
        make_case(2, due_at=T0 + 100, status="reported"),
        make_case(3, due_at=None, knowledge_at=None, status="needs_review"),
        make_case(4, due_at=T0 + 200, status="open", policy_id="eu-profile"),
    ]
    store.upsert_cases(cases)
    assert [c.account_id for c in store.list_cases()] == ["acct-2", "acct-4", "acct-1", "acct-3"]
    assert [c.account_id for c in store.list_cases(status=["open"])] == ["acct-4", "acct-1"]
    assert [c.account_id for c in store.list_cases(status=["open"], policy_id="bis-2024-proposed")] == ["acct-1"]
    assert store.list_cases(status=[]) == []


# ---- views --------------------------------------------------------------------------------------------------------


def test_open_cases_by_due_shows_latest_unreported_reportable_cases(store: Store) -> None:
    statuses = ["open", "needs_review", "acknowledged", "reported", "dismissed", "monitored", "open"]
    cases = [make_case(i, status=s, due_at=T0 + 1000 - i * 10, version=1) for i, s in enumerate(statuses)]
    # case 0 later moves to reported (higher version): it must leave the view.
    cases.append(cases[0].model_copy(update={"status": "reported", "version": 2}))
    store.upsert_cases(cases)

    latest = {c.case_id: c for c in sorted(cases, key=lambda c: c.version)}
    unreported = set(REPORTABLE_STATUSES) - {"reported"}
    expected = sorted((c for c in latest.values() if c.status in unreported), key=lambda c: c.due_at)
    rows = store.query("SELECT case_id, status, due_at, version FROM open_cases_by_due ORDER BY due_at")
    assert [(r["case_id"], r["status"], r["due_at"]) for r in rows] == [
        (c.case_id, c.status, c.due_at) for c in expected
    ]


def test_compute_by_account_sums_every_revision_once(store: Store) -> None:
    windows = [
        make_window("wl-1", "acct-1", T0),
        make_window("wl-1", "acct-1", T0, revision=1),  # late-data correction adds to revision 0
        make_window("wl-1", "acct-1", T0, partition=1),  # another partition's partial of the same window adds
        make_window("wl-1", "acct-1", T0 + W),
        make_window("wl-2", "acct-1", T0 + W),
        make_window("wl-3", "acct-2", T0 + 2 * W, revision=2),
    ]
    store.insert_windows(windows + windows[:2])  # plus a replayed batch

    expected: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    seen: dict[str, set] = defaultdict(set)
    for w in windows:  # each revision once (the replayed batch must not count), corrections add
        e = expected[w.account_id]
        e["flop"] += w.flop
        e["flop_low"] += w.flop_low
        e["flop_high"] += w.flop_high
        e["device_hours"] += w.device_seconds / 3600
        seen[w.account_id].add((w.workload_id, w.window_start))  # a workload-window, however many partials
        e["partials"] += 1
    for account, keys in seen.items():
        expected[account]["windows"] = len(keys)
    assert expected["acct-1"]["windows"] == 3 and expected["acct-1"]["partials"] == 5

    rows = store.query("SELECT * FROM compute_by_account ORDER BY account_id")
    assert [r["account_id"] for r in rows] == sorted(expected)
    for r in rows:
        for k, v in expected[r["account_id"]].items():
            assert r[k] == pytest.approx(v, rel=1e-12), (r["account_id"], k)


def test_compute_by_owner_uses_current_owners_and_owner_cases(store: Store) -> None:
    store.insert_windows(
        [
            make_window("wl-1", "acct-1", T0),
            make_window("wl-2", "acct-2", T0),
            make_window("wl-3", "acct-3", T0, revision=1),
        ]
    )
    store.upsert_cip(
        [
            make_cip("acct-1", T0, [owner("own-a", 60.0), owner("own-b", 40.0)]),
            make_cip("acct-2", T0, [owner("own-a", 30.0, control=True)]),
            make_cip("acct-3", T0, [owner("own-b", 100.0)]),
        ]
    )
    # acct-3's newer record drops own-b entirely (no owners left); acct-1's older replay must not bring owners back.
    store.upsert_cip([make_cip("acct-3", T0 + 10, []), make_cip("acct-1", T0 - 10, [owner("own-c", 5.0)])])
    store.upsert_cases(
        [
            make_case(1, beneficial_owner_id="own-a", status="open"),
            make_case(2, beneficial_owner_id="own-a", status="dismissed"),
            make_case(3, beneficial_owner_id=None),
        ]
    )

    per_account = {r["account_id"]: r for r in store.query("SELECT * FROM compute_by_account")}
    current = {"own-a": {"acct-1": 60.0, "acct-2": 30.0}, "own-b": {"acct-1": 40.0}}
    rows = {r["owner_id"]: r for r in store.query(
        "SELECT * FROM compute_by_owner WHERE policy_id = 'bis-2024-proposed'")}
    assert set(rows) == set(current)
    for owner_id, accounts in current.items():
        r = rows[owner_id]
        assert r["accounts"] == len(accounts)
        assert r["max_ownership_pct"] == max(accounts.values())
        for k in ("flop", "flop_low", "flop_high", "device_hours"):
            assert r[k] == pytest.approx(sum(per_account[a][k] for a in accounts), rel=1e-12)
    assert bool(rows["own-a"]["controls_any"]) and not rows["own-b"]["controls_any"]
    assert (rows["own-a"]["owner_cases"], rows["own-a"]["reportable_owner_cases"]) == (2, 1)
    assert (rows["own-b"]["owner_cases"], rows["own-b"]["reportable_owner_cases"]) == (0, 0)


def test_compute_by_owner_applies_each_policys_foreign_person_test(store: Store) -> None:
    store.insert_windows([make_window("wl-1", "acct-1", T0)])
    store.upsert_cip([make_cip("acct-1", T0, [
        owner("own-us", 70.0, us_person=True),  # a U.S. person: never a foreign owner where the U.S. test applies
        owner("own-small", 10.0),  # foreign, below owner_min_pct, no control
        owner("own-ctl", 5.0, control=True),  # foreign, in control
        owner("own-unk", 30.0, us_person=None),  # status unknown
    ])])
    strict = load_policy("bis-2024-proposed")
    lenient = strict.model_copy(update={"id": "lenient", "foreign_person": strict.foreign_person.model_copy(
        update={"unknown_is_foreign": False, "owner_control_counts": False})})
    store.register_policies([lenient])

    def owners(policy_id: str) -> set[str]:
        rows = store.query("SELECT owner_id FROM compute_by_owner WHERE policy_id = {p:String}", {"p": policy_id})
        return {r["owner_id"] for r in rows}

    assert owners("bis-2024-proposed") == {"own-ctl", "own-unk"}
    assert owners("lenient") == set()
    # The EU profile puts everyone in scope: the U.S. owner qualifies by stake, the 10 % owner still does not.
    assert owners("eu-ai-act") == {"own-us", "own-ctl", "own-unk"}
    store.register_policies([lenient])  # unchanged: nothing written again
    assert store.query("SELECT count() AS n FROM policy_foreign_tests WHERE policy_id = 'lenient'") == [{"n": 1}]


def test_detections_by_detector_counts_latest_detections(store: Store) -> None:
    dets = [
        make_detection("compute", 1, "reportable", "acct-1", 1),
        make_detection("compute", 1, "reportable", "acct-2", 2),
        make_detection("compute", 2, "reportable", "acct-1", 3),
        make_detection("compute", 2, "monitored", "acct-1", 4),
        make_detection("classifier", 1, "needs_review", "acct-3", 5),
    ]
    store.insert_detections(dets + dets[:2])  # replayed detections count once
    expected = Counter((d.detector_id, d.detector_version, d.outcome) for d in dets)
    rows = store.query("SELECT detector_id, detector_version, outcome, detections FROM detections_by_detector")
    assert {(r["detector_id"], r["detector_version"], r["outcome"]): r["detections"] for r in rows} == expected


def test_a_redecided_detection_is_one_row_per_id_its_latest_version(store: Store) -> None:
    """The engine re-emits a re-decided detection under its id with other content: the table, list_detections and
    the analyst view show one row per id, the version received last (also within one insert batch)."""
    first = make_detection("compute", 1, "reportable", "acct-1", 1)
    other = make_detection("compute", 1, "reportable", "acct-2", 2)
    redecided = first.model_copy(update={"outcome": "needs_review", "event_time": T0 + 180})
    store.insert_detections([first, other])
    store.insert_detections([redecided])
    store.insert_detections([redecided])  # at-least-once redelivery
    assert store.list_detections() == [other, redecided]
    rows = store.query("SELECT detector_id, outcome, detections, first_event_time FROM detections_by_detector "
                       "ORDER BY outcome")
    assert rows == [{"detector_id": "compute", "outcome": "needs_review", "detections": 1,
                     "first_event_time": T0 + 180},
                    {"detector_id": "compute", "outcome": "reportable", "detections": 1, "first_event_time": T0 + 2}]
    # both versions in one batch (a detect batch that applied a window and its correction): the last one counts
    again = redecided.model_copy(update={"event_time": T0 + 240})
    store.insert_detections([again, first, other, redecided])
    assert store.list_detections(account_id="acct-1") == [redecided]
    assert store.query("SELECT count() AS n FROM detections FINAL") == [{"n": 2}]
