"""Customer attestations (issue 16): a needs_review case sends its inquiry on the feed, the customer's answer moves
the case (audited), an unanswered inquiry escalates at the policy's deadline, once; on a real chDB store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from pipeline.cases.core import INQUIRY_ESCALATED, INQUIRY_SENT, CaseError, IllegalTransition, case_id_for
from pipeline.cases.service import CaseService
from pipeline.commands import cases_cmd
from pipeline.store import Store
from schemas.policy import Inquiry
from tests.test_cases_core import BIS, DAY, EU, NOW, T0, cip, det


def _review_case(store: Store, policy=BIS) -> tuple[CaseService, str, list]:
    store.upsert_cip([cip()])
    svc = CaseService(store, policy)
    finding = det("needs_review", t=T0, reason="uncertain", policy=policy)
    msgs = svc.process([finding], NOW)
    return svc, case_id_for(finding), msgs


def test_needs_review_sends_its_inquiry_through_the_feed_once(store: Store):
    svc, cid, msgs = _review_case(store)
    assert [m.change.action for m in msgs] == ["opened", INQUIRY_SENT]
    sent = msgs[1]
    assert sent.change.details["respond_by"] == T0 + 10 * DAY  # inquiry.respond_days
    assert "Ask the customer" in sent.change.details["inquiry"]
    case = store.get_case(cid)
    assert case.evidence["inquiry"]["open"] is True and case.evidence["inquiry"]["sent_at"] == T0
    assert svc.process([det("needs_review", t=T0, reason="uncertain")], NOW + 1) == []  # replay
    assert [e.action for e in store.case_events(cid)] == ["opened", INQUIRY_SENT]


def test_unanswered_inquiry_escalates_at_the_deadline_once(store: Store):
    svc, cid, _ = _review_case(store)
    assert [m for m in svc.tick(T0 + 10 * DAY - 1, NOW + 1) if m.change.action == INQUIRY_ESCALATED] == []
    msgs = [m for m in svc.tick(T0 + 10 * DAY + 1, NOW + 2) if m.change.action == INQUIRY_ESCALATED]
    assert len(msgs) == 1 and msgs[0].change.at == T0 + 10 * DAY
    assert store.get_case(cid).status == "needs_review"  # the default only escalates
    assert [m for m in svc.tick(T0 + 11 * DAY, NOW + 3) if m.change.action == INQUIRY_ESCALATED] == []
    restarted = CaseService(store, BIS)
    assert [m for m in restarted.tick(T0 + 12 * DAY, NOW + 4) if m.change.action == INQUIRY_ESCALATED] == []
    assert [e.action for e in store.case_events(cid)].count(INQUIRY_ESCALATED) == 1


def test_policy_may_open_an_unanswered_case_as_training(store: Store):
    eu_open = EU.model_copy(update={"inquiry": Inquiry(respond_days=5, on_timeout="open")})
    svc, cid, _ = _review_case(store, eu_open)
    assert store.get_case(cid).knowledge_at is None  # needs_review is not knowledge under this profile
    svc.tick(T0 + 6 * DAY, NOW + 1)
    case = store.get_case(cid)
    assert case.status == "open" and case.knowledge_at == T0 + 5 * DAY


def test_attestation_yes_opens_keeping_counted_knowledge_and_no_closes(store: Store):
    svc, cid, _ = _review_case(store)
    msgs = svc.attest(cid, "alice", NOW + 10, True, "ATT-2026-001")
    case = store.get_case(cid)
    assert case.status == "open" and case.knowledge_at == T0  # already counted under BIS: never moves later
    assert msgs[0].change.action == "attested" and msgs[0].change.details["document"] == "ATT-2026-001"
    assert case.evidence["inquiry"]["open"] is False and case.evidence["inquiry"]["training"] is True
    with pytest.raises(IllegalTransition):
        svc.attest(cid, "alice", NOW + 20, False, "ATT-2")
    # escalation never fires for an answered inquiry
    assert [m for m in svc.tick(T0 + 20 * DAY, NOW + 30) if m.change.action == INQUIRY_ESCALATED] == []


def test_attestation_yes_under_a_policy_without_uncertain_knowledge_starts_the_clock_then(store: Store):
    svc, cid, _ = _review_case(store, EU)
    svc.attest(cid, "alice", NOW + 10, True, "ATT-9")
    case = store.get_case(cid)
    assert case.knowledge_at == NOW + 10 and case.due_at == NOW + 10 + 14 * DAY


def test_cli_attest_no_closes_as_not_training_with_the_document(store: Store, store_path: Path):
    _, cid, _ = _review_case(store)
    app = typer.Typer()
    cases_cmd.register(app)
    where = ["--store", f"chdb://{store_path}", "--database", store.database]
    bad = CliRunner().invoke(app, ["cases", "attest", cid, "--training", "maybe", "--document", "X", *where])
    assert bad.exit_code != 0
    blank = CliRunner().invoke(app, ["cases", "attest", cid, "--training", "no", "--document", " ", *where])
    assert isinstance(blank.exception, CaseError)
    r = CliRunner().invoke(app, ["cases", "attest", cid, "--training", "no", "--document", "ATT-7", "--actor",
                                 "bob", "--at", str(NOW + 60), "--json", *where])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["case"]["status"] == "dismissed" and "ATT-7" in out["case"]["dismiss_reason"]
    ev = out["events"][0]
    assert ev["action"] == "attested" and ev["actor"] == "bob" and ev["details"]["training"] is False
    assert out["case"]["evidence"]["inquiry"]["document"] == "ATT-7"
