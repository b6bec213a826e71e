"""The benchmark scripts still run and the harness still renders: no timing asserts (benchmarks are not tests)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from benchmarks.run import _judge, render_markdown

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent


def test_bench_store_quick_prints_its_figures() -> None:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_store", "--quick", "--json"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = orjson.loads(proc.stdout.strip().splitlines()[-1])
    figures = result["figures"]
    for key in ("store.rows_per_s", "store.raw_rows_per_s", "store.case_events_per_s"):
        assert isinstance(figures.get(key), int | float) and figures[key] > 0, (key, figures)
    assert all(t["key"] in figures for t in result["targets"])


def test_bench_verdict_quick_prints_both_paths_and_the_same_bands() -> None:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_verdict", "--quick", "--json"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = orjson.loads(proc.stdout.strip().splitlines()[-1])
    for view in ("as_sent", "smi"):
        for key in (f"verdict.ms_{view}", f"verdict.ms_{view}_per_tree"):
            assert result["figures"][key] > 0, (key, result["figures"])
    assert sum(result["params"]["bands"]["smi"].values()) == result["params"]["histories"]
    assert all(t["key"] in result["figures"] and t["baseline"] in result["figures"] for t in result["targets"])


def test_render_markdown_shows_values_baselines_and_misses() -> None:
    figures = {"scaling.two_consumers_samples_per_s": 150_000.0, "scaling.one_consumer_samples_per_s": 100_000.0,
               "latency.p99_s": 9.5, "latency.window_s": 5.0}
    specs = [{"key": "scaling.two_consumers_samples_per_s", "baseline": "scaling.one_consumer_samples_per_s",
              "min": 1.6, "target_text": ">= 1.6 x one consumer"},
             {"key": "latency.p99_s", "max": 7.0, "target_text": "<= window + 2 s"},
             {"key": "store.rows_per_s", "min": 100_000, "target_text": ">= 100k rows/s"}]
    results = {"date": "2026-01-01T00:00:00Z", "quick": True, "machine": {"platform": "Linux-test", "cpus": 2},
               "figures": figures, "notes": ["a note"],
               "targets": {s["key"] + (f" / {s['baseline']}" if s.get("baseline") else ""): _judge(figures, s)
                           for s in specs}}
    md = render_markdown(results)
    rows = {line.split("|")[1].strip(): line for line in md.splitlines() if line.startswith("| `")}
    scaling = rows["`scaling.two_consumers_samples_per_s`"]
    assert "`scaling.one_consumer_samples_per_s` = 100,000" in scaling and "| 1.5 |" in scaling
    assert scaling.rstrip().endswith("| **no** |")  # 1.5 < 1.6
    assert rows["`latency.p99_s`"].rstrip().endswith("| **no** |")  # 9.5 s > 7 s
    assert rows["`store.rows_per_s`"].rstrip().endswith("| n/a |")  # not measured in this run
    assert "mode quick" in md and "- a note" in md
