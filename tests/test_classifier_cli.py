"""`trainwatch classify` output schema and `trainwatch model evaluate` on a small scenario."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from detectors.compute import MFU_HIGH, MFU_LOW, MFU_POINT, unknown_accelerator_peaks
from pipeline.cli import _register_all, app
from schemas.serde import dumps, loads

_register_all()
runner = CliRunner()
T0 = 1_767_225_600.0  # 2026-01-01


def _samples(workload: str, account: str, n_dev: int, seconds: int, interval: float, fields: dict) -> list[bytes]:
    out = []
    for d in range(n_dev):
        for i in range(int(seconds / interval)):
            out.append(dumps({"ts": T0 + i * interval, "node": f"n{d // 8}", "device": f"GPU-{workload}-{d}",
                              "accelerator": "NVIDIA H100 80GB HBM3", "workload_id": workload,
                              "account_id": account, "interval_s": interval, **fields}))
    return out


def test_classify_json_schema(tmp_path):
    lines = _samples("wl-a", "acct-1", 16, 600, 10.0, {"tensor_active": 0.5, "gpu_util": 95.0, "power_w": 600.0})
    lines += _samples("wl-b", "acct-2", 1, 300, 0.5, {"gpu_util": 40.0, "fb_used_mib": 9000.0})  # smi subset
    lines += [b"{not json", b'{"ts": 1, "node": "x"}']
    f = tmp_path / "t.jsonl"
    f.write_bytes(b"\n".join(lines) + b"\n")
    res = runner.invoke(app, ["classify", str(f), "--json"])
    assert res.exit_code == 1, res.output  # rejected lines fail the run unless told otherwise
    assert "line 2" not in res.stderr and "not JSON" in res.stderr
    res = runner.invoke(app, ["classify", str(f), "--json", "--allow-errors", "--errors", str(tmp_path / "e.tsv")])
    assert res.exit_code == 0, res.output
    errs = (tmp_path / "e.tsv").read_text().splitlines()
    assert len(errs) == 2 and all(e.split("\t")[0].isdigit() for e in errs)
    rows = [loads(x) for x in res.stdout.splitlines() if x.startswith("{")]
    assert [r["workload_id"] for r in rows] == ["wl-a", "wl-b"]
    for r in rows:
        assert set(r) >= {"workload_id", "account_id", "p_training", "band", "flop", "flop_low", "flop_high",
                          "basis", "device_count", "duration_s", "top_features", "model_id", "model_version"}
        assert 0.0 <= r["p_training"] <= 1.0 and r["band"] in ("training", "not_training", "uncertain")
        assert r["flop_low"] <= r["flop"] <= r["flop_high"]
    a, b = rows
    assert a["device_count"] == 16 and a["basis"] == "tensor_active" and a["model_id"].endswith("/full")
    assert a["duration_s"] == pytest.approx(600.0, abs=60.0)
    assert b["basis"] == "utilisation_power" and b["model_id"].endswith("/smi") and b["band"] != "training"
    assert "2 line(s) failed validation" in res.stderr


def test_classify_nvidia_smi_csv_several_workloads_out_of_order_and_unknown_part(tmp_path):
    rows = ["timestamp, index, name, job, utilization.gpu [%], power.draw [W], memory.used [MiB], temperature.gpu"]
    for i in reversed(range(120)):  # newest first: the file is not in time order
        for gpu, job in ((0, "job-a"), (1, "job-a"), (2, "job-b")):
            rows.append(f"{T0 + 5 * i:.0f}, {gpu}, Mystery GPU 9000, {job}, 60 %, 300 W, 20000 MiB, 55")
    f = tmp_path / "smi.csv"
    f.write_text("\n".join(rows) + "\n")
    res = runner.invoke(app, ["classify", str(f), "--json", "--workload-by", "job"])
    assert res.exit_code == 0, res.output
    out = [loads(x) for x in res.stdout.splitlines() if x.startswith("{")]
    assert [r["workload_id"] for r in out] == ["job-a", "job-b"]
    assert [r["device_count"] for r in out] == [2, 1]
    for r in out:
        assert r["duration_s"] == pytest.approx(600.0, abs=60.0)  # nothing lost to one stream's watermark
        # the windows' own band on the catalog's peaks (as the store and cases get it), not a classify-only one
        assert r["basis"] == "unknown_accelerator" and 0.0 < r["flop_low"] < r["flop"] < r["flop_high"]
        busy = 0.6 * 5.0 * 120 * r["device_count"]  # 60 % busy, 5 s apart (the gaps give the intervals)
        point, low, high = unknown_accelerator_peaks(None)
        assert r["flop"] == pytest.approx(busy * point * MFU_POINT)
        assert r["flop_low"] == pytest.approx(busy * low * MFU_LOW / 2)  # no TDP: power cannot narrow it
        assert r["flop_high"] == pytest.approx(busy * high * MFU_HIGH)
        assert r["band"] != "not_training" and r["missing"]  # no TDP, no memory size: widened, not evidence
    assert "temperature.gpu" in res.stderr


def test_model_evaluate_small_scenario(tmp_path):
    out = tmp_path / "eval.json"
    # two seeds pooled, as the shipped model is trained (each at half the scale one seed had here: the same cost)
    res = runner.invoke(app, ["model", "evaluate", "--scenario-scale", "0.2", "--seeds", "1,2", "--out", str(out),
                              "--migprofiler", str(tmp_path / "absent")])
    assert res.exit_code == 0, res.output
    assert "sim LOSO full_dcgm" in res.stdout and "MIGProfiler: skipped" in res.stdout
    doc = loads(out.read_bytes())
    sim = doc["simulated"]
    assert len(sim["folds"]) >= 2 and all(len(f["held_out"]) == 1 for f in sim["folds"])  # whole families out
    per_seed = sim["full_dcgm_per_seed"]  # every full-DCGM row scored once, under the seed it came from
    assert doc["seeds"] == [1, 2] and set(per_seed) == {"1", "2"}
    assert sum(m["tp"] + m["fp"] + m["fn"] + m["tn"] for m in per_seed.values()) == sim["full_dcgm"]["n"]
    for tier in ("full_dcgm", "smi_only"):
        block = sim[tier]
        assert block["coverage"] + block["uncertain_share"] == pytest.approx(1.0)
        assert 0.0 <= block["brier"] <= 1.0 and block["reliability"] and block["per_archetype"]
        assert sum(sum(v.values()) for v in block["confusion"].values()) == block["n"]
