"""The draft report carries every identity field the rule names, the run, the evidence and the banners."""

from __future__ import annotations

from pipeline.cases.core import CaseBook
from pipeline.cases.report import DEMO_BANNER, DRAFT_BANNER, IDENTITY_FIELDS, draft_report, render_markdown
from schemas import serde
from schemas.policy import load_policy
from tests.test_cases_core import BIS, DAY, NOW, T0, cip, det

RUN_EVIDENCE = {
    "flop_used": 1.2e26,
    "flop_low": 1.0e26,
    "flop_high": 2.4e26,
    "flop_projected": 3.0e26,
    "basis": "tensor_active",
    "accelerators": {"H100-SXM": 1024},
    "device_count": 1024,
    "node_count": 128,
    "run_start": T0 - 10 * DAY,
    "run_end": T0,
    "jobs": ["job-1", "job-2"],
    "classifier": {"verdict": "training", "p_training": 0.97},
}


def _case(policy=BIS, evidence=RUN_EVIDENCE, record=None):
    rec = record if record is not None else cip()
    return CaseBook(policy).apply([det(policy=policy, evidence=evidence)], {"acct-1": rec}, NOW).cases[0]


def test_report_has_every_identity_field_and_the_draft_banner():
    rec = cip()
    rep = draft_report(_case(), BIS)
    serde.loads(serde.dumps(rep))  # JSON-ready
    assert rep["draft"] is True and rep["banner"] == DRAFT_BANNER and rep["demo"] is False
    person = rep["foreign_person"]
    assert all(k in person for k in IDENTITY_FIELDS)
    assert person["name"] == rec.customer_name and person["address"] == rec.address
    assert (person["payment_means"], person["payment_source"]) == (rec.payment_means, rec.payment_source)
    assert person["emails"] == rec.emails and person["phones"] == rec.phones
    assert [(ip["ip"], ip["accessed_at"]) for ip in person["ip_addresses"]] == [
        (ip.ip, ip.accessed_at) for ip in rec.ip_addresses]
    assert person["ip_addresses"][0]["accessed_at_utc"].endswith("Z") and person["missing"] == []

    run = rep["training_run"]
    assert run["exists"] and run["accelerators"] == {"H100-SXM": 1024} and run["duration_s"] == 10 * DAY
    assert run["jobs"] == ["job-1", "job-2"] and run["workloads"] == ["acct-1-wl-1"]
    assert rep["compute"]["estimate_flop"] == 1.2e26 and rep["compute"]["band_high_flop"] == 2.4e26
    assert rep["compute"]["basis"] == "tensor_active"
    assert rep["compute"]["threshold_flop"] == BIS.thresholds.training_ops
    (ev,) = rep["evidence"]
    assert ev["classifier"]["verdict"] == "training" and ev["windows"] == [f"w-{int(T0)}"]
    assert rep["dates"]["knowledge_at"] == T0 and rep["dates"]["due_at"] == T0 + 15 * DAY
    assert (rep["policy"]["id"], rep["policy"]["version"]) == (BIS.id, BIS.version)

    md = render_markdown(rep)
    assert md.startswith(f"> **{DRAFT_BANNER}**") and DEMO_BANNER not in md
    for text in (rec.customer_name, rec.address, rec.payment_means, rec.payment_source, *rec.emails, *rec.phones,
                 rec.ip_addresses[0].ip, "1024 x H100-SXM", "tensor_active", "bis-2024-proposed", "240.0 h"):
        assert text in md, text


def test_demo_policy_gets_the_demo_banner_and_missing_identity_is_flagged():
    demo = load_policy("demo")
    bare = cip().model_copy(update={"address": None, "phones": [], "ip_addresses": []})
    rep = draft_report(_case(policy=demo, evidence={}, record=bare), demo)
    assert rep["demo"] and rep["demo_banner"] == DEMO_BANNER
    assert set(rep["foreign_person"]["missing"]) == {"address", "phones", "ip_addresses"}
    md = render_markdown(rep)
    assert DRAFT_BANNER in md and DEMO_BANNER in md and "Missing from the CIP record" in md
    assert rep["compute"]["basis"] == "not in evidence"


def test_case_without_cip_record_still_renders():
    case = CaseBook(BIS).apply([det()], {}, NOW).cases[0]
    rep = draft_report(case)
    assert rep["foreign_person"]["cip_on_file"] is False and "name" in rep["foreign_person"]["missing"]
    assert "_not on file_" in render_markdown(rep)
