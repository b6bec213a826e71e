"""The whole pipeline in process on the simulator's `demo` scenario, judged against its ground truth."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from pipeline.runner import InProcessPipeline
from pipeline.simulator import simulate
from pipeline.sources import read_folder
from pipeline.store import Store
from schemas.case import REPORTABLE_STATUSES, Case
from schemas.policy import load_policy

W = 60.0
DAY = 86_400.0


@pytest.fixture(scope="module")
def demo_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return simulate("demo", tmp_path_factory.mktemp("demo") / "demo", seed=0)


def _run(folder: Path, store: Store) -> InProcessPipeline:
    # Processing time is pinned after the simulated period so that nothing depends on when the test runs.
    pipe = InProcessPipeline(store, load_policy("demo"), clock=lambda: 1_800_000_000.0)
    pipe.run(read_folder(folder))
    return pipe


def _subject(c: Case | dict) -> str:
    if isinstance(c, dict):
        return c["beneficial_owner_id"] or c["account_id"]
    return c.beneficial_owner_id or c.account_id


@pytest.fixture(scope="module")
def demo_run(demo_folder: Path, store_path: Path) -> Iterator[tuple[Store, InProcessPipeline]]:
    """One pipeline run over the demo, shared by the read-only checks below."""
    store = Store.connect(f"chdb://{store_path}", f"test_demo_{uuid.uuid4().hex[:8]}")
    try:
        yield store, _run(demo_folder, store)
    finally:
        store.drop_database()
        store.close()


def test_demo_cases_match_ground_truth(demo_folder: Path, demo_run: tuple[Store, InProcessPipeline]) -> None:
    store, _ = demo_run
    truth = orjson.loads((demo_folder / "ground_truth.json").read_bytes())
    expected = {_subject(e): e for e in truth["expected_cases"]["demo"]}
    cases = store.list_cases()
    reportable = {_subject(c): c for c in cases if c.status in REPORTABLE_STATUSES}

    assert len(expected) >= 3
    assert set(reportable) == set(expected), "no misses, no extras"
    for subject, e in expected.items():
        c = reportable[subject]
        assert c.knowledge_at is not None
        assert abs(c.knowledge_at - e["knowledge_at"]) <= W, (subject, c.knowledge_at, e["knowledge_at"])
        assert c.due_at == pytest.approx(c.knowledge_at + 15 * DAY)
        assert c.policy_id == "demo" and c.policy_version == load_policy("demo").version
        if e["beneficial_owner_id"]:
            assert c.beneficial_owner_id == e["beneficial_owner_id"] and c.reason == "owner_aggregate"
        if e["reason"] == "special_measures":
            assert c.reason == "special_measures"

    # The large U.S.-person run is recorded as monitored, never reportable.
    for m in truth["monitored"]["demo"]:
        assert m["account_id"] not in reportable
        assert any(c.account_id == m["account_id"] and c.status == "monitored" for c in cases)


def test_demo_shows_a_needs_review_case(demo_run: tuple[Store, InProcessPipeline]) -> None:
    """A foreign run over the threshold that the classifier cannot judge (a profiling-only exporter: no utilisation,
    no power) opens as needs_review with the customer inquiry; it never closes as not training (issue 14)."""
    store, _ = demo_run
    cases = [c for c in store.list_cases() if c.account_id == "acct-nl-vision"]
    assert [c.status for c in cases] == ["needs_review"]
    det = next(d for d in cases[0].evidence["detections"].values() if d["outcome"] == "needs_review")
    ev = det["evidence"]
    assert ev["classifier"]["band"] == "uncertain" and "no_utilisation_or_power" in ev["classifier"]["reasons"]
    assert {"power", "utilisation"} <= set(ev["classifier"]["missing"])
    assert "Please attest" in ev["suggested_inquiry"] and ev["basis"] == {"tensor_active": len(ev["windows"])}


def test_demo_dead_letters_are_kept_with_reasons(demo_folder: Path, demo_run: tuple[Store, InProcessPipeline]) -> None:
    store, pipe = demo_run
    truth = orjson.loads((demo_folder / "ground_truth.json").read_bytes())
    letters = store.query("SELECT reason, count() AS n FROM dead_letters FINAL GROUP BY reason")
    stored = sum(r["n"] for r in letters)
    counted = sum(v for k, v in pipe.result.counters.items() if k.startswith("dlq."))
    assert stored == counted > 0
    assert counted >= truth["counts"]["malformed"]
    assert {r["reason"] for r in letters} <= {"malformed_json", "schema_violation", "out_of_range", "bad_timestamp",
                                             "future_timestamp", "missing_id", "too_late"}


def test_demo_replay_is_idempotent(demo_folder: Path, demo_run: tuple[Store, InProcessPipeline]) -> None:
    """A second replay of the same input into the store of the module's run (last in this file: the checks above
    read that store as the first run left it) changes no case and adds no case event."""
    store, _ = demo_run
    before = {(c.case_id, c.version, c.status, c.knowledge_at) for c in store.list_cases()}
    events = store.query("SELECT count() AS n, uniqExact(event_id) AS u FROM case_events")[0]
    assert before and events["n"] == events["u"] > 0
    _run(demo_folder, store)  # a replay of the same input, e.g. after a restart from old offsets
    after = {(c.case_id, c.version, c.status, c.knowledge_at) for c in store.list_cases()}
    events2 = store.query("SELECT count() AS n, uniqExact(event_id) AS u FROM case_events")[0]
    assert after == before
    assert events2["u"] == events["u"] and events2["n"] == events2["u"]
