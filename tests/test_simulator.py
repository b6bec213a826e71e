"""The fleet simulator: determinism, ground-truth FLOP against the documented formula, archetype signatures,
stream imperfections as configured, and the demo's promised cases."""

from __future__ import annotations

import time
import uuid
from collections import defaultdict
from pathlib import Path

import numpy as np
import orjson
import pytest
from confluent_kafka import Consumer
from typer.testing import CliRunner

from detectors.catalog import resolve
from detectors.compute import estimate_flop
from pipeline.simulator import iter_columns, simulate
from pipeline.simulator.archetypes import render
from pipeline.simulator.scenarios import T0, build
from pipeline.simulator.workload import Workload
from schemas.errors import InvalidMessage
from schemas.policy import load_policy, shipped_policies
from schemas.serde import decode
from schemas.telemetry import TelemetrySample

NOW = {"now": T0 + 86_400.0}


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return simulate("demo", tmp_path_factory.mktemp("demo") / "out", seed=3, columnar=True)


@pytest.fixture(scope="module")
def demo_gt(demo_dir: Path) -> dict:
    return orjson.loads((demo_dir / "ground_truth.json").read_bytes())


@pytest.fixture(scope="module")
def demo_samples(demo_dir: Path) -> tuple[list[TelemetrySample], int]:
    good, bad = [], 0
    for line in (demo_dir / "telemetry.jsonl").read_bytes().splitlines():
        try:
            good.append(decode(TelemetrySample, line, context=NOW))
        except InvalidMessage:
            bad += 1
    return good, bad


def test_same_seed_gives_byte_identical_files(demo_dir: Path, tmp_path: Path) -> None:
    again = simulate("demo", tmp_path / "again", seed=3, columnar=True)
    for f in sorted(p.name for p in demo_dir.iterdir()):
        assert (again / f).read_bytes() == (demo_dir / f).read_bytes(), f
    other = simulate("demo", tmp_path / "other", seed=4)
    assert (other / "telemetry.jsonl").read_bytes() != (demo_dir / "telemetry.jsonl").read_bytes()


def test_every_line_is_a_valid_sample_or_a_counted_malformed_one(demo_samples, demo_gt) -> None:
    good, bad = demo_samples
    c = demo_gt["counts"]
    assert bad == c["malformed"] > 0
    assert len(good) == c["samples"] + c["duplicates"]
    keys = [(s.device, s.ts) for s in good]
    assert len(keys) - len(set(keys)) == c["duplicates"] > 0
    ts = np.array([s.ts for s in good])
    assert int((np.diff(ts) < 0).sum()) > 0, "late samples must arrive out of order"


def test_true_flop_equals_the_formula_over_the_written_samples(demo_samples, demo_gt) -> None:
    good, _ = demo_samples
    seen: set[tuple[str, float]] = set()
    by_wl: dict[str, list[TelemetrySample]] = defaultdict(list)
    for s in good:
        if (s.device, s.ts) not in seen:
            seen.add((s.device, s.ts))
            by_wl[s.workload_id].append(s)  # type: ignore[index]
    checked = 0
    for w in demo_gt["workloads"]:
        rows = by_wl[w["workload_id"]]
        assert len(rows) == w["samples"]
        if w["smi_only_nodes"] or not w["precision_reported"] or not rows:
            continue
        acc = resolve(rows[0].accelerator)
        n = len(rows)
        nan = np.full(n, np.nan)
        peak = np.array([acc.peak(r.precision) for r in rows])
        point, _, _, basis = estimate_flop(np.array([r.interval_s for r in rows]), peak, peak, peak,
                                           np.array([r.tensor_active for r in rows]), nan, nan)
        assert (basis == 2).all()
        assert point.sum() == pytest.approx(w["true_flop"], rel=1e-9)
        checked += 1
    assert checked >= 4


