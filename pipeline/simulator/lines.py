"""Native TelemetrySample JSON lines, built in bulk as bytes: one list of constant pieces per (workload, tier).

The workload-constant fields (accelerator, ids, interval, precision) are baked into the pieces, and node, device
and GPU index into one piece per device, so each line costs one C-level bytes join over pre-converted columns.
Values are finite floats whose repr is valid JSON; ids are plain ASCII (checked when the pieces are built).
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import pairwise, repeat

import numpy as np
import orjson

from pipeline.simulator.engine import MAL_JSON, MAL_MISSING, MAL_NONE, MAL_RANGE, Block
from pipeline.simulator.scenario import Scenario
from pipeline.simulator.workload import EXPORTER_DROPS
from schemas.telemetry import METRIC_FIELDS, SMI_FIELDS


class LineFormatter:
    def __init__(self, sc: Scenario) -> None:
        self.sc = sc
        self._templates: dict[tuple[int, bool], tuple[str, tuple[str, ...]]] = {}
        self._pieces: dict[tuple[int, bool], list[bytes]] = {}
        self.node_of_dev = np.repeat(np.arange(len(sc.fleet.nodes)), 8)
        # The per-device middle of every line: node, device and GPU index (a function of the device alone).
        fleet = sc.fleet
        self._dev_text = np.array(
            [f',"node":"{fleet.node_name[d // 8]}","device":"{uuid}","gpu_index":{d % 8}'.encode()
             for d, uuid in enumerate(fleet.device_uuid.tolist())], dtype=object)

    def _template(self, wl: int, smi: bool) -> tuple[str, tuple[str, ...]]:
        key = (wl, smi)
        if key not in self._templates:
            w = self.sc.workloads[wl]
            node = self.sc.fleet.nodes[w.nodes[0]]
            const = {"accelerator": node.reported_name, "account_id": self.sc.accounts[w.account].account_id,
                     "workload_id": w.workload_id, "job_id": w.job_id}
            if w.run_label:
                const["run_label"] = w.run_label
            const["interval_s"] = w.interval_s
            if w.precision_reported:
                const["precision"] = w.precision
            body = orjson.dumps(const).decode()[1:-1]
            assert "{" not in body and "}" not in body, body
            fields = SMI_FIELDS if smi else tuple(f for f in METRIC_FIELDS if not _unsupported(node.model, f))
            drop = EXPORTER_DROPS.get(str(w.params.get("exporter") or ""), frozenset())
            fields = tuple(f for f in fields if f not in drop)
            tmpl = '{{"ts":{},"node":"{}","device":"{}","gpu_index":{},' + body + "".join(
                f',"{f}":{{}}' for f in fields) + "}}"
            # The same line as the constant pieces after the device text, one before each value and the end.
            self._pieces[key] = [f',{body},"{fields[0]}":'.encode(), *(f',"{f}":'.encode() for f in fields[1:]), b"}"]
            self._templates[key] = (tmpl, fields)
        return self._templates[key]

    def format(self, blk: Block) -> tuple[list[bytes], np.ndarray]:
        """Lines (bytes, no newline) in the block's (arrival) order, and the node index of each (the Kafka key).

        The block is sorted by (workload, tier) group and put back into arrival order at the end. Within a group,
        each column's numbers are turned into text by orjson (one C call), then each line is one bytes join of
        the group's pieces and values.
        """
        n = len(blk)
        node = self.node_of_dev[blk.dev]
        smi = self.sc.fleet.smi_only[node]
        ok = blk.mal == MAL_NONE
        gkey = np.where(ok, blk.wl.astype(np.int64) * 2 + smi, -1)
        perm = np.argsort(gkey, kind="stable")
        gs = gkey[perm]
        starts = np.flatnonzero(np.r_[True, gs[1:] != gs[:-1]]) if n else np.empty(0, dtype=np.int64)
        bounds = np.r_[starts, n]
        sorted_cols: dict[str, np.ndarray] = {}

        def col(name: str) -> np.ndarray:
            if name not in sorted_cols:
                v = blk.cols[name][perm]
                sorted_cols[name] = np.nan_to_num(v).astype(np.int64) if name in _INT_FIELDS else v
            return sorted_cols[name]

        ts_t = _numbers(blk.ts[perm])
        dev_t = self._dev_text[blk.dev[perm]].tolist()
        lines: list[bytes] = []
        for a, b in pairwise(bounds.tolist()):
            g = int(gs[a])
            if g < 0:
                lines.extend([b""] * (b - a))  # malformed: filled below
                continue
            _, fields = self._template(g // 2, bool(g % 2))
            pieces = self._pieces[(g // 2, bool(g % 2))]
            # A value that is the same on every row of the group (a fixed clock, an idle counter) joins the
            # constant pieces around it: fewer per-row values to convert and join.
            parts: list[bytes | list[bytes]] = [b'{"ts":', ts_t[a:b], dev_t[a:b]]
            for p, f in zip(pieces, fields, strict=False):
                v = col(f)[a:b]
                parts += [p + _numbers(v[:1])[0]] if _constant(v) else [p, _numbers(v)]
            parts.append(pieces[-1])
            lines.extend(map(b"".join, zip(*_as_columns(parts), strict=False)))
        out = np.empty(n, dtype=object)
        out[perm] = lines
        for i in np.flatnonzero(~ok):
            out[i] = self._malformed(blk, int(i), bool(smi[i]), int(node[i])).encode()
        return out.tolist(), node

    def _malformed(self, blk: Block, i: int, smi: bool, node: int) -> str:
        tmpl, fields = self._template(int(blk.wl[i]), smi)
        vals = [int(blk.cols[f][i]) if f in _INT_FIELDS else float(blk.cols[f][i]) for f in fields]
        line = tmpl.format(float(blk.ts[i]), self.sc.fleet.node_name[node], self.sc.fleet.device_uuid[blk.dev[i]],
                           int(blk.dev[i] % 8), *vals)
        kind = int(blk.mal[i])
        if kind == MAL_JSON:
            return line[: max(8, (len(line) * (i % 7 + 2)) // 10)]  # a truncated write
        d = orjson.loads(line)
        if kind == MAL_RANGE:
            f = ("gpu_util", "power_w", "fb_used_mib")[i % 3]
            d[f] = {"gpu_util": 250.0, "power_w": -40.0, "fb_used_mib": -1.0}[f]
        elif kind == MAL_MISSING:
            del d[("ts", "node", "device")[i % 3]]
        return orjson.dumps(d).decode()


#: Fields written as JSON integers (whole units: MiB, MHz, bytes/s, mJ).
_INT_FIELDS = frozenset(("fb_used_mib", "fb_free_mib", "sm_clock_mhz", "mem_clock_mhz", "pcie_tx_bytes",
                         "pcie_rx_bytes", "nvlink_tx_bytes", "nvlink_rx_bytes", "net_tx_bytes", "net_rx_bytes",
                         "energy_mj"))


def _numbers(v: np.ndarray) -> list[bytes]:
    """Shortest round-trip text of each number (orjson's float printer), one C call for the whole column."""
    if v.size == 0:
        return []
    return orjson.dumps(v, option=orjson.OPT_SERIALIZE_NUMPY)[1:-1].split(b",")


def _constant(v: np.ndarray) -> bool:
    """Every value has the same bits (so the same text: 0.0 and -0.0 compare equal but print differently)."""
    u = v.view(f"u{v.itemsize}")
    return bool((u == u[0]).all())


def _as_columns(parts: list[bytes | list[bytes]]) -> list[Iterable[bytes]]:
    """Per-row columns for zip: adjacent constant pieces merged into one, each constant repeated."""
    merged: list[bytes | list[bytes]] = []
    for p in parts:
        if isinstance(p, bytes) and merged and isinstance(merged[-1], bytes):
            merged[-1] += p
        else:
            merged.append(p)
    return [repeat(p) if isinstance(p, bytes) else p for p in merged]


def _unsupported(model: str, field: str) -> bool:
    """PCIe-only parts have no NVLink counters: DCGM reports them as not supported, i.e. missing."""
    return model in ("L40S", "L4") and field.startswith("nvlink")


__all__ = ["MAL_JSON", "MAL_MISSING", "MAL_RANGE", "LineFormatter"]
