"""Decoded telemetry as columns: one numpy array per quantity, NaN = missing, plus per-row string ids.

Decoders append rows (or whole columns) to a `RowBuilder`; `build()` turns them into `Rows` in one numpy call per
column. Every row remembers the index of the message it came from, so a bad row can be dead-lettered on its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from schemas.telemetry import METRIC_FIELDS

METRIC_INDEX = {name: i for i, name in enumerate(METRIC_FIELDS)}
N_METRICS = len(METRIC_FIELDS)
PRECISIONS = ("fp8", "bf16", "fp16", "tf32", "fp32", "fp64")

#: The per-row id columns, declared once: column name -> its field in a native TelemetrySample. `Rows`,
#: `RowBuilder`, `Batch` (aggregate.py) and the fragment merger's held rows follow this order (`follows` checks the
#: dataclasses at import), and single-row letters are written from it (`sample_dict`).
ID_COLUMNS: dict[str, str] = {
    "device": "device", "node": "node", "accelerator": "accelerator", "workload": "workload_id",
    "account": "account_id", "job": "job_id", "run_label": "run_label", "precision": "precision",
}
#: decoded rows also carry gpu_index (validated, then not windowed)
ROW_ID_COLUMNS: dict[str, str] = {**ID_COLUMNS, "gpu_index": "gpu_index"}


def follows(cls: type, names: dict[str, str]) -> type:
    """Refuse a dataclass whose id fields are not exactly `names`, in order, one after another (a column added in
    one place only would otherwise be dropped silently where the rows are copied by these names)."""
    have = [f.name for f in fields(cls)]
    want = list(names)
    at = have.index(want[0]) if want[0] in have else -1
    if at < 0 or have[at : at + len(want)] != want:
        raise TypeError(f"{cls.__name__} fields {have} do not hold the id columns {want} in order")
    return cls


def sample_dict(cols: Any, i: int, names: dict[str, str]) -> dict:
    """Row `i` of a column set (Rows, Batch) as a native TelemetrySample-shaped dict (letters of single rows)."""
    out: dict = {"ts": float(cols.ts[i])}
    for name, key in names.items():
        v = getattr(cols, name)[i]
        if v is not None:
            out[key] = v
    if not np.isnan(cols.interval[i]):
        out["interval_s"] = float(cols.interval[i])
    row = cols.metrics[i]
    out.update({m: float(row[j]) for j, m in enumerate(METRIC_FIELDS) if not np.isnan(row[j])})
    return out


@dataclass(slots=True)
class Rows:
    """One consume batch's samples, in arrival order (message order, then row order inside a message)."""

    ts: np.ndarray  # float64 epoch seconds
    interval: np.ndarray  # float64, NaN = not given
    metrics: np.ndarray  # (n, N_METRICS) float64, NaN = missing
    msg: np.ndarray  # int64: index of the source message in the batch
    device: list[str | None]
    node: list[str | None]
    accelerator: list[str | None]
    workload: list[str | None]
    account: list[str | None]
    job: list[str | None]
    run_label: list[str | None]
    precision: list[str | None]
    gpu_index: list[int | None]
    #: every id column but device is constant within a message (columnar messages): lets the aggregator code
    #: strings per message instead of per row
    ids_per_message: bool = False

    def __len__(self) -> int:
        return len(self.ts)

    def take(self, idx: np.ndarray) -> Rows:
        """The rows at `idx` (in that order)."""
        if len(idx) == len(self.ts):  # all of them (the common case): no copy
            return self
        il = idx.tolist()
        return Rows(
            ts=self.ts[idx],
            interval=self.interval[idx],
            metrics=self.metrics[idx],
            msg=self.msg[idx],
            **{name: [getattr(self, name)[i] for i in il] for name in ROW_ID_COLUMNS},
            ids_per_message=self.ids_per_message,
        )

    def row_dict(self, i: int) -> dict:
        """One row as a native TelemetrySample-shaped dict (for dead letters of single rows)."""
        return sample_dict(self, i, ROW_ID_COLUMNS)


follows(Rows, ROW_ID_COLUMNS)