def test_used_crossing_is_the_exact_sample_time(demo_samples, demo_gt) -> None:
    good, _ = demo_samples
    T = load_policy("demo").thresholds.training_ops
    runs = {w["workload_id"]: w["run_id"] for w in demo_gt["workloads"]}
    used = [c for c in demo_gt["expected_cases"]["demo"] if c["reason"] == "compute_used"]
    de = next(c for c in used if c["account_id"] == "acct-de-ai")
    seen, rows = set(), []
    for s in good:
        if runs[s.workload_id] == de["run_id"] and (s.device, s.ts) not in seen:
            seen.add((s.device, s.ts))
            rows.append((s.ts, s.interval_s * resolve(s.accelerator).peak(s.precision) * s.tensor_active))
    rows.sort(key=lambda r: r[0])
    cum = np.cumsum([f for _, f in rows])
    assert rows[int(np.argmax(cum >= T))][0] == de["knowledge_at"]


def test_demo_has_the_promised_cases(demo_gt) -> None:
    pol = load_policy("demo")
    cases = demo_gt["expected_cases"]["demo"]
    reasons = {c["reason"] for c in cases}
    assert len([c for c in cases if c["run_id"]]) >= 3
    assert {"compute_used", "compute_projected", "owner_aggregate", "special_measures"} <= reasons
    assert all(c["due_at"] == c["knowledge_at"] + 15 * 86_400 for c in cases)
    assert all((c["run_id"] is None) == (c["reason"] == "special_measures") for c in cases)
    assert demo_gt["monitored"]["demo"], "a large U.S.-person run must be monitored"
    us = {a["account_id"] for a in demo_gt["accounts"] if not a["foreign"]["demo"]}
    assert {c["account_id"] for c in demo_gt["monitored"]["demo"]} <= us
    assert not {c["account_id"] for c in cases if c["reason"] != "owner_aggregate"} & us
    wl = demo_gt["workloads"]
    # Preemption: one run, two jobs; scope change: serving then training in one account.
    run_jobs = defaultdict(set)
    for w in wl:
        run_jobs[w["run_id"]].add(w["job_id"])
    assert any(len(j) >= 2 for j in run_jobs.values())
    scope = [w for w in wl if w["account_id"] == "acct-scope"]
    assert {w["is_training"] for w in scope} == {False, True}
    # Foreign non-training workloads stay below the threshold even projected (classifier-independent cases).
    foreign = {a["account_id"] for a in demo_gt["accounts"] if a["foreign"]["demo"]}
    for w in wl:
        if w["account_id"] in foreign and not w["is_training"]:
            assert w["max_projected_flop"] < pol.thresholds.training_ops, w["workload_id"]
    # The split run: each part under the threshold, the owner's sum over it.
    owner = next(c for c in cases if c["reason"] == "owner_aggregate")
    parts = [w for w in wl if w["account_id"] in ("acct-split-a", "acct-split-b")]
    assert all(w["true_flop"] < pol.thresholds.training_ops for w in parts)
    assert sum(w["true_flop"] for w in parts) >= pol.thresholds.training_ops
    assert owner["beneficial_owner_id"] == "own-shared-7"
    assert set(demo_gt["expected_cases"]) == set(shipped_policies())
    assert [c["reason"] for c in demo_gt["expected_cases"]["bis-2024-proposed"]] == []


def test_demo_profiling_only_exporter_sends_no_utilisation_or_power(demo_samples, demo_gt) -> None:
    """The demo's needs_review run (acct-nl-vision): tensor activity and memory, no utilisation, power, clocks or
    energy in any line; every other workload keeps its tier's fields."""
    good, _ = demo_samples
    nl = {w["workload_id"] for w in demo_gt["workloads"] if w["account_id"] == "acct-nl-vision"}
    assert len(nl) == 1 and next(w for w in demo_gt["workloads"] if w["workload_id"] in nl)["is_training"]
    mine = [s for s in good if s.workload_id in nl]
    others = [s for s in good if s.workload_id not in nl]
    assert mine and all(s.tensor_active is not None and s.fb_used_mib is not None for s in mine)
    dropped = ("gpu_util", "mem_copy_util", "power_w", "energy_mj", "sm_clock_mhz", "mem_clock_mhz")
    assert all(getattr(s, f) is None for s in mine for f in dropped)
    assert sum(s.power_w is not None for s in others) > 0.9 * len(others)


