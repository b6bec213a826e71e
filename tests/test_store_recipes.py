"""Every SQL block in docs/store.md runs against chDB over a replayed demo and returns what the doc says; the
default DSN works as written with plain clickhouse-connect."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline.classifier_loader import RULE, load_classifier
from pipeline.runner import InProcessPipeline
from pipeline.simulator import simulate
from pipeline.sources import read_folder
from pipeline.store import Store
from schemas.case import Case
from schemas.policy import load_policy

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "store.md"


def doc_recipes() -> list[str]:
    return re.findall(r"```sql\n(.*?)```", DOC.read_text(), re.S)


def _key(sql: str) -> str:
    first = sql.strip().splitlines()[0]
    return first.removeprefix("--").strip() if first.startswith("--") else first


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory, store_path: Path) -> Iterator[tuple[Store, InProcessPipeline]]:
    folder = simulate("demo", tmp_path_factory.mktemp("demo") / "demo", seed=0)
    store = Store.connect(f"chdb://{store_path}", f"test_recipes_{uuid.uuid4().hex[:8]}")
    policy = load_policy("demo")
    # The interim rule classifier keeps this test about the store, whatever model is packaged; the clock is now,
    # so "in the last day" holds for the letters.
    pipe = InProcessPipeline(store, policy, clock=time.time, classifier=load_classifier(RULE, policy))
    pipe.run(read_folder(folder))
    try:
        yield store, pipe
    finally:
        store.drop_database()
        store.close()


def _history(store: Store, rows: list[dict], params: dict) -> None:
    events = store.case_events(params["case_id"])
    assert [r["action"] for r in rows] == [e.action for e in events] and "opened" in [r["action"] for r in rows]


def _letters(store: Store, rows: list[dict], params: dict) -> None:
    expected = Counter((d.topic, d.reason) for d in store.dead_letters())
    assert {(r["topic"], r["reason"]): r["letters"] for r in rows} == dict(expected)
    assert sum(expected.values()) > 50  # the demo's deliberately bad telemetry


def _latest_figures(case: Case, key: str) -> float:
    return max(float((e.get("evidence") or {}).get(key) or 0.0) for e in case.evidence["detections"].values())


def _compute(store: Store, rows: list[dict], params: dict) -> None:
    cases = {c.case_id: c for c in store.list_cases(status=["open"])
             if c.reason in ("compute_used", "compute_projected")}
    assert cases and [r["case_id"] for r in rows] == sorted(cases)
    for r in rows:
        c = cases[r["case_id"]]
        assert r["used_flop"] == _latest_figures(c, "used_flop") > 0
        assert r["projected_flop"] == _latest_figures(c, "projected_flop")
        if r["reason"] == "compute_projected":
            assert r["projected_flop"] >= load_policy("demo").thresholds.training_ops


def _due(store: Store, rows: list[dict], params: dict) -> None:
    due = [c for c in store.list_cases(status=["open", "needs_review", "acknowledged"], policy_id=params["policy_id"])]
    assert [r["case_id"] for r in rows] == [c.case_id for c in sorted(due, key=lambda c: c.due_at)]
    assert rows and all(isinstance(r["days_left"], int) for r in rows)


def _accounts(store: Store, rows: list[dict], params: dict) -> None:
    windows = store.list_windows()
    per_account = {r["account_id"]: r for r in rows}
    for acct in {w.account_id for w in windows}:
        mine = [w for w in windows if w.account_id == acct]
        assert per_account[acct]["windows"] == len({(w.workload_id, w.window_start) for w in mine})
        assert per_account[acct]["partials"] == len(mine)
        assert per_account[acct]["flop"] == pytest.approx(sum(w.flop for w in mine), rel=1e-12)


def _owners(store: Store, rows: list[dict], params: dict) -> None:
    owners = {r["owner_id"] for r in rows}
    # The demo's U.S. owner (own-us-1, 70 % of acct-us-fo) is not foreign; its foreign co-owner (30 %) is.
    assert "own-us-1" not in owners and "own-cn-1" in owners
    assert "own-shared-7" in owners and next(r for r in rows if r["owner_id"] == "own-shared-7")["accounts"] == 2


def _activity(store: Store, rows: list[dict], params: dict) -> None:
    from detectors.windows import merge_partials

    mine = [w for w in store.list_windows() if w.account_id == params["account_id"]]
    groups: dict[tuple[str, float], list] = {}
    for w in mine:
        groups.setdefault((w.workload_id, w.window_start), []).append(w)
    assert [(r["workload_id"], r["window_start"]) for r in rows] == sorted(groups)
    for r in rows:
        merged = merge_partials(groups[(r["workload_id"], r["window_start"])])
        f = merged.features
        assert r["tensor_active"] == pytest.approx(f["mean_tensor"], rel=1e-9) and 0 < r["tensor_active"] <= 1
        assert r["gpu_util"] == pytest.approx(f["mean_gpu_util"], rel=1e-9)
        assert r["power_w"] == pytest.approx(f["mean_power_watts"], rel=1e-9)
        assert r["flop_low"] <= r["flop"] <= r["flop_high"] and r["flop"] == pytest.approx(merged.flop, rel=1e-12)


CHECKS: dict[str, tuple[Callable[[Store, list[dict], dict], None], Callable[[Store], dict[str, Any]]]] = {
    "a case's history": (_history, lambda s: {"case_id": s.list_cases(status=["open"])[0].case_id}),
    "dead letters by topic and reason in the last day (at = when it was dead-lettered)": (_letters, lambda s: {}),
    "the compute estimates of open compute cases: the latest (largest) figures over the case's detections":
        (_compute, lambda s: {}),
    "reportable cases due soonest under one policy, with days left": (_due, lambda s: {"policy_id": "demo"}),
    "compute per account: workload-windows, not partial rows": (_accounts, lambda s: {}),
    "foreign beneficial owners under one policy, largest compute first": (_owners, lambda s: {"policy_id": "demo"}),
    "activity and compute per workload-window of one account: partials combined, each mean weighted by its seconds":
        (_activity, lambda s: {"account_id": "acct-de-ai"}),
}


def test_every_recipe_has_a_check() -> None:
    assert sorted(_key(sql) for sql in doc_recipes()) == sorted(CHECKS)


@pytest.mark.parametrize("sql", doc_recipes(), ids=_key)
def test_doc_recipe_returns_what_it_says(demo: tuple[Store, InProcessPipeline], sql: str) -> None:
    store, _ = demo
    key = _key(sql)
    check, params = CHECKS[key]
    rows = store.query(sql.strip().rstrip(";"), params(store))
    assert rows, key
    check(store, rows, params(store))


_DSN_SCRIPT = """
import os, sys, clickhouse_connect
from pipeline.settings import load_settings
from pipeline.store import Store
dsn = load_settings().clickhouse_dsn
with Store.connect(dsn, "trainwatch") as s:
    s.insert_windows([])
    n = s.query("SELECT count() AS n FROM policy_foreign_tests FINAL")[0]["n"]
client = clickhouse_connect.get_client(dsn=dsn)
client.database = "trainwatch"
m = client.query("SELECT count() FROM policy_foreign_tests FINAL").result_rows[0][0]
client.close()
print(dsn, n, m, sorted(os.listdir(".")))
"""


def test_default_dsn_works_as_written_with_clickhouse_connect(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINWATCH_")}
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run([sys.executable, "-c", _DSN_SCRIPT], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    dsn, n, m, listing = out.stdout.split(" ", 3)
    assert dsn == "chdb:./var/trainwatch.chdb" and int(n) == int(m) >= 3  # both clients saw the same tables
    assert listing.strip() == "['var']"  # the store under ./var, no tmp/ (or any other) folder beside it
    assert (tmp_path / "var" / "trainwatch.chdb").is_dir()
