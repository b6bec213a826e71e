"""The window row's activity columns (migration 0007, issue 17): computed from the additive `sums` layout, equal to
each partial's own features, combining partials exactly as the detect side merges them, and present on rows stored
before the migration. Real chDB."""

from __future__ import annotations

import re
import shutil
import uuid
from pathlib import Path

import pytest

from detectors.windows import merge_partials
from pipeline.ingest import synth
from pipeline.ingest.stage import IngestCore, SourceMessage
from pipeline.store import MIGRATIONS_DIR, Store
from schemas.window_sums import STAT_KEYS
from schemas.windows import WindowAggregate

T0 = 1_767_225_600.0  # a window boundary
NOW = T0 + 10_000
MIGRATION = MIGRATIONS_DIR / "0007_window_activity_columns.sql"
#: column -> the feature of the same partial (detectors/windows.py) it must equal
AS_FEATURE = {"tensor_active_mean": "mean_tensor", "gpu_util_mean": "mean_gpu_util",
              "power_w_mean": "mean_power_watts", "power_tdp_share_mean": "mean_power"}
#: the doc's recipe (docs/store.md): partials combined, each mean weighted by the seconds it covers
RECIPE = "activity and compute per workload-window of one account"
COMBINED = next(sql for sql in re.findall(r"```sql\n(.*?)```", (MIGRATIONS_DIR.parents[1] / "docs" / "store.md")
                                          .read_text(), re.S) if RECIPE in sql.splitlines()[0]).strip().rstrip(";")


def _partials() -> list[WindowAggregate]:
    """Two workloads over 3 windows, each window split over two partitions (half the nodes each); `wl-smi` sends
    no tensor activity (nvidia-smi level: its tensor columns are NULL / 0 s)."""
    specs = [synth.WorkloadSpec("wl-full", nodes=2, gpus_per_node=2), synth.WorkloadSpec("wl-smi", nodes=2,
                                                                                          gpus_per_node=1)]
    rows = synth.samples(specs, T0, 180, 5.0)
    for r in rows:
        if r["workload_id"] == "wl-smi":
            r.pop("tensor_active", None)
    out: list[WindowAggregate] = []
    for part, node_ix in ((0, 0), (1, 1)):
        core = IngestCore()
        mine = [r for r in rows if r["node"].endswith(f"-node-{node_ix}")]
        values = [v for _, v in synth.native(mine)]
        core.process("telemetry", part, [SourceMessage(i, v) for i, v in enumerate(values)], NOW)
        out += core.ready() + core.drain()
    return out


@pytest.fixture(scope="module")
def partials() -> list[WindowAggregate]:
    ws = _partials()
    by_window: dict[tuple[str, float], set[int]] = {}
    for w in ws:
        by_window.setdefault((w.workload_id, w.window_start), set()).add(w.partition)
    assert len(by_window) == 6 and all(p == {0, 1} for p in by_window.values())  # really two partials each
    return ws


def test_every_sums_key_the_migration_reads_is_in_the_window_layout() -> None:
    keys = set(re.findall(r"sums\['([^']+)'\]", MIGRATION.read_text()))
    assert keys and keys <= {k for per_stat in STAT_KEYS for k in per_stat}, keys


def test_columns_equal_each_partials_features_and_combine_like_the_merge(store: Store,
                                                                          partials: list[WindowAggregate]) -> None:
    store.insert_windows(partials)
    cols = ", ".join(AS_FEATURE) + ", tensor_active_seconds, gpu_util_seconds, power_w_seconds"
    rows = {r["window_id"]: r for r in store.query(f"SELECT window_id, {cols} FROM windows FINAL")}
    assert len(rows) == len(partials)
    for w in partials:
        r, own = rows[w.window_id], merge_partials([w]).features  # the partial's features (ingest stores none)
        for col, feat in AS_FEATURE.items():
            if own[feat] is None:
                assert r[col] is None, (w.workload_id, col)
            else:
                assert r[col] == pytest.approx(own[feat], rel=1e-9), (w.workload_id, col)
        assert r["gpu_util_seconds"] == pytest.approx(w.device_seconds)  # every sample carried utilisation
    smi = [rows[w.window_id] for w in partials if w.workload_id == "wl-smi"]
    assert all(r["tensor_active_mean"] is None and r["tensor_active_seconds"] == 0 for r in smi)
    assert all(rows[w.window_id]["tensor_active_mean"] > 0 for w in partials if w.workload_id == "wl-full")

    combined = store.query(COMBINED, {"account_id": "acct-1"})
    assert len(combined) == 6
    for r in combined:
        parts = [w for w in partials if (w.workload_id, w.window_start) == (r["workload_id"], r["window_start"])]
        merged = merge_partials(parts)
        f = merged.features
        assert r["gpu_util"] == pytest.approx(f["mean_gpu_util"], rel=1e-9)
        assert r["power_w"] == pytest.approx(f["mean_power_watts"], rel=1e-9)
        assert (r["tensor_active"] is None) if f["mean_tensor"] is None else \
            r["tensor_active"] == pytest.approx(f["mean_tensor"], rel=1e-9)
        assert (r["flop"], r["flop_low"], r["flop_high"]) == pytest.approx(
            (merged.flop, merged.flop_low, merged.flop_high), rel=1e-12)
        assert r["bases"] == [merged.basis]


def test_rows_stored_before_the_migration_get_the_columns(store_path: Path, tmp_path: Path,
                                                          partials: list[WindowAggregate]) -> None:
    before = tmp_path / "migrations"
    before.mkdir()
    for f in MIGRATIONS_DIR.glob("000[1-6]_*.sql"):
        shutil.copy(f, before / f.name)
    db = f"test_cols_{uuid.uuid4().hex[:10]}"
    with Store.connect(f"chdb://{store_path}", db, migrations_dir=before) as old:
        old.insert_windows(partials)
        cols = {r["name"] for r in old.query("SELECT name FROM system.columns WHERE database = currentDatabase() "
                                              "AND table = 'windows'")}
        assert "tensor_active_mean" not in cols
    store = Store.connect(f"chdb://{store_path}", db)
    try:
        got = {r["window_id"]: r["power_w_mean"] for r in store.query("SELECT window_id, power_w_mean FROM windows")}
        want = {w.window_id: merge_partials([w]).features["mean_power_watts"] for w in partials}
        assert got == pytest.approx(want, rel=1e-9)
        # the pipeline's own reads and writes do not see the new columns: rows round-trip as before
        assert {w.window_id: w for w in store.list_windows()} == {w.window_id: w for w in partials}
    finally:
        store.drop_database()
        store.close()