def _node_sync(cols: list[dict[str, np.ndarray]], wl: int) -> float:
    """Mean pairwise correlation, across nodes, of per-node mean tensor activity (first differences)."""
    ts = np.concatenate([c["ts"][c["workload"] == wl] for c in cols])
    node = np.concatenate([c["node"][c["workload"] == wl] for c in cols])
    ta = np.concatenate([c["true_tensor_active"][c["workload"] == wl] for c in cols])
    nodes, times = np.unique(node), np.unique(ts)
    grid = np.full((nodes.size, times.size), np.nan)
    s = np.zeros_like(grid)
    k = np.zeros_like(grid)
    np.add.at(s, (np.searchsorted(nodes, node), np.searchsorted(times, ts)), ta)
    np.add.at(k, (np.searchsorted(nodes, node), np.searchsorted(times, ts)), 1)
    grid = s / np.maximum(k, 1)
    ok = (k > 0).all(axis=0)
    d = np.diff(grid[:, ok], axis=1)
    c = np.corrcoef(d)
    return float(c[np.triu_indices(nodes.size, 1)].mean())


def test_pretraining_gpus_move_together_across_nodes_serving_replicas_do_not() -> None:
    sc = build("demo", 0)
    cols = list(iter_columns("demo", 0))
    pre = next(w.index for w in sc.workloads if w.archetype == "pretrain" and len(w.nodes) >= 4)
    srv = next(w.index for w in sc.workloads if w.archetype == "serving" and len(w.nodes) >= 3)
    assert _node_sync(cols, pre) > 0.8
    assert abs(_node_sync(cols, srv)) < 0.3


