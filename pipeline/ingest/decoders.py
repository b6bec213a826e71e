"""Wire formats -> rows. One decoder per topic, chosen by configuration (IngestSettings.decoder).

- `native`: this project's own JSON — a TelemetrySample per message, a TelemetryBatch (`samples`), or the columnar
  TelemetryColumns (`ts` and `device` are lists); the shape tells which.
- `otlp_json`: one OTLP ExportMetricsServiceRequest per message, as the OpenTelemetry Collector's kafka exporter
  writes it with `encoding: otlp_json` (lowerCamelCase, 64-bit integers as strings, gauge/sum dataPoints with
  asDouble/asInt). Resource attributes and data-point attributes together are the labels.
- `prometheus_json`: prometheus-kafka-adapter, one sample per message (`value` is a string, `labels` a dict).

Decoders only parse and map names; ranges, sentinels and clocks are checked in validate.py, vectorised. A message
that cannot be parsed is recorded in `errors` with its reason; a bad sample inside a batch is recorded with its
row payload and the rest of the batch is kept.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

import numpy as np
import orjson

from pipeline.ingest.columns import ID_COLUMNS, METRIC_INDEX, N_METRICS, PRECISIONS, ROW_ID_COLUMNS, RowBuilder, Rows
from schemas.errors import ConfigError
from schemas.telemetry import DCGM_NAMES, METRIC_FIELDS

#: Metric name on the wire -> our field: dcgm-exporter names and our own field names.
NAME_TO_FIELD: dict[str, str] = {**{v: k for k, v in DCGM_NAMES.items()}, **{f: f for f in METRIC_FIELDS}}

_SAMPLE_KEYS = frozenset(
    ["schema_version", "ts", "node", "device", "gpu_index", "accelerator", "account_id", "workload_id", "job_id",
     "run_label", "interval_s", "precision", *METRIC_FIELDS]
)
_COLUMN_KEYS = frozenset(
    ["schema_version", "node", "accelerator", "account_id", "workload_id", "job_id", "run_label", "interval_s",
     "precision", "ts", "device", "metrics"]
)
#: Optional ids that must be strings when present (a number or a list as a workload id would be keyed, sorted and
#: joined as if it were one, and fail far downstream).
_STR_IDS = ("accelerator", "workload_id", "account_id", "job_id", "run_label")
_PRECISIONS = frozenset(PRECISIONS)
_METRIC_SET = frozenset(METRIC_FIELDS)
_STR_OR_NONE = frozenset([str, type(None)])
_NUM_OR_NONE = frozenset([int, float, type(None)])
#: numpy kinds a column of JSON numbers converts to (float, int64, uint64): anything else held a string, a bool,
#: a list or an object, which `np.array(..., dtype=float)` would otherwise coerce ("0.5" -> 0.5, true -> 1.0)
_NUMERIC_KINDS = frozenset("fiu")


def _floats(col: list | tuple) -> np.ndarray | None:
    """A column of JSON numbers (None = missing) as float64, or None when any value is of another type."""
    try:  # the usual case, and the fastest conversion: array('d') takes only numbers (no str, no None)
        return np.frombuffer(array("d", col), dtype=np.float64)
    except (TypeError, OverflowError, ValueError):
        pass
    try:
        a = np.array(col)
    except (ValueError, TypeError):  # lists of uneven lengths among the values
        return None
    if a.ndim != 1:  # lists of even lengths
        return None
    if a.dtype.kind in _NUMERIC_KINDS:
        return a.astype(np.float64, copy=False)
    if a.dtype.kind == "O" and set(map(type, col)) <= _NUM_OR_NONE:  # None among numbers (or ints beyond 64 bits)
        return np.array(col, dtype=np.float64)
    return None


@dataclass(slots=True)
class DecodeError:
    msg: int  # index of the message in the batch
    reason: str  # malformed_json | schema_violation | wrong_type
    detail: str
    row: dict | None = None  # the offending sample when only one row of a batch is bad
    row_index: int | None = None


@dataclass(frozen=True, slots=True)
class LabelMap:
    """Which labels carry which id, in order of preference (configuration, see IngestSettings)."""

    device: tuple[str, ...] = ("UUID", "uuid", "device", "gpu_uuid")
    node: tuple[str, ...] = ("Hostname", "host.name", "hostname", "node", "instance")
    accelerator: tuple[str, ...] = ("modelName", "model_name", "accelerator", "gpu.model")
    gpu_index: tuple[str, ...] = ("gpu", "gpu_index")
    workload: tuple[str, ...] = ("workload_id", "pod", "hpc_job", "job")
    account: tuple[str, ...] = ("account_id", "namespace")
    job: tuple[str, ...] = ("job_id", "hpc_job", "job")
    run_label: tuple[str, ...] = ("run_label",)

    def first(self, labels: dict[str, Any], names: tuple[str, ...]) -> str | None:
        for n in names:
            v = labels.get(n)
            if v not in (None, ""):
                return str(v)
        return None


class Decoder(Protocol):
    def decode(self, values: list[bytes | None], out: RowBuilder, errors: list[DecodeError]) -> None: ...


def _loads(raw: bytes | None, i: int, errors: list[DecodeError]) -> Any:
    """The decoded JSON, or None after recording why there is none (a JSON `null` too: it is no message)."""
    if not raw:  # a tombstone (null value) or an empty message
        errors.append(DecodeError(i, "malformed_json", "message has no value (null or empty)"))
        return None
    try:
        d = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        errors.append(DecodeError(i, "malformed_json", str(exc)[:300]))
        return None
    if d is None:
        errors.append(DecodeError(i, "schema_violation", "message is JSON null"))
    return d


def _num(v: Any) -> bool:
    return (type(v) is float or type(v) is int) and v is not True and v is not False


@dataclass(frozen=True, slots=True)
class _Rule:
    """One rule a field of a native message obeys, read by both paths: the fast path checks a whole batch's column
    at once (a miss sends the batch down the slow path), the slow path names the first broken rule of a message.
    A rule is one of: `required` (present, not null); `types` (the types its JSON value may have; NoneType: it may
    be absent); `values` (the strings it may be, or absent)."""

    field: str
    reason: str
    detail: str  # may name {field}, {type} and {value}
    required: bool = False
    types: frozenset[type] = frozenset()
    values: frozenset[str] = frozenset()

    def ok(self, v: Any) -> bool:
        if self.required:
            return v is not None
        if self.types:
            return type(v) in self.types
        return v is None or (type(v) is str and v in self.values)  # a list would not even hash

    def column_ok(self, col: list | tuple) -> bool:
        if self.required:
            return None not in col
        if self.types:
            return set(map(type, col)) <= self.types
        return set(map(type, col)) <= _STR_OR_NONE and set(col) <= self.values | {None}

    def broken(self, d: dict) -> tuple[str, str] | None:
        v = d.get(self.field)
        if self.ok(v):
            return None
        return self.reason, self.detail.format(field=self.field, type=type(v).__name__, value=repr(str(v)[:50]))


#: Shared by samples and columnar messages (their message-level fields), in the order a message's problem is named.
_ID_RULES = (
    _Rule("precision", "schema_violation", "unknown precision {value}", values=_PRECISIONS),
    *(_Rule(k, "wrong_type", "{field} must be a string", types=_STR_OR_NONE) for k in _STR_IDS),
    _Rule("gpu_index", "wrong_type", "gpu_index must be an integer", types=frozenset([int, type(None)])),
)
_INTERVAL_RULE = _Rule("interval_s", "wrong_type", "interval_s is a {type}, not a number",
                       types=frozenset([int, float, type(None)]))
#: A columnar message's shared fields (its columns are checked apart).
_COLUMN_RULES = (*_ID_RULES, _INTERVAL_RULE)
#: A native sample (a message, or a row of a TelemetryBatch); `ts` and the readings are checked as numbers apart.
_SAMPLE_RULES = (
    _Rule("device", "schema_violation", "device and node are required", required=True),
    _Rule("node", "schema_violation", "device and node are required", required=True),
    _Rule("device", "wrong_type", "device and node must be strings", types=frozenset([str])),
    _Rule("node", "wrong_type", "device and node must be strings", types=frozenset([str])),
    _INTERVAL_RULE,
    *_ID_RULES,
)


def _first_broken(d: dict, rules: tuple[_Rule, ...]) -> tuple[str, str] | None:
    for r in rules:
        bad = r.broken(d)
        if bad:
            return bad
    return None


class NativeDecoder:
    """TelemetrySample / TelemetryBatch / TelemetryColumns, told apart by shape."""

    def decode(self, values: list[bytes | None], out: RowBuilder, errors: list[DecodeError]) -> None:
        if len(values) > 1 and None not in values and self._fast(values, out):
            return
        for i, raw in enumerate(values):
            d = _loads(raw, i, errors)
            if d is None:
                continue
            if not isinstance(d, dict):
                errors.append(DecodeError(i, "schema_violation", "message is not a JSON object"))
            elif isinstance(d.get("ts"), list):
                self._columns(i, d, out, errors)
            elif "samples" in d:
                samples = d["samples"]
                if not isinstance(samples, list):
                    errors.append(DecodeError(i, "schema_violation", "samples is not a list"))
                    continue
                node = d.get("node")
                if not samples:  # nothing to count in a window: said so by a letter, not dropped silently
                    errors.append(DecodeError(i, "schema_violation", "samples is empty"))
                for j, s in enumerate(samples):
                    if isinstance(s, dict) and node is not None and "node" not in s:
                        s = {**s, "node": node}
                    bad = self._sample(i, s, out)
                    if bad:
                        errors.append(DecodeError(i, bad[0], bad[1], row=s if isinstance(s, dict) else None,
                                                  row_index=j))
            else:
                bad = self._sample(i, d, out)
                if bad:
                    errors.append(DecodeError(i, bad[0], bad[1]))

    @staticmethod
    def _fast(values: list[bytes], out: RowBuilder) -> bool:
        """A batch of clean per-sample messages, decoded column-wise in a few C-level passes. Anything unusual
        (malformed JSON, other shapes, unknown fields, wrong types) returns False and the batch takes the
        message-by-message path, which pins each problem on its message."""
        try:
            ds = orjson.loads(b"[" + b",".join(values) + b"]")
        except orjson.JSONDecodeError:
            return False
        n = len(ds)
        if n != len(values) or set(map(type, ds)) != {dict}:
            return False
        if type(ds[0].get("ts")) is list:
            return NativeDecoder._fast_columns(ds, out)
        shapes = set(map(tuple, ds))  # key sequences; one exporter writes one shape
        if len(shapes) == 1:
            order = shapes.pop()
            keys = set(order)
            col = dict(zip(order, zip(*map(dict.values, ds), strict=True), strict=True))  # transposed in C
        else:
            keys = set().union(*shapes)
            col = {k: [d.get(k) for d in ds] for k in keys}
        if not keys <= _SAMPLE_KEYS or not {"ts", "device", "node"} <= keys:
            return False
        ts = col["ts"]
        if None in ts or not all(r.column_ok(col[r.field]) for r in _SAMPLE_RULES if r.field in col):
            return False
        metrics = np.full((n, N_METRICS), np.nan)
        ts_a = _floats(ts)
        interval = _floats(col["interval_s"]) if "interval_s" in keys else np.full(n, np.nan)
        if ts_a is None or interval is None:
            return False
        for f in keys & _METRIC_SET:
            a = _floats(col[f])
            if a is None:  # a string, bool, list or object among the readings: the slow path letters it
                return False
            metrics[:, METRIC_INDEX[f]] = a

        def ids(name: str) -> list | tuple:
            return col[name] if name in col else [None] * n

        id_cols = {name: ids(key) for name, key in ROW_ID_COLUMNS.items()}
        id_cols["account"] = list(id_cols["account"])  # a list of its own: the inventory fills it in place
        out.prebuilt = Rows(ts=ts_a, interval=interval, metrics=metrics, msg=np.arange(n, dtype=np.int64), **id_cols)
        return True

    @staticmethod
    def _fast_columns(ds: list[dict], out: RowBuilder) -> bool:
        """A batch of clean TelemetryColumns messages: concatenate the columns, one numpy conversion per metric."""
        ks = []
        names: set[str] = set()
        for d in ds:
            ts, dev, node, metrics = d.get("ts"), d.get("device"), d.get("node"), d.get("metrics") or {}
            if (type(ts) is not list or not ts or not d.keys() <= _COLUMN_KEYS or type(node) is not str or not node
                    or type(dev) is not list or len(dev) != len(ts) or type(metrics) is not dict
                    or _first_broken(d, _COLUMN_RULES)):
                return False
            k = len(ts)
            for col in metrics.values():
                if type(col) is not list or len(col) != k:
                    return False
            names.update(metrics)
            ks.append(k)
        if not names <= _METRIC_SET:
            return False
        n = sum(ks)
        ts_l: list = []
        dev_l: list = []
        for d in ds:
            ts_l.extend(d["ts"])
            dev_l.extend(d["device"])
        if None in ts_l or set(map(type, dev_l)) - {str}:
            return False
        metrics_a = np.full((n, N_METRICS), np.nan)
        ts_a = _floats(ts_l)
        if ts_a is None:
            return False
        for name in names:
            col_l: list = []
            for d, k in zip(ds, ks, strict=True):
                c = d["metrics"].get(name)
                col_l.extend(c if c is not None else [None] * k)
            a = _floats(col_l)
            if a is None:
                return False
            metrics_a[:, METRIC_INDEX[name]] = a

        def per_row(key: str) -> list:
            col: list = []
            for d, k in zip(ds, ks, strict=True):
                col.extend([d.get(key)] * k)
            return col

        interval = np.repeat(np.array([d.get("interval_s") for d in ds], dtype=np.float64), ks)
        id_cols = {name: per_row(key) for name, key in ID_COLUMNS.items() if name != "device"}
        out.prebuilt = Rows(ts=ts_a, interval=interval, metrics=metrics_a,
                            msg=np.repeat(np.arange(len(ds), dtype=np.int64), ks), device=dev_l, **id_cols,
                            gpu_index=[None] * n, ids_per_message=True)
        return True

    @staticmethod
    def _sample(i: int, d: Any, out: RowBuilder) -> tuple[str, str] | None:
        """Add one sample; or (reason, detail) why not."""
        if not isinstance(d, dict):
            return "schema_violation", "sample is not a JSON object"
        if not d.keys() <= _SAMPLE_KEYS:
            return "schema_violation", f"unknown field(s) {sorted(d.keys() - _SAMPLE_KEYS)}"[:300]
        ts = d.get("ts")
        if ts is None:
            return "schema_violation", "ts is missing"
        if not _num(ts):
            return "wrong_type", f"ts is a {type(ts).__name__}, not a number"
        bad = _first_broken(d, _SAMPLE_RULES)
        if bad:
            return bad
        device, node, interval, prec = d["device"], d["node"], d.get("interval_s"), d.get("precision")
        for f in d.keys() & _METRIC_SET:
            v = d[f]
            if v is not None and not _num(v):  # "0.5", "Infinity", true: a wrong type, never read as a number
                return "wrong_type", f"{f} is a {type(v).__name__}, not a number"
        out.add_row(
            i, ts, [d.get(f) for f in METRIC_FIELDS], device=device, node=node, accelerator=d.get("accelerator"),
            workload=d.get("workload_id"), account=d.get("account_id"), job=d.get("job_id"),
            run_label=d.get("run_label"), precision=prec, gpu_index=d.get("gpu_index"), interval=interval,
        )
        return None

    @staticmethod
    def _columns(i: int, d: dict, out: RowBuilder, errors: list[DecodeError]) -> None:
        def fail(why: str) -> None:
            errors.append(DecodeError(i, "schema_violation", why))

        def wrong(why: str) -> None:
            errors.append(DecodeError(i, "wrong_type", why))

        if not d.keys() <= _COLUMN_KEYS:
            return fail(f"unknown field(s) {sorted(d.keys() - _COLUMN_KEYS)}"[:300])
        ts, devices, metrics, node = d["ts"], d.get("device"), d.get("metrics") or {}, d.get("node")
        if not isinstance(node, str) or not node:
            return fail("node missing")
        if not isinstance(devices, list) or len(devices) != len(ts) or not isinstance(metrics, dict):
            return fail("device must be a list as long as ts; metrics a dict")
        bad = _first_broken(d, _ID_RULES)
        if bad:
            return errors.append(DecodeError(i, *bad))
        k = len(ts)
        if not k:
            return fail("ts is empty")
        block = np.full((k, N_METRICS), np.nan)
        ts_arr = _floats(ts)
        if ts_arr is None:
            return wrong("ts entries must be numbers")
        for name, col in metrics.items():
            j = METRIC_INDEX.get(name)
            if j is None:
                return fail(f"unknown metric {name[:50]!r}")
            if not isinstance(col, list) or len(col) != k:
                return fail(f"metric {name} is not a list of {k} values")
            a = _floats(col)
            if a is None:
                return wrong(f"metric {name} holds a value that is not a number")
            block[:, j] = a
        interval = d.get("interval_s")
        if interval is not None and not _num(interval):
            return wrong("interval_s is not a number")
        if not all(type(x) is str for x in devices):
            return wrong("device entries must be strings")
        out.add_columns(
            i, ts_arr.tolist(), devices, block, node=node, accelerator=d.get("accelerator"),
            workload=d.get("workload_id"), account=d.get("account_id"), job=d.get("job_id"),
            run_label=d.get("run_label"), precision=d.get("precision"), interval=interval,
        )
        return None


def _attr_value(v: dict) -> Any:
    for k in ("stringValue", "intValue", "doubleValue", "boolValue"):
        if k in v:
            return v[k]
    return None


def _attrs(items: Any) -> dict[str, Any]:
    if not isinstance(items, list):
        return {}
    return {a["key"]: _attr_value(a.get("value") or {}) for a in items if isinstance(a, dict) and "key" in a}


@dataclass(slots=True)
class _PendingRow:
    msg: int
    labels: dict[str, Any]
    values: list = field(default_factory=lambda: [None] * N_METRICS)


def _emit_pending(rows: dict[tuple[str, float], _PendingRow], labels: LabelMap, out: RowBuilder) -> None:
    for (device, ts), r in rows.items():
        lab = r.labels
        out.add_row(
            r.msg, ts, r.values, device=device, node=labels.first(lab, labels.node),
            accelerator=labels.first(lab, labels.accelerator), workload=labels.first(lab, labels.workload),
            account=labels.first(lab, labels.account), job=labels.first(lab, labels.job),
            run_label=labels.first(lab, labels.run_label), gpu_index=None,
        )


class OtlpJsonDecoder:
    """OTLP ExportMetricsServiceRequest (JSON). Data points of one (device, time) become one row."""

    merges_rows = True  # fragments of one (device, time) in later messages are merged by the core

    def __init__(self, labels: LabelMap | None = None) -> None:
        self.labels = labels or LabelMap()
        self.unknown_metrics = 0

    def decode(self, values: list[bytes | None], out: RowBuilder, errors: list[DecodeError]) -> None:
        for i, raw in enumerate(values):
            d = _loads(raw, i, errors)
            if d is None:
                continue
            rows: dict[tuple[str, float], _PendingRow] = {}
            try:
                self._request(i, d, rows)
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                errors.append(DecodeError(i, "schema_violation", f"OTLP: {type(exc).__name__}: {exc}"))
                continue
            _emit_pending(rows, self.labels, out)

    def _request(self, i: int, d: dict, rows: dict[tuple[str, float], _PendingRow]) -> None:
        if not isinstance(d, dict) or not isinstance(d.get("resourceMetrics"), list):
            raise ValueError("no resourceMetrics list")
        lm = self.labels
        for rm in d["resourceMetrics"]:
            rattrs = _attrs((rm.get("resource") or {}).get("attributes"))
            for sm in rm.get("scopeMetrics") or []:
                for m in sm.get("metrics") or []:
                    j = METRIC_INDEX.get(NAME_TO_FIELD.get(m.get("name"), ""))
                    data = m.get("gauge") or m.get("sum")
                    if j is None or data is None:
                        self.unknown_metrics += 1  # other series share the request; not an error
                        continue
                    for dp in data.get("dataPoints") or []:
                        labels = {**rattrs, **_attrs(dp.get("attributes"))}
                        device = lm.first(labels, lm.device)
                        if device is None:
                            raise ValueError(f"data point of {m.get('name')} has no device label")
                        ts = int(dp["timeUnixNano"]) / 1e9
                        v = dp.get("asDouble")
                        if v is None and dp.get("asInt") is not None:
                            v = float(int(dp["asInt"]))
                        if v is not None and not _num(v):
                            v = float(v)  # "NaN"/"Infinity" arrive as strings in proto3 JSON
                        row = rows.get((device, ts))
                        if row is None:
                            row = rows[(device, ts)] = _PendingRow(i, labels)
                        row.values[j] = v


class PrometheusJsonDecoder:
    """prometheus-kafka-adapter: one sample per message. Samples of one (device, time) in a batch merge into a row;
    the core merges fragments that arrive in later batches (IngestCore, `merges_rows`)."""

    merges_rows = True

    def __init__(self, labels: LabelMap | None = None) -> None:
        self.labels = labels or LabelMap()
        self.unknown_metrics = 0

    def decode(self, values: list[bytes | None], out: RowBuilder, errors: list[DecodeError]) -> None:
        rows: dict[tuple[str, float], _PendingRow] = {}
        lm = self.labels
        for i, raw in enumerate(values):
            d = _loads(raw, i, errors)
            if d is None:
                continue
            try:
                labels = d["labels"]
                name = d.get("name") or labels.get("__name__")
                j = METRIC_INDEX.get(NAME_TO_FIELD.get(name, ""))
                if j is None:
                    self.unknown_metrics += 1
                    continue
                device = lm.first(labels, lm.device)
                if device is None:
                    raise ValueError("no device label")
                ts = datetime.fromisoformat(d["timestamp"]).timestamp()
                v = float(d["value"])
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                errors.append(DecodeError(i, "schema_violation", f"prometheus: {type(exc).__name__}: {exc}"))
                continue
            row = rows.get((device, ts))
            if row is None:
                row = rows[(device, ts)] = _PendingRow(i, labels)
            row.values[j] = v
        _emit_pending(rows, lm, out)


def make_decoder(name: str, labels: LabelMap | None = None) -> Decoder:
    if name == "native":
        return NativeDecoder()
    if name == "otlp_json":
        return OtlpJsonDecoder(labels)
    if name == "prometheus_json":
        return PrometheusJsonDecoder(labels)
    raise ConfigError(f"unknown decoder {name!r} (native | otlp_json | prometheus_json)")
