"""Analyst labels (issue 16): closing a case records true/false positive with a reason code; precision per detector
and per classifier band comes from the stored labels; the labelled runs' windows export as JSONL; on chDB."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from pipeline.cases.core import CaseError, IllegalTransition, case_id_for
from pipeline.cases.service import CaseService
from pipeline.commands import cases_cmd, model_cmd
from pipeline.label_eval import current_labels, export_windows, precision_report
from pipeline.store import Store
from tests.test_cases_core import BIS, NOW, T0, cip, det
from tests.test_store import make_window


def _flag(svc: CaseService, account: str, band: str, detector: str = "compute_threshold") -> str:
    d = det(t=T0, account=account, detector=detector,
            evidence={"flop_used": 1.2e26, "classifier": {"band": band, "p_training": 0.9}})
    svc.process([d], NOW)
    return case_id_for(d)


def test_closing_records_labels_and_precision_per_detector_and_band(store: Store, tmp_path: Path):
    store.upsert_cip([cip("acct-1"), cip("acct-2"), cip("acct-3"), cip("acct-4")])
    svc = CaseService(store, BIS)
    tp = _flag(svc, "acct-1", "training")
    fp = _flag(svc, "acct-2", "uncertain")
    fp2 = _flag(svc, "acct-3", "training", detector="projection")
    still_open = _flag(svc, "acct-4", "training")
    store.insert_windows([make_window("acct-1-wl-1", "acct-1", T0 + 60 * i) for i in range(3)]
                         + [make_window("acct-2-wl-1", "acct-2", T0), make_window("other-wl", "acct-1", T0)])

    svc.report(tp, "alice", NOW + 10, "BIS-2026-0001")  # default: true_positive / reported
    svc.dismiss(fp, "bob", NOW + 10, "inference cluster", ("false_positive", "inference_or_serving"))
    svc.dismiss(fp2, "bob", NOW + 10, "below threshold after correction")  # default: false_positive / other
    closing = store.case_events(fp)[-1].details
    assert (closing["label"], closing["reason_code"]) == ("false_positive", "inference_or_serving")

    labels = current_labels(store)
    assert {lb.case_id for lb in labels} == {tp, fp, fp2}  # the open case has no label
    assert still_open not in {lb.case_id for lb in labels}
    rep = precision_report(labels)
    assert rep["overall"] == {"labelled": 3, "true_positive": 1, "false_positive": 2, "precision": 0.3333}
    assert rep["per_detector"]["compute_threshold"]["precision"] == 0.5
    assert rep["per_detector"]["projection"]["precision"] == 0.0
    assert rep["per_band"]["training"] == {"labelled": 2, "true_positive": 1, "false_positive": 1, "precision": 0.5}
    assert rep["per_band"]["uncertain"]["precision"] == 0.0
    assert rep["false_positive_reasons"] == {"inference_or_serving": 1, "other": 1}

    out = tmp_path / "labelled.jsonl"
    assert export_windows(store, labels, out) == 4  # 3 windows of the TP run + 1 of the FP run, not other-wl
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert {(x["label"], x["window"]["workload_id"]) for x in lines} == {
        ("true_positive", "acct-1-wl-1"), ("false_positive", "acct-2-wl-1")}

    # relabel a closed case (audited); an open one takes no label; bad codes are one-line errors
    svc.relabel(fp2, "carol", NOW + 20, ("false_positive", "below_threshold"))
    assert {lb.case_id: lb.reason_code for lb in current_labels(store)}[fp2] == "below_threshold"
    assert store.case_events(fp2)[-1].action == "labelled"
    with pytest.raises(IllegalTransition):
        svc.relabel(still_open, "carol", NOW + 20, ("true_positive", "reported"))
    with pytest.raises(CaseError, match="reason code"):
        svc.dismiss(still_open, "bob", NOW + 20, "x", ("false_positive", "because"))


def test_a_reopened_case_is_no_verdict(store: Store):
    store.upsert_cip([cip()])
    svc = CaseService(store, BIS)
    cid = _flag(svc, "acct-1", "uncertain")
    svc.dismiss(cid, "bob", NOW + 10, "looked like inference")
    assert len(current_labels(store)) == 1
    svc.process([det(t=T0 + 600, detector="owner_projection", reason="compute_projected")], NOW + 20)  # reopens
    assert store.get_case(cid).status == "open" and current_labels(store) == []


def test_cli_labels_and_evaluate_from_store(store: Store, store_path: Path, tmp_path: Path):
    store.upsert_cip([cip()])
    svc = CaseService(store, BIS)
    cid = _flag(svc, "acct-1", "training")
    store.insert_windows([make_window("acct-1-wl-1", "acct-1", T0)])
    app = typer.Typer()
    cases_cmd.register(app)
    model_cmd.register(app)
    where = ["--store", f"chdb://{store_path}", "--database", store.database]
    half = CliRunner().invoke(app, ["cases", "dismiss", cid, "--reason", "x", "--label", "false_positive", *where])
    assert half.exit_code != 0 and "together" in half.output
    r = CliRunner().invoke(app, ["cases", "dismiss", cid, "--reason", "a benchmark", "--label", "false_positive",
                                 "--reason-code", "known_good", "--at", str(NOW + 30), *where])
    assert r.exit_code == 0, r.output
    out = tmp_path / "w.jsonl"
    r = CliRunner().invoke(app, ["model", "evaluate", "--labels-from-store", "--json", "--export", str(out), *where])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output)
    assert rep["per_band"]["training"]["false_positive"] == 1 and rep["export"]["windows"] == 1
    assert json.loads(out.read_text())["reason_code"] == "known_good"
