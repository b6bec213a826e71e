"""Shadow policies (issue 16): a shadow profile beside the live one over the demo's detect inputs, on chDB. Its
would-be cases are stored with status `shadow` (own ids, no due date, no events, nothing for the feed), the live
cases are exactly those of a run without it, a replay changes nothing, and `policy diff` reads the difference."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest
import typer
from confluent_kafka.admin import AdminClient
from typer.testing import CliRunner

from pipeline.cases.service import CaseService
from pipeline.classifier_loader import load_classifier
from pipeline.commands import policy_cmd
from pipeline.detect.stage import DetectStage
from pipeline.detect.topics import owners_topic
from pipeline.policy_ops import SHADOW, ShadowCaseService, ShadowTee, diff_cases, shadow_app_id, stored_shadows
from pipeline.runner import InProcessPipeline
from pipeline.simulator import simulate
from pipeline.sources import read_folder
from pipeline.store import Store
from schemas.policy import Thresholds, load_policy

DEMO = load_policy("demo")
# the same profile id at another version (the collision a shadow of the live profile risks), a higher threshold
# and no projection: it can only open fewer cases, or the same ones later
STRICT = DEMO.model_copy(update={"version": "2.0.0-shadow", "thresholds": Thresholds(
    training_ops=3e18, bio_training_ops=1e15, cluster_ops_per_s=1e17, cluster_network_gbps=100,
    count_projected=False)})


REPO = Path(__file__).resolve().parent.parent


def _strict_toml(folder: Path) -> Path:
    toml = folder / "strict.toml"
    toml.write_text((REPO / "schemas/policies/demo.toml").read_text()
                    .replace('version = "1.0.0"', 'version = "2.0.0-shadow"')
                    .replace("training_ops = 1e18", "training_ops = 3e18")
                    .replace("count_projected = true", "count_projected = false"))
    return toml


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
    toml = _strict_toml(store_path.parent)
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


_DUMP = ("import sys, orjson; from pipeline.store import Store\n"
         "s = Store.connect(sys.argv[1], sys.argv[2])\n"
         "sh = [[c.evidence['shadow']['book_case_id'], c.evidence['shadow']['status'], c.reason,"
         " c.beneficial_owner_id or c.account_id, c.evidence['shadow']['knowledge_at'], c.version]"
         " for c in s.list_cases(status=['shadow'])]\n"
         "n = {t: s.query(f'SELECT count() AS n FROM {t}')[0]['n'] for t in ('case_events', 'detections', 'windows')}\n"
         "print(orjson.dumps({'shadows': sh, 'live': len(s.list_cases()), **n}).decode())\n")


@pytest.mark.kafka
def test_shadow_detect_group_on_kafka_gives_the_replays_shadow_cases(tmp_path: Path, kafka_bootstrap: str,
                                                                      unique_topic, store: Store) -> None:
    """`run --stage detect --shadow POLICY`: its own group on the live worker's windows; its shadow cases are the
    in-process shadow's, and it writes nothing else: no live case, event, finding or window, nothing on the feed."""
    from tests.test_faust_detect import delivery_order, lag, produce, read_topic, reap, stage_topics, stop, wait_for

    folder = simulate("demo", tmp_path / "demo")
    toml = _strict_toml(tmp_path)
    strict = load_policy(toml)
    base = f"sh-{uuid.uuid4().hex[:8]}"
    shadow_id = shadow_app_id(base, strict)
    topics = stage_topics(unique_topic, kafka_bootstrap, "sh", shadow_id)
    topics["telemetry"] = unique_topic("sh-telemetry")
    db = f"shadow_{uuid.uuid4().hex[:10]}"
    env = {**os.environ, "TRAINWATCH_KAFKA__BOOTSTRAP_SERVERS": kafka_bootstrap, "TRAINWATCH_POLICY": "demo",
           "TRAINWATCH_CLICKHOUSE_DSN": f"chdb://{tmp_path / 'worker-store'}", "TRAINWATCH_DATABASE": db,
           "TRAINWATCH_DATA_DIR": str(tmp_path / "var"), "TRAINWATCH_MODEL_PATH": "rule",
           **{f"TRAINWATCH_TOPICS__{k.upper()}": t for k, t in topics.items()}}
    env.pop("TRAINWATCH_CONFIG", None)
    shadow_detections = f"{topics['detections']}.{shadow_id}"
    made = subprocess.run([sys.executable, "-m", "pipeline", "topics", "create", "--app-id", base, "--shadow",
                           str(toml)], env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert f"created {shadow_detections}" in made.stdout, made.stdout + made.stderr
    produce(kafka_bootstrap, topics, delivery_order(folder))
    log_path = tmp_path / "shadow.log"
    cmd = [sys.executable, "-m", "pipeline", "run", "--stage", "detect", "--app-id", base, "--shadow", str(toml)]
    try:
        with log_path.open("wb") as log:
            proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
            try:
                chain = [topics["windows"], topics["cip"], topics["allocations"], owners_topic(shadow_id),
                         shadow_detections]
                wait_for(lambda: lag(kafka_bootstrap, shadow_id, chain) == 0, "shadow group lag 0", proc, log_path,
                         180.0)
                stop(proc, 60)
            finally:
                reap(proc)
        got = orjson.loads(subprocess.run([sys.executable, "-c", _DUMP, env["TRAINWATCH_CLICKHOUSE_DSN"], db],
                                          cwd=REPO, capture_output=True, check=True, timeout=60).stdout)
    finally:
        AdminClient({"bootstrap.servers": kafka_bootstrap}).delete_topics([shadow_detections])

    # The reference: the same folder in process with the same shadow beside the live run.
    pipe = InProcessPipeline(store, DEMO, load_classifier("rule", DEMO))
    shadow_stage = DetectStage(strict, load_classifier("rule", strict), pipe.window.window_s,
                               pipe.window.allowed_lateness_s)
    pipe.detect = ShadowTee(pipe.detect, [(shadow_stage, ShadowCaseService(store, strict))], pipe.clock)  # type: ignore[assignment]
    pipe.run(read_folder(folder))
    expected = {(c.evidence[SHADOW]["book_case_id"], c.evidence[SHADOW]["status"], c.reason,
                 c.beneficial_owner_id or c.account_id, c.evidence[SHADOW]["knowledge_at"])
                for c in stored_shadows(store, strict.id, strict.version)}
    assert expected, "the strict shadow opens cases on the demo"
    tail = log_path.read_text(errors="replace")[-3000:]
    assert {tuple(r[:5]) for r in got["shadows"]} == expected, tail
    assert (got["live"], got["case_events"], got["detections"], got["windows"]) == (0, 0, 0, 0)
    assert read_topic(kafka_bootstrap, topics["cases"]) == []  # never on the feed


def test_owner_view_counts_no_shadow_case(store: Store):
    from pipeline.policy_ops import to_shadow
    from tests.test_cases_core import BIS, NOW, T0, cip, det

    store.upsert_cip([cip()])  # own-1, 60 %, foreign
    live = CaseService(store, BIS)
    live.process([det(t=T0, run=None, owner="own-1", reason="owner_aggregate", detector="owner_aggregate")], NOW)
    (case,) = store.list_cases()
    shadow_policy = BIS.model_copy(update={"version": "9-shadow"})
    store.upsert_cases([to_shadow(case.model_copy(update={"case_id": "book-1"}), shadow_policy)])
    row = store.query("SELECT owner_cases, reportable_owner_cases FROM compute_by_owner "
                      "WHERE policy_id = {p:String} AND owner_id = 'own-1'", {"p": BIS.id})[0]
    assert (row["owner_cases"], row["reportable_owner_cases"]) == (1, 1)
