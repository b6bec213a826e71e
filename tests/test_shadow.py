"""Shadow policies (issue 16): a shadow profile beside the live one over the demo's detect inputs, on chDB. Its
would-be cases are stored with status `shadow` (own ids, no due date, no events, nothing for the feed), the live
cases are exactly those of a run without it, a replay changes nothing, and `policy diff` reads the difference."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from typer.testing import CliRunner

from pipeline.cases.service import CaseService
from pipeline.commands import policy_cmd
from pipeline.detect.stage import DetectStage
from pipeline.policy_ops import SHADOW, ShadowCaseService, ShadowTee, diff_cases, stored_shadows
from pipeline.store import Store
from schemas.policy import Thresholds, load_policy

DEMO = load_policy("demo")
# the same profile id at another version (the collision a shadow of the live profile risks), a higher threshold
# and no projection: it can only open fewer cases, or the same ones later
STRICT = DEMO.model_copy(update={"version": "2.0.0-shadow", "thresholds": Thresholds(
    training_ops=3e18, bio_training_ops=1e15, cluster_ops_per_s=1e17, cluster_network_gbps=100,
    count_projected=False)})


def _run(store: Store, inputs: list[tuple[str, Any]], shadow: bool) -> list:
    """The runner's carrying (CIP records as applied, detections, identity), with the shadow tee in front."""
    live = CaseService(store, DEMO)
    stage: Any = DetectStage(DEMO)
    if shadow:
        stage = ShadowTee(stage, [(DetectStage(STRICT), ShadowCaseService(store, STRICT))], lambda: 1e9)
    take = {"win": stage.on_window, "cip": stage.on_cip, "alloc": stage.on_allocation}
    feed, cips = [], {}
    for out in [*(take[kind](ev) for kind, ev in inputs), stage.flush()]:
        cips |= {c.account_id: c for c in out.cips}
        feed += live.process(out.detections, 1e9, cips)
        for c in out.cips:
            feed += live.update_identity(c, 1e9)
    return feed


def _live(store: Store) -> set[tuple]:
    return {(c.case_id, c.status, c.reason, c.knowledge_at, c.due_at) for c in store.list_cases()}


def test_shadow_records_would_be_cases_beside_an_unchanged_live_run(store: Store, store_path: Path,
                                                                     demo_inputs: list[tuple[str, Any]]):
    store.upsert_cip([ev for kind, ev in demo_inputs if kind == "cip"])
    feed = _run(store, demo_inputs, shadow=True)
    shadows = stored_shadows(store, STRICT.id, STRICT.version)
    live = _live(store)
    assert shadows and live
    assert all(c.status == SHADOW and c.due_at is None and c.identity == {} for c in shadows)
    assert not {c.case_id for c in shadows} & {x[0] for x in live}  # same profile id, never the same case
    assert store.query("SELECT count() AS n FROM case_events WHERE case_id IN {ids:Array(String)}",
                       {"ids": [c.case_id for c in shadows]})[0]["n"] == 0
    assert {m.case.case_id for m in feed} <= {x[0] for x in live}  # the feed carries live cases only
    assert all(c.status != SHADOW for c in store.list_cases())  # nobody's queue shows them

    versions = {c.case_id: c.version for c in shadows}
    _run(store, demo_inputs, shadow=True)  # replay: nothing changes
    assert {c.case_id: c.version for c in stored_shadows(store, STRICT.id, STRICT.version)} == versions
    assert _live(store) == live

    d = diff_cases(store.list_cases(policy_id=DEMO.id), shadows)
    assert d["would_open"] == []  # a higher threshold opens nothing new
    assert d["counts"]["would_not_open"] + d["counts"]["dated_differently"] >= 1
    assert all(r["knowledge_delta_s"] > 0 for r in d["dated_differently"])  # ... and dates later
    assert any(r["reason"] == "special_measures" for r in d["same"])  # thresholds do not touch special measures

    app = typer.Typer()
    policy_cmd.register(app)
    app.command("noop")(lambda: None)
    toml = store_path.parent / "strict.toml"
    toml.write_text((Path(__file__).parents[1] / "schemas/policies/demo.toml").read_text()
                    .replace('version = "1.0.0"', 'version = "2.0.0-shadow"')
                    .replace("training_ops = 1e18", "training_ops = 3e18")
                    .replace("count_projected = true", "count_projected = false"))
    where = ["--store", f"chdb://{store_path}", "--database", store.database]
    r = CliRunner().invoke(app, ["policy", "diff", "demo", str(toml), "--json", *where])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["shadow"] == "demo@2.0.0-shadow" and out["counts"] == {k: v for k, v in d["counts"].items()}
    table = CliRunner().invoke(app, ["policy", "diff", "demo", str(toml), *where])
    assert "would_not_open" in table.output or "dated_differently" in table.output


def test_live_run_without_a_shadow_gives_the_same_live_cases(store: Store, demo_inputs: list[tuple[str, Any]]):
    store.upsert_cip([ev for kind, ev in demo_inputs if kind == "cip"])
    _run(store, demo_inputs, shadow=False)
    plain = _live(store)
    _run(store, demo_inputs, shadow=True)
    assert _live(store) == plain and stored_shadows(store, STRICT.id)
