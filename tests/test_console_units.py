"""Console pieces without a server: identity redaction, the login throttle, password checks, urgency, as_of
parsing and the detect/cases stage metrics."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi import HTTPException
from prometheus_client import generate_latest

from pipeline.stage_metrics import StageMetrics, registry_for
from pipeline.web.app import _local, _parse_as_of
from pipeline.web.auth import LoginThrottle
from pipeline.web.config import hash_password, verify_password
from pipeline.web.redact import WITHHELD, identity_values, redact_case, redact_report, scrub
from pipeline.web.views import urgency
from schemas.case import Case
from schemas.detection import Detection

IDENTITY = {
    "name": "Kieler KI GmbH", "address": "Hafenstr. 1, Kiel", "emails": ["ops@kiel.example"], "payment_means": "wire",
    "phones": ["+49 431 000"], "ip_addresses": [{"ip": "192.0.2.44", "accessed_at": 1.0}], "country": "DE",
    "beneficial_owners": [{"owner_id": "own-1", "name": "Owner Person", "nationality": "CN"}],
    "reseller": {"name": "Lion City Cloud Pte", "country": "SG"},
}


def test_identity_values_cover_nested_pii_and_skip_short_generic_words() -> None:
    values = identity_values(IDENTITY)
    for v in ("Kieler KI GmbH", "Hafenstr. 1, Kiel", "ops@kiel.example", "+49 431 000", "192.0.2.44",
              "Owner Person", "Lion City Cloud Pte"):
        assert v in values
    assert "wire" not in values and "DE" not in values and "own-1" not in values  # too short / pseudonymous ids


def test_scrub_and_redact_leave_no_identity_value_anywhere() -> None:
    values = identity_values(IDENTITY)
    case = {"case_id": "c1", "identity": IDENTITY, "evidence": {"reasons": ["foreign_reseller:Lion City Cloud Pte"],
                                                                "Owner Person": 1}}
    out = redact_case(case, values)
    assert "identity" not in out and out["identity_withheld"] is True
    assert out["evidence"] == {"reasons": [f"foreign_reseller:{WITHHELD}"], WITHHELD: 1}
    report = {"foreign_person": {**IDENTITY, "account_id": "acct-1", "cip_on_file": True},
              "training_run": {"description": "by Kieler KI GmbH"}}
    red = redact_report(report, values)
    assert red["foreign_person"]["withheld"].startswith("Withheld") and red["foreign_person"]["account_id"] == "acct-1"
    assert red["training_run"]["description"] == f"by {WITHHELD}"
    assert not any(v in repr(red) for v in values)
    assert scrub({"a": ("x",)}, []) == {"a": ("x",)}


def test_login_throttle_blocks_after_the_limit_and_forgets_after_the_window() -> None:
    now = [0.0]
    t = LoginThrottle(max_failures=3, window_s=60, clock=lambda: now[0])
    assert [t.failed("Ana", "10.0.0.1") for _ in range(3)] == [1, 2, 3]
    assert t.blocked("ana", "10.0.0.1")  # names are case-insensitive
    assert not t.blocked("ana", "10.0.0.2") and not t.blocked("bob", "10.0.0.1")
    now[0] = 61.0
    assert not t.blocked("ana", "10.0.0.1")
    t.failed("ana", "10.0.0.1")
    t.succeeded("ana", "10.0.0.1")
    assert t.failed("ana", "10.0.0.1") == 1


def test_passwords_are_checked_through_argon2_only() -> None:
    h = hash_password("correct horse")
    assert h.startswith("$argon2id$") and "correct horse" not in h
    assert verify_password(h, "correct horse")
    assert not verify_password(h, "correct hors")
    assert not verify_password(None, "correct horse")  # unknown user
    assert not verify_password("not-a-hash", "x")


def _case(status: str, due_at: float | None) -> Case:
    return Case(case_id="c", account_id="a", policy_id="demo", policy_version="1", reason="compute_used",
                status=status, knowledge_at=0.0, detected_at=0.0, due_at=due_at, updated_at=0.0)


def test_urgency_counts_days_left_for_pending_cases_only() -> None:
    day = 86_400.0
    assert urgency(_case("open", 10 * day), 0.0) == (10.0, "ok")
    assert urgency(_case("acknowledged", 3 * day), 0.0) == (3.0, "soon")
    assert urgency(_case("needs_review", day), 2 * day) == (-1.0, "overdue")
    assert urgency(_case("reported", day), 2 * day) == (-1.0, "none")
    assert urgency(_case("monitored", None), 0.0) == (None, "none")


def test_as_of_accepts_epoch_and_iso_and_rejects_the_rest() -> None:
    assert _parse_as_of("1740960000") == 1740960000.0
    assert _parse_as_of("2025-03-03T00:00:00Z") == 1740960000.0
    assert _parse_as_of("2025-03-03T00:00") == 1740960000.0  # naive = UTC
    assert _parse_as_of("") is None and _parse_as_of(None) is None
    for bad in ("next tuesday", "nan", "inf", "1e308", "-5", "0001-01-01"):
        with pytest.raises(HTTPException) as err:
            _parse_as_of(bad)
        assert err.value.status_code == 422, bad


def _det(detector: str, outcome: str) -> Detection:
    return Detection(detection_id=f"d-{detector}-{outcome}", detector_id=detector, detector_version=1,
                     severity="high", policy_id="demo", policy_version="1", outcome=outcome, reason="compute_used",
                     account_id="a", event_time=1_740_960_000.0, summary="s")


def test_stage_metrics_count_detections_and_report_event_time_lag() -> None:
    m = StageMetrics(clock=lambda: 1_740_960_100.0)
    m.observe_detections([_det("compute_threshold", "reportable"), _det("compute_threshold", "reportable"),
                          _det("special_measures", "info")])
    m.observe_event_time("detect", 1_740_960_000.0)
    m.observe_event_time("detect", 1_740_959_000.0)  # older: the watermark does not go back
    m.observe_event_time("cases", None)
    text = generate_latest(registry_for(stage=m)).decode()
    assert 'trainwatch_detections_total{detector="compute_threshold",outcome="reportable"} 2.0' in text
    assert 'trainwatch_detections_total{detector="special_measures",outcome="info"} 1.0' in text
    assert 'trainwatch_stage_event_time_lag_seconds{stage="detect"} 100.0' in text
    assert 'stage="cases"' not in text.split("trainwatch_stage_event_time_seconds")[-1]


def test_stalled_input_partitions_are_a_gauge_of_the_last_check_only():
    m = StageMetrics()
    m.observe_stalled([("windows", 2, 45.0), ("windows", 3, 31.5)])
    text = generate_latest(registry_for(stage=m)).decode()
    assert 'trainwatch_input_stalled_seconds{partition="2",topic="windows"} 45.0' in text
    assert 'trainwatch_input_stalled_seconds{partition="3",topic="windows"} 31.5' in text
    m.observe_stalled([])  # reading caught up: the series go away
    assert "trainwatch_input_stalled_seconds{" not in generate_latest(registry_for(stage=m)).decode()


def test_messages_faust_fetched_and_did_not_deliver_are_counted_per_topic():
    m = StageMetrics()
    m.observe_redelivered("windows", 438)
    m.observe_redelivered("cip", 12)
    m.observe_redelivered("windows", 2)
    text = generate_latest(registry_for(stage=m)).decode()
    assert 'trainwatch_input_redelivered_messages_total{topic="windows"} 440.0' in text
    assert 'trainwatch_input_redelivered_messages_total{topic="cip"} 12.0' in text


def test_login_redirects_stay_on_this_site() -> None:
    assert _local("/cases/c1?as_of=1") == "/cases/c1?as_of=1"
    for evil in ("//evil.example/", "/\\evil.example", "https://evil.example/", "evil", "/\r\nSet-Cookie: x"):
        assert _local(evil) == "/", evil


def test_serve_refuses_to_start_without_users(monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from pipeline.cli import _register_all, app

    monkeypatch.delenv("TRAINWATCH_CONSOLE__USERS", raising=False)
    monkeypatch.delenv("TRAINWATCH_CONSOLE__PROXY_AUTH", raising=False)
    _register_all()
    result = CliRunner().invoke(app, ["serve", "--store", "chdb://:memory:"])
    assert result.exit_code == 2
    assert "no console users configured" in result.output


def test_console_settings_come_from_the_config_file(tmp_path: Path) -> None:
    from pipeline.settings import load_settings

    h = hash_password("pw")
    cfg = tmp_path / "tw.toml"
    cfg.write_text(f'[console]\nport = 9090\nproxy_auth = true\n[console.users.ana]\nrole = "analyst"\n'
                   f'password_hash = "{h}"\n')
    console = load_settings(cfg).console
    assert console.port == 9090 and console.proxy_auth and console.host == "127.0.0.1"
    assert console.users["ana"].role == "analyst" and verify_password(console.users["ana"].password_hash, "pw")
