"""The draft report carries every identity field the rule names, the run, the evidence and the banners."""

from __future__ import annotations

from typing import get_args

import pytest

from detectors.engine import DetectEngine
from pipeline.cases.core import CaseBook
from pipeline.cases.report import (
    BASIS_TEXT,
    DEMO_BANNER,
    DRAFT_BANNER,
    IDENTITY_FIELDS,
    basis_text,
    draft_report,
    render_markdown,
    utc,
)
from schemas import serde
from schemas.policy import load_policy
from schemas.window_sums import BASES, ComputeBasis
from tests import detector_builders as db
from tests.test_cases_core import BIS, DAY, NOW, T0, cip, det

RUN_EVIDENCE = {
    "used_flop": 1.2e26,
    "used_flop_low": 1.0e26,
    "used_flop_high": 2.4e26,
    "projected_flop": 3.0e26,
    "basis": {"tensor_active": 3},
    "run": {"run_id": "run-1", "accelerators": {"H100-SXM": 1024}, "device_count": 1024, "node_count": 128,
            "start": T0 - 10 * DAY, "end": T0, "job_ids": ["job-1", "job-2"], "workload_ids": ["acct-1-wl-1"]},
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
    assert rep["compute"]["basis"] == "tensor-pipe activity x peak (3 windows)"
    assert rep["compute"]["band_low_flop"] == 1.0e26 and rep["compute"]["projected_flop"] == 3.0e26
    assert (run["device_count"], run["node_count"]) == (1024, 128)
    assert rep["compute"]["threshold_flop"] == BIS.thresholds.training_ops
    (ev,) = rep["evidence"]
    assert ev["classifier"]["verdict"] == "training" and ev["windows"] == [f"w-{int(T0)}"]
    assert rep["dates"]["knowledge_at"] == T0 and rep["dates"]["due_at"] == T0 + 15 * DAY
    assert (rep["policy"]["id"], rep["policy"]["version"]) == (BIS.id, BIS.version)

    md = render_markdown(rep)
    assert md.startswith(f"> **{DRAFT_BANNER}**") and DEMO_BANNER not in md
    for text in (rec.customer_name, rec.address, rec.payment_means, rec.payment_source, *rec.emails, *rec.phones,
                 rec.ip_addresses[0].ip, "1024 x H100-SXM", "tensor-pipe activity x peak", "bis-2024-proposed",
                 "240.0 h"):
        assert text in md, text



def test_a_run_with_more_workloads_than_a_detection_lists_says_how_many() -> None:
    """A detection lists its first WORKLOAD_IDS_K workloads (a message stays under the topics' limit) and counts them
    all: the report lists those and says of how many."""
    rep = draft_report(_case(evidence={**RUN_EVIDENCE, "workload_ids_total": 3000}), BIS)
    assert rep["training_run"]["workload_count"] == 3000 and rep["training_run"]["workloads"] == ["acct-1-wl-1"]
    assert "acct-1-wl-1 (the first 1 of 3000)" in render_markdown(rep)
    assert draft_report(_case(), BIS)["training_run"]["workload_count"] == 1

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


def _engine_report(dets, cips, policy, subject):
    """The draft report of the case the detection `subject` opened, after applying all of `dets`."""
    case = next(c for c in CaseBook(policy).apply(dets, cips, db.T0 + 3600).cases
                if subject.detection_id in c.evidence["detections"])
    return case, draft_report(case, policy)


def test_engine_detection_fills_the_training_run_and_compute_sections():
    """A real engine detection, through the case book, gives a report with the run and the estimate filled in."""
    eng = DetectEngine(db.demo())
    rec = db.cip("acct-r")
    eng.on_cip(rec)
    wins = [db.window("wl-r", "acct-r", i, flop=3e17, job="job-r", devices=16, nodes=2, model="H100")
            for i in range(3)]
    wins += [db.window("wl-r", "acct-r", 3, flop=3e17, job="job-r", devices=16, nodes=2, features=db.SMI_ONLY)]
    wins[-1].basis = "utilisation_power"
    dets = [d for w in wins for d in eng.on_window(w)]
    (ct,) = [d for d in dets if d.detector_id == "compute_threshold"]
    _, rep = _engine_report(dets, {"acct-r": rec}, db.demo(), ct)

    run = rep["training_run"]
    assert run["exists"] and run["run_id"] == ct.run_id
    assert run["accelerators"] == {"H100": 16} and (run["device_count"], run["node_count"]) == (16, 2)
    assert run["start"] == db.T0 and run["end"] == pytest.approx(ct.evidence["run"]["end"])
    assert run["end"] > run["start"] and run["duration_s"] == run["end"] - run["start"]
    assert run["jobs"] == ["job-r"] and run["workloads"] == ["wl-r"]
    comp = rep["compute"]
    used = ct.evidence["used_flop"]
    assert comp["estimate_flop"] == used >= db.demo().thresholds.training_ops
    assert comp["band_low_flop"] < used < comp["band_high_flop"]
    assert ct.evidence["basis"] == {"tensor_active": 3, "utilisation_power": 1}  # the 4th window crosses
    assert comp["basis"] == "tensor-pipe activity x peak (3 windows); utilisation and power (weaker) (1 window)"
    assert comp["threshold_flop"] == db.demo().thresholds.training_ops

    md = render_markdown(rep)
    section = md[md.index("## The training run"):md.index("## Evidence")]
    for text in ("16 x H100", "Devices: 16; nodes: 2", "job-r", "wl-r", "tensor-pipe activity x peak",
                 f"{used:.4g} FLOP", f"{comp['band_low_flop']:.4g}", utc(run["start"])):
        assert text in section, text
    assert "_not on file_" not in section.split("- Projected")[0]


def test_owner_case_report_describes_the_summed_runs():
    pol = db.demo()
    eng = DetectEngine(pol)
    recs = {a: db.cip(a, us_person=True, country="US", owners=[db.owner("own-z", 50.0)]) for a in ("acct-y", "acct-z")}
    for rec in recs.values():
        eng.on_cip(rec)
    dets = [d for i in range(6) for w in (db.window("wl-y", "acct-y", i, flop=1e17, devices=8),
                                          db.window("wl-z", "acct-z", i, flop=1e17, devices=4, model="A100"))
            for d in eng.on_window(w)]  # in event-time order
    dets += eng.apply_owner_messages()  # in process (DetectStage does this after each input)
    (oa,) = [d for d in dets if d.detector_id == "owner_aggregate"]
    _, rep = _engine_report(dets, recs, pol, oa)
    run = rep["training_run"]
    assert run["accelerators"] == {"H100": 8, "A100": 4} and run["device_count"] == 12
    assert run["workloads"] == ["wl-y", "wl-z"] and len(run["run_ids"]) == 2 and run["start"] == db.T0
    assert rep["compute"]["estimate_flop"] == oa.evidence["used_flop"] and rep["compute"]["band_high_flop"]
    assert "tensor-pipe activity x peak" in rep["compute"]["basis"]


def test_basis_text_names_each_basis_most_windows_first():
    assert basis_text({"utilisation_power": 1, "tensor_active": 3}) == (
        "tensor-pipe activity x peak (3 windows); utilisation and power (weaker) (1 window)")
    assert basis_text("utilisation_power") == "utilisation and power (weaker)"
    assert basis_text(None) == basis_text({}) == "not in evidence"
    # every basis a window or a run can carry has its own sentence (schemas/window_sums.py), none shown as a code
    assert set(get_args(ComputeBasis)) == {*BASES, "mixed"} and set(BASIS_TEXT) == {*BASES, "mixed"}
    text = basis_text({"unknown_accelerator": 2})
    assert "catalog" in text and text.endswith("(2 windows)")


def test_latest_figures_win_when_two_detections_share_the_crossing_time():
    early = {**RUN_EVIDENCE, "used_flop": 1.1e26, "run": {**RUN_EVIDENCE["run"], "end": T0 + 60}}
    late = {**RUN_EVIDENCE, "used_flop": 4.0e26, "run": {**RUN_EVIDENCE["run"], "end": T0 + 7200}}
    dets = [det("needs_review", reason="uncertain", evidence=late), det(evidence=early)]
    rep = draft_report(CaseBook(BIS).apply(dets, {"acct-1": cip()}, NOW).cases[0], BIS)
    assert rep["compute"]["estimate_flop"] == 4.0e26 and rep["training_run"]["end"] == T0 + 7200
