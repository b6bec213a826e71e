"""Native TelemetrySample JSON lines, built in bulk: one str.format template per (workload, telemetry tier).

The workload-constant fields (accelerator, ids, interval, precision) are baked into the template, so each line
costs one C-level format call over pre-converted Python lists. Values are finite floats whose repr is valid JSON;
ids are plain ASCII (checked when the template is built).
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import pairwise, repeat

import numpy as np
import orjson

from pipeline.simulator.engine import MAL_JSON, MAL_MISSING, MAL_NONE, MAL_RANGE, Block
from pipeline.simulator.scenario import Scenario
from schemas.telemetry import METRIC_FIELDS, SMI_FIELDS


class LineFormatter:
    def __init__(self, sc: Scenario) -> None:
        self.sc = sc
        self._templates: dict[tuple[int, bool], tuple[str, tuple[str, ...]]] = {}
        self._pieces: dict[tuple[int, bool], list[str]] = {}
        self.node_of_dev = np.repeat(np.arange(len(sc.fleet.nodes)), 8)

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
            tmpl = '{{"ts":{},"node":"{}","device":"{}","gpu_index":{},' + body + "".join(
                f',"{f}":{{}}' for f in fields) + "}}"
            # The same line as constant pieces between the values, for ''.join (no format parsing per line).
            pieces = ['{"ts":', ',"node":"', '","device":"', '","gpu_index":', "," + body + f',"{fields[0]}":',
                      *(f',"{f}":' for f in fields[1:]), "}"]
            self._templates[key] = (tmpl, fields)
            self._pieces[key] = pieces
        return self._templates[key]

    def format(self, blk: Block) -> tuple[list[str], np.ndarray]:
        """Lines in the block's (arrival) order, and the node index of each (the Kafka key).

        Numbers are turned into text column by column by orjson (one C call per column), then each
        (workload, tier) group of rows is formatted with its template; the block is sorted by group for that and
        put back into arrival order at the end.
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
        text: dict[str, list[str]] = {}

        def col(name: str) -> list[str]:
            if name not in text:
                v = blk.cols[name][perm]
                if name in _INT_FIELDS:
                    v = np.nan_to_num(v).astype(np.int64)
                text[name] = _numbers(v)
            return text[name]

        ts_t = _numbers(blk.ts[perm])
        node_t = self.sc.fleet.node_name[node[perm]].tolist()
        dev_t = self.sc.fleet.device_uuid[blk.dev[perm]].tolist()
        gi_t = _numbers((blk.dev[perm] % 8).astype(np.int64))
        lines: list[str] = []
        for a, b in pairwise(bounds.tolist()):
            g = int(gs[a])
            if g < 0:
                lines.extend([""] * (b - a))  # malformed: filled below
                continue
            _, fields = self._template(g // 2, bool(g % 2))
            pieces = self._pieces[(g // 2, bool(g % 2))]
            values = [ts_t[a:b], node_t[a:b], dev_t[a:b], gi_t[a:b], *(col(f)[a:b] for f in fields)]
            args: list[Iterable[str]] = []
            for p, v in zip(pieces, values, strict=False):
                args += [repeat(p), v]
            args.append(repeat(pieces[-1]))
            lines.extend(map("".join, zip(*args, strict=False)))
        out = np.empty(n, dtype=object)
        out[perm] = lines
        for i in np.flatnonzero(~ok):
            out[i] = self._malformed(blk, int(i), bool(smi[i]), int(node[i]))
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


def _numbers(v: np.ndarray) -> list[str]:
    """Shortest round-trip text of each number (orjson's float printer), one C call for the whole column."""
    if v.size == 0:
        return []
    return orjson.dumps(v, option=orjson.OPT_SERIALIZE_NUMPY)[1:-1].decode().split(",")


def _unsupported(model: str, field: str) -> bool:
    """PCIe-only parts have no NVLink counters: DCGM reports them as not supported, i.e. missing."""
    return model in ("L40S", "L4") and field.startswith("nvlink")


__all__ = ["MAL_JSON", "MAL_MISSING", "MAL_RANGE", "LineFormatter"]