@dataclass(slots=True)
class RowBuilder:
    """Accumulates rows from many messages; message-level failures are recorded in `errors`."""

    ts: list = field(default_factory=list)
    interval: list = field(default_factory=list)
    metric_rows: list = field(default_factory=list)  # per-row lists of N_METRICS values (None = missing)
    metric_blocks: list = field(default_factory=list)  # (start_row, ndarray (k, N_METRICS)) from columnar messages
    msg: list = field(default_factory=list)
    device: list = field(default_factory=list)
    node: list = field(default_factory=list)
    accelerator: list = field(default_factory=list)
    workload: list = field(default_factory=list)
    account: list = field(default_factory=list)
    job: list = field(default_factory=list)
    run_label: list = field(default_factory=list)
    precision: list = field(default_factory=list)
    gpu_index: list = field(default_factory=list)
    #: rows whose metric values were not numbers (filled by build(); the caller dead-letters them)
    bad_rows: list = field(default_factory=list)
    #: a whole batch decoded column-wise by a decoder's fast path (then no rows were added one by one)
    prebuilt: Rows | None = None

    def __len__(self) -> int:
        return len(self.ts) + (len(self.prebuilt) if self.prebuilt is not None else 0)

    def add_row(self, msg: int, ts: float, metrics: list, *, device, node, accelerator=None, workload=None,
                account=None, job=None, run_label=None, precision=None, gpu_index=None, interval=None) -> None:
        self.ts.append(ts)
        self.interval.append(interval)
        self.metric_rows.append(metrics)
        self.msg.append(msg)
        self.device.append(device)
        self.node.append(node)
        self.accelerator.append(accelerator)
        self.workload.append(workload)
        self.account.append(account)
        self.job.append(job)
        self.run_label.append(run_label)
        self.precision.append(precision)
        self.gpu_index.append(gpu_index)

    def add_columns(self, msg: int, ts: list, devices: list, metrics: np.ndarray, *, node, accelerator=None,
                    workload=None, account=None, job=None, run_label=None, precision=None, interval=None) -> None:
        """A columnar message: shared ids once, per-row ts/device, metrics already a (k, N_METRICS) array."""
        k = len(ts)
        self.metric_blocks.append((len(self.ts), metrics))
        self.metric_rows.extend([None] * k)
        self.ts.extend(ts)
        self.interval.extend([interval] * k)
        self.msg.extend([msg] * k)
        self.device.extend(devices)
        shared = {"node": node, "accelerator": accelerator, "workload": workload, "account": account, "job": job,
                  "run_label": run_label, "precision": precision}
        for name in ROW_ID_COLUMNS:
            if name != "device":
                getattr(self, name).extend([shared.get(name)] * k)

    def build(self) -> Rows:
        if self.prebuilt is not None:
            assert not self.ts, "a fast-path batch cannot be mixed with rows added one by one"
            return self.prebuilt
        n = len(self.ts)
        metrics = np.full((n, N_METRICS), np.nan)
        self.bad_rows = []
        if self.metric_rows:
            row_idx = [i for i, r in enumerate(self.metric_rows) if r is not None]
            if row_idx:
                try:  # optimistic: one numpy call; a non-number anywhere falls back to row by row
                    vals = np.array([self.metric_rows[i] for i in row_idx], dtype=np.float64)
                except (TypeError, ValueError):
                    vals = np.full((len(row_idx), N_METRICS), np.nan)
                    for j, i in enumerate(row_idx):
                        try:
                            vals[j] = np.array(self.metric_rows[i], dtype=np.float64)
                        except (TypeError, ValueError):
                            self.bad_rows.append(i)
                metrics[row_idx] = vals.reshape(len(row_idx), N_METRICS)
        for start, block in self.metric_blocks:
            metrics[start : start + len(block)] = block
        return Rows(
            ts=np.array(self.ts, dtype=np.float64),
            interval=np.array(self.interval, dtype=np.float64),
            metrics=metrics,
            msg=np.array(self.msg, dtype=np.int64),
            **{name: getattr(self, name) for name in ROW_ID_COLUMNS},
        )


follows(RowBuilder, ROW_ID_COLUMNS)
