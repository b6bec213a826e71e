"""Write a scenario to a folder: telemetry.jsonl (stream order), optional telemetry.columns.jsonl,
allocations.jsonl, cip.jsonl, ground_truth.json, manifest.json. Byte-identical for a seed."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from pipeline.simulator.engine import LATE_AFTER_S, MAL_NONE, Block, iter_blocks
from pipeline.simulator.ground_truth import TruthAccumulator
from pipeline.simulator.lines import LineFormatter
from pipeline.simulator.scenario import Scenario
from schemas.serde import dumps
from schemas.telemetry import SMI_FIELDS

LAYOUT_VERSION = 1
_JOIN_LINES = 2048


@dataclass
class Counts:
    lines: int = 0
    samples: int = 0  # valid, unique samples (what the truth is computed from)
    duplicates: int = 0
    late: int = 0
    malformed: int = 0
    gaps: int = 0
    smi_only_samples: int = 0
    by_malformed_kind: dict[str, int] = field(default_factory=dict)

    def add(self, blk: Block, gaps: int, smi: np.ndarray) -> None:
        ok = blk.mal == MAL_NONE
        self.lines += len(blk)
        self.samples += int((ok & ~blk.dup).sum())
        self.duplicates += int(blk.dup.sum())
        self.late += int((blk.arrival - blk.ts > LATE_AFTER_S).sum())
        self.malformed += int((~ok).sum())
        self.gaps += gaps
        self.smi_only_samples += int((ok & ~blk.dup & smi).sum())
        for k, name in ((1, "broken_json"), (2, "out_of_range"), (3, "missing_field")):
            self.by_malformed_kind[name] = self.by_malformed_kind.get(name, 0) + int((blk.mal == k).sum())


def _columns_messages(sc: Scenario, blk: Block, node: np.ndarray) -> list[bytes]:
    """TelemetryColumns per (workload, node, sample time), first-arrival order, valid unique samples only."""
    ok = np.flatnonzero((blk.mal == MAL_NONE) & ~blk.dup)
    if ok.size == 0:
        return []
    key = (blk.wl[ok].astype(np.int64) * 1_000_003 + node[ok]) * 10_000_000 + np.rint(blk.ts[ok] - sc.t_start
                                                                                       ).astype(np.int64)
    _, first, inv = np.unique(key, return_index=True, return_inverse=True)
    # Rank the messages by first arrival, then group the rows by message (arrival order kept inside each):
    # every column is gathered and turned into Python numbers once per block, and each message takes slices.
    rank = np.empty(first.size, dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(first.size)
    msg_of_row = rank[inv]
    rows = ok[np.argsort(msg_of_row, kind="stable")]
    bounds = np.r_[0, np.cumsum(np.bincount(msg_of_row, minlength=first.size))].tolist()
    heads = rows[bounds[:-1]]
    ts, dev = blk.ts[rows].tolist(), sc.fleet.device_uuid[blk.dev[rows]].tolist()
    cols = {f: v[rows].tolist() for f, v in blk.cols.items()}
    present = {f: (~np.isnan(v[heads])).tolist() for f, v in blk.cols.items()}  # judged on each message's first row
    out = []
    for k, (wl, nd, a, b) in enumerate(zip(blk.wl[heads].tolist(), node[heads].tolist(), bounds, bounds[1:],
                                           strict=False)):
        w = sc.workloads[wl]
        n = sc.fleet.nodes[nd]
        fields = SMI_FIELDS if n.smi_only else cols
        metrics = {f: cols[f][a:b] for f in fields if present[f][k]}
        msg = {"node": n.name, "accelerator": n.reported_name, "account_id": sc.accounts[w.account].account_id,
               "workload_id": w.workload_id, "job_id": w.job_id, "run_label": w.run_label,
               "interval_s": w.interval_s, "precision": w.precision if w.precision_reported else None,
               "ts": ts[a:b], "device": dev[a:b], "metrics": metrics}
        out.append(dumps(msg))
    return out


def _write_lines(f: IO[bytes], lines: list[bytes]) -> None:
    """Each line and a newline, joined a few thousand lines (~1 MB) at a time: a join that stays in the CPU
    cache costs about half of one over the whole block."""
    for i in range(0, len(lines), _JOIN_LINES):
        f.write(b"\n".join([*lines[i:i + _JOIN_LINES], b""]))


def stream(sc: Scenario, truth: TruthAccumulator | None = None, counts: Counts | None = None
           ) -> Iterator[tuple[Block, list[bytes], np.ndarray]]:
    """Blocks in delivery order with their lines and node indices; feeds the truth and the counters."""
    fmt = LineFormatter(sc)
    for blk, tb, gaps in iter_blocks(sc):
        if truth is not None:
            truth.add(tb)
        lines, node = fmt.format(blk)
        if counts is not None:
            counts.add(blk, gaps, sc.fleet.smi_only[node])
        yield blk, lines, node


def ground_truth(sc: Scenario, truth: TruthAccumulator, counts: Counts) -> dict[str, Any]:
    expected, monitored = truth.cases()
    workloads = []
    for w in sc.workloads:
        node = sc.fleet.nodes[w.nodes[0]]
        workloads.append({
            "workload_id": w.workload_id, "job_id": w.job_id, "run_id": w.run_id, "run_label": w.run_label,
            "account_id": sc.accounts[w.account].account_id, "archetype": w.archetype, "is_training": w.is_training,
            "true_flop": float(truth.wl_flop[w.index]), "samples": int(truth.wl_samples[w.index]),
            "accelerators": node.reported_name, "accelerator_key": node.model, "device_count": w.device_count,
            "start": w.start, "end": w.end, "nodes": [sc.fleet.nodes[i].name for i in w.nodes],
            "smi_only_nodes": [sc.fleet.nodes[i].name for i in w.nodes if sc.fleet.nodes[i].smi_only],
            "interval_s": w.interval_s, "precision": w.precision, "precision_reported": w.precision_reported,
            "source_family": w.source_family, "sync_key": w.sync_key,
            "max_projected_flop": truth.max_projected(int(truth.run_of_wl[w.index])),
        })
    from pipeline.simulator.accounts import is_foreign, under_special_measures
    from schemas.policy import load_policy, shipped_policies
    pols = {n: load_policy(n) for n in shipped_policies()}
    accounts = [{
        "account_id": a.account_id, "kind": a.kind, "us_person": a.cip.us_person, "country": a.cip.country,
        "owner_ids": [o.owner_id for o in a.cip.beneficial_owners],
        "reseller_country": a.cip.reseller.country if a.cip.reseller else None,
        "foreign": {n: is_foreign(a.cip, p) for n, p in pols.items()},
        "special_measures": {n: under_special_measures(a.cip, p) for n, p in pols.items()},
    } for a in sc.accounts]
    # Only scenarios that label change in scope carry the key: the other scenarios' files stay byte-identical.
    labels = {"scope_changes": sc.scope_labels} if sc.scope_labels is not None else {}
    return {**labels, "layout_version": LAYOUT_VERSION, "scenario": sc.name, "seed": sc.seed, "window_s": sc.window_s,
            "workloads": workloads, "accounts": accounts,
            "fleet": [{"node": n.name, "model": n.model, "accelerator": n.reported_name, "region": n.region,
                       "datacenter": n.datacenter, "interconnect_gbps": n.interconnect_gbps, "smi_only": n.smi_only}
                      for n in sc.fleet.nodes], "expected_cases": expected, "monitored": monitored,
            "counts": counts.__dict__, "true_flop_formula": "sum over valid unique samples of interval_s x "
            "catalog peak(precision) x tensor_active (also on nodes that report smi fields only)"}


def write(sc: Scenario, out_dir: Path, *, columnar: bool = False,
          sink: Callable[[list[bytes], np.ndarray], None] | None = None) -> tuple[dict[str, Any], float]:
    """Write the folder; `sink` also receives each block's lines (the Kafka producer). Returns (manifest, secs)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    truth, counts = TruthAccumulator(sc), Counts()
    t0 = time.perf_counter()
    col_f: IO[bytes] | None = (out_dir / "telemetry.columns.jsonl").open("wb") if columnar else None
    try:
        with (out_dir / "telemetry.jsonl").open("wb") as f:
            for blk, lines, node in stream(sc, truth, counts):
                _write_lines(f, lines)
                if col_f is not None:
                    _write_lines(col_f, _columns_messages(sc, blk, node))
                if sink is not None:
                    sink(lines, node)
    finally:
        if col_f is not None:
            col_f.close()
    with (out_dir / "allocations.jsonl").open("wb") as f:
        for e in sc.allocations:
            f.write(dumps(e.model_dump(mode="json", exclude_none=True)) + b"\n")
    with (out_dir / "cip.jsonl").open("wb") as f:
        for a in sc.accounts:
            f.write(dumps(a.cip.model_dump(mode="json", exclude_none=True)) + b"\n")
    gt = ground_truth(sc, truth, counts)
    (out_dir / "ground_truth.json").write_bytes(dumps(gt, sort_keys=True))
    secs = time.perf_counter() - t0
    manifest = {"layout_version": LAYOUT_VERSION, "scenario": sc.name, "seed": sc.seed,
                "parameters": sc.params, "counts": counts.__dict__, "columnar": columnar,
                "files": sorted(["telemetry.jsonl", "allocations.jsonl", "cip.jsonl", "ground_truth.json",
                                 *(["telemetry.columns.jsonl"] if columnar else [])]),
                "t_start": sc.t_start, "t_end": sc.t_end, "workloads": len(sc.workloads),
                "accounts": len(sc.accounts), "nodes": len(sc.fleet.nodes)}
    (out_dir / "manifest.json").write_bytes(dumps(manifest, sort_keys=True))
    return manifest, secs