def test_serving_is_diurnal_and_lora_shows_low_utilisation() -> None:
    t = T0 + np.arange(0, 86_400, 60.0)
    w = Workload(0, "wl", "job", "run", 0, "serving", "H100", [0], 8, T0, T0 + 86_400, 60.0, "fp8", True, None,
                 0.15, 0.36, 1, params={"peak_hour": 15.0, "depth": 0.7})
    cols = render(w, t, np.random.default_rng(0), 700.0, 80.0, 3200.0)
    hour = ((np.repeat(t, 8) % 86_400) // 3600).astype(int)
    day, night = cols["tensor_active"][(hour >= 12) & (hour < 18)], cols["tensor_active"][hour < 6]
    assert day.mean() > 2 * night.mean()
    lora = Workload(0, "wl", "job", "run", 0, "finetune_lora", "A100", [0], 8, T0, T0 + 86_400, 60.0, "bf16", True,
                    None, 0.08, 0.23, 2)
    lc = render(lora, t, np.random.default_rng(0), 400.0, 80.0, 1600.0)
    assert 5.0 < lc["gpu_util"].mean() < 15.0
    assert 0.18 < lc["power_w"].mean() / 400.0 < 0.3


def _job(arch: str, gpus: int, family: str = "hopper-cloud", **params: float) -> Workload:
    return Workload(0, "wl", "job", "run", 0, arch, "H100", [0], gpus, T0, T0 + 86_400, 10.0, "bf16", True, None,
                    0.3, 0.4, 7, source_family=family, params=dict(params))


def test_realism_low_load_serving_single_gpu_training_and_idle_clocks() -> None:
    """Issue 14's overlaps: serving at low load sits where input-bound training does (utilisation 5-30 %, memory
    mostly free, low power); a job on one GPU of a node has no NVLink peer; an idle GPU may hold its clock."""
    t = T0 + np.arange(0, 6 * 3600, 10.0)
    srv = render(_job("serving", 1, variant="low_load"), t, np.random.default_rng(0), 700.0, 80.0, 3200.0)
    assert 3.0 < srv["gpu_util"].mean() < 30.0
    assert srv["fb_used_mib"].mean() / (80.0 * 1024) < 0.4
    assert srv["power_w"].mean() / 700.0 < 0.3
    assert srv["tensor_active"].mean() < 0.05  # decode of a few requests: little matrix math
    one = render(_job("finetune_full", 1), t, np.random.default_rng(0), 700.0, 80.0, 3200.0)
    eight = render(_job("finetune_full", 8), t, np.random.default_rng(0), 700.0, 80.0, 3200.0)
    assert one["nvlink_tx_bytes"].max() == 0 and eight["nvlink_tx_bytes"].mean() > 1e9
    assert one["gpu_util"].mean() == pytest.approx(eight["gpu_util"][:: 8].mean(), rel=0.05)  # the work is the same
    # the idle clock is the node's (application clocks held or not), drawn per job whatever its class
    held = []
    for key in range(40):
        w = _job("idle_reserved", 8)
        w.sync_key = key
        clk = render(w, t[:10], np.random.default_rng(0), 700.0, 80.0, 3200.0)["sm_clock_mhz"]
        held.append(bool(clk.min() > 0.5 * 1980))
    assert 0.2 < np.mean(held) < 0.8
    default = _job("idle_reserved", 8, family="default")
    assert render(default, t[:10], np.random.default_rng(0), 700.0, 80.0, 3200.0)["sm_clock_mhz"].max() < 400


def test_random_mix_gives_training_1_to_8_gpus_per_node_and_every_serving_variant() -> None:
    sc = build("eval", 11, scale=3.0)
    gpus = {w.gpus_per_node for w in sc.workloads if w.archetype in ("finetune_full", "diffusion_train")}
    assert {1, 2, 4, 8} <= gpus
    assert {w.variant for w in sc.workloads if w.archetype == "serving"} == {None, "busy_flat", "low_load"}


def test_shares_of_smi_nodes_and_malformed_messages_are_as_configured(tmp_path: Path) -> None:
    out = simulate("eval", tmp_path / "e", seed=1, scale=0.25, smi_share=0.5, malformed_share=0.02)
    m = orjson.loads((out / "manifest.json").read_bytes())
    gt = orjson.loads((out / "ground_truth.json").read_bytes())
    c = m["counts"]
    assert c["malformed"] / (c["lines"]) == pytest.approx(0.02, rel=0.15)
    assert np.mean([n["smi_only"] for n in gt["fleet"]]) == pytest.approx(0.5, abs=0.03)
    assert 0.1 < c["smi_only_samples"] / c["samples"] < 0.9
    archetypes = {w["archetype"] for w in gt["workloads"]}
    assert len(archetypes) == 11
    assert len({w["source_family"] for w in gt["workloads"]}) >= 3
    assert {w["interval_s"] for w in gt["workloads"]} >= {1.0, 60.0}


def test_cli_prints_counts_and_rate(tmp_path: Path) -> None:
    from pipeline.cli import _register_all, app

    _register_all()
    res = CliRunner().invoke(app, ["simulate", "demo", "--out", str(tmp_path / "d"), "--seed", "2"])
    assert res.exit_code == 0, res.output
    assert "samples/s" in res.output and "malformed" in res.output
    assert (tmp_path / "d" / "ground_truth.json").is_file()


@pytest.mark.kafka
def test_kafka_output_keys_telemetry_by_node(kafka_bootstrap: str, unique_topic, tmp_path: Path) -> None:
    from pipeline.settings import load_settings
    from pipeline.simulator.kafka_out import KafkaOut
    from pipeline.simulator.writer import write

    topics = {k: unique_topic(k) for k in ("telemetry", "allocations", "cip")}
    settings = load_settings(kafka={"bootstrap_servers": kafka_bootstrap}, topics=topics)
    sc = build("demo", 5, malformed_share=0.0)
    sc.workloads = sc.workloads[:3]  # a few thousand messages are enough
    sc.__dict__.pop("_starts", None)
    sc.__dict__.pop("_ends", None)
    out = KafkaOut(settings, sc)
    manifest, _ = write(sc, tmp_path / "k", sink=out.telemetry)
    out.finish()
    consumer = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": uuid.uuid4().hex,
                         "auto.offset.reset": "earliest"})
    consumer.subscribe([topics["telemetry"]])
    got, deadline = 0, time.monotonic() + 60
    try:
        while got < manifest["counts"]["lines"] and time.monotonic() < deadline:
            for msg in consumer.consume(1000, timeout=1.0):
                if msg.error() is None:
                    assert orjson.loads(msg.value())["node"] == msg.key().decode()
                    got += 1
    finally:
        consumer.close()
    assert got == manifest["counts"]["lines"]


def test_scope_scenario_labels_are_deterministic_and_well_formed(tmp_path: Path) -> None:
    from pipeline.simulator.scope_scenario import CHANGE_KINDS, CONTROL_KINDS, DURATION_S

    sc = build("scope", seed=0)
    assert build("scope", seed=0).scope_labels == sc.scope_labels
    assert build("scope", seed=1).scope_labels != sc.scope_labels
    labels = {x["account_id"]: x for x in sc.scope_labels or ()}
    assert sorted(labels) == sorted(a.account_id for a in sc.accounts)  # every account labelled, once
    kinds = [x["kind"] for x in labels.values()]
    want = {**dict.fromkeys(CHANGE_KINDS, 3), **dict.fromkeys(CONTROL_KINDS, 2)}
    assert {k: kinds.count(k) for k in set(kinds)} == want
    node = sc.fleet.nodes
    for aid, lab in labels.items():
        ws = [w for w in sc.workloads if sc.accounts[w.account].account_id == aid]
        assert ws and lab["first_use"] == min(w.start for w in ws)
        smi = {node[n].smi_only for w in ws for n in w.nodes}
        assert smi == {lab["tier"] == "smi"}, aid  # the tier in the label is the tier of every node used
        t_c = lab["t_change"]
        assert lab["change"] == (t_c is not None) == (lab["kind"] in CHANGE_KINDS)
        if t_c is None:
            training = {w.is_training for w in ws}
            assert training == {lab["kind"] == "steady_training"}, aid
            continue
        assert lab["first_use"] + 3600 <= t_c <= T0 + DURATION_S - 3600  # a baseline before, time to see after
        if lab["kind"] == "reservation_growth":
            assert not any(w.is_training for w in ws)
            grow = [e for e in sc.allocations if e.account_id == aid and e.kind == "reservation_changed"]
            held = sum(w.device_count for w in ws)
            assert [e.ts for e in grow] == [t_c] and grow[0].count >= 4 * held
        elif lab["kind"] == "inference_to_finetune":  # same order of size: 4 GPUs serving, then 8 fine-tuning
            assert [(w.archetype, w.device_count, w.start == t_c) for w in sorted(ws, key=lambda w: w.start)] == [
                ("serving", 4, False), ("finetune_full", 8, True)]
        else:  # pretraining begins at t_change, >= 4x the devices in use before (serving, or fine-tuning)
            big = min((w for w in ws if w.archetype == "pretrain"), key=lambda w: w.start)
            prior = [w for w in ws if w.start < t_c]
            assert big.start == t_c and prior and big.device_count >= 4 * sum(w.device_count for w in prior)
            want_prior = {"finetune_full"} if lab["kind"] == "finetune_to_pretrain" else {"serving"}
            assert {w.archetype for w in prior} == want_prior, aid
    # Written to ground_truth.json; the other scenarios carry no such key (their files are unchanged).
    gt = orjson.loads((simulate("scope", tmp_path / "s", seed=0, scale=0.25) / "ground_truth.json").read_bytes())
    assert {x["account_id"] for x in gt["scope_changes"]} == {w["account_id"] for w in gt["workloads"]}
    assert len(gt["scope_changes"]) == len(CHANGE_KINDS) + len(CONTROL_KINDS)
    assert "scope_changes" not in orjson.loads((simulate("demo", tmp_path / "d", seed=0) / "ground_truth.json"
                                                ).read_bytes())
