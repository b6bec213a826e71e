"""The telemetry files users have, read into native samples: auto-detected, every rejected line with its reason.

Formats (`detect_format`):
- `jsonl`: native TelemetrySample lines; DCGM / nvidia-smi field names are accepted as keys, values may carry
  units ("72 W", "45 %", "[N/A]"), timestamps may be epoch s / ms / us / ns or ISO 8601.
- `nvidia_smi_csv`: `nvidia-smi --query-gpu=... --format=csv[,noheader][,nounits]`; with or without an index or
  uuid column (without one, the rows of one timestamp are the GPUs in index order); units in the header
  ("power.draw [W]") or in the values ("72.50 W"). A file without a header needs `columns=` (the query list).
- `dcgmi_dmon`: `dcgmi dmon -e ...` output (`#Entity GPUTL POWER ...` header, `GPU 0 ...` rows); it prints no
  times, so rows are placed `interval_s` apart from `start` unless a leading time column is present.
- `prometheus`: dcgm-exporter text exposition (`DCGM_FI_DEV_GPU_UTIL{gpu="0",UUID="GPU-...",modelName=...} 45
  1716200000000`); every sample needs its scrape timestamp.

Units and scales are detected or refused, never silently misread: a utilisation whose values all lie in [0, 1]
with fractional values is read as a fraction (noted); a profiling fraction sent in percent (values above 1) is
divided by 100 (noted); an unknown unit rejects the line. Unknown extra columns or keys are ignored with a note.
Samples are grouped per workload (`workload_by` column / label, else the file's own workload ids, else one
workload named `run_id`), sorted by time within each, and given an `interval_s` from the device's own median gap
when the file has none (a missing interval must not count a first sample as 30 s).
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from schemas.telemetry import DCGM_NAMES, FRACTION_FIELDS, METRIC_FIELDS, PERCENT_FIELDS, TelemetrySample

FORMATS = ("jsonl", "nvidia_smi_csv", "dcgmi_dmon", "prometheus")
#: Identity keys a native sample may carry besides its metrics.
ID_KEYS = ("ts", "node", "device", "gpu_index", "accelerator", "account_id", "workload_id", "job_id", "run_label",
           "interval_s", "precision", "schema_version")

#: Aliases (lower case, units stripped) -> native field.
ALIASES: dict[str, str] = {
    **{v.lower(): k for k, v in DCGM_NAMES.items()},
    **{k: k for k in METRIC_FIELDS}, **{k: k for k in ID_KEYS},
    # nvidia-smi --query-gpu names
    "timestamp": "ts", "time": "ts", "index": "gpu_index", "gpu": "gpu_index", "uuid": "device", "gpu_uuid": "device",
    "name": "accelerator", "gpu_name": "accelerator", "modelname": "accelerator", "model": "accelerator",
    "hostname": "node", "host": "node", "instance": "node",
    "utilization.gpu": "gpu_util", "utilization.memory": "mem_copy_util", "memory.used": "fb_used_mib",
    "memory.free": "fb_free_mib", "memory.total": "_fb_total", "power.draw": "power_w",
    "power.draw.instant": "power_w", "power.draw.average": "power_w", "clocks.sm": "sm_clock_mhz",
    "clocks.current.sm": "sm_clock_mhz", "clocks.mem": "mem_clock_mhz", "clocks.current.memory": "mem_clock_mhz",
    "util": "gpu_util", "gpu_util_pct": "gpu_util", "power": "power_w", "fb_used": "fb_used_mib",
    # the GPU capture tool's NVML / GPM keys (../shared/reference/gpu-capture.md; `_pct` = percent): any-tensor is
    # DCGM's PIPE_TENSOR_ACTIVE; the FP64 tensor (DFMA) share is not folded into fp64_active here (a row-wise sum:
    # pipeline/gpu_capture.py does it for the project's own capture)
    "mem_util_pct": "mem_copy_util", "gpm_sm_util_pct": "sm_active", "gpm_sm_occupancy_pct": "sm_occupancy",
    "gpm_any_tensor_util_pct": "tensor_active", "gpm_dram_bw_util_pct": "dram_active",
    "gpm_fp64_util_pct": "fp64_active", "gpm_fp32_util_pct": "fp32_active", "gpm_fp16_util_pct": "fp16_active",
    # dcgmi dmon short names (dcgmi dmon -l)
    "gputl": "gpu_util", "mcutl": "mem_copy_util", "fbusd": "fb_used_mib", "fbfre": "fb_free_mib",
    "fbtot": "_fb_total", "smclk": "sm_clock_mhz", "mmclk": "mem_clock_mhz", "gract": "gr_engine_active",
    "smact": "sm_active", "smocc": "sm_occupancy", "tenso": "tensor_active", "drama": "dram_active",
    "fp64a": "fp64_active", "fp32a": "fp32_active", "fp16a": "fp16_active", "pcitx": "pcie_tx_bytes",
    "pcirx": "pcie_rx_bytes", "nvltx": "nvlink_tx_bytes", "nvlrx": "nvlink_rx_bytes", "totec": "energy_mj",
    "entityid": "gpu_index",
}
#: Unit -> (kind, factor to the native unit).
UNITS: dict[str, tuple[str, float]] = {
    "%": ("percent", 1.0), "w": ("power", 1.0), "mw": ("power", 1e-3), "kw": ("power", 1e3),
    "mib": ("memory", 1.0), "gib": ("memory", 1024.0), "kib": ("memory", 1 / 1024), "mb": ("memory", 1e6 / 2**20),
    "gb": ("memory", 1e9 / 2**20), "b": ("memory", 1 / 2**20), "mhz": ("clock", 1.0), "ghz": ("clock", 1e3),
    "b/s": ("rate", 1.0), "mj": ("energy", 1.0), "j": ("energy", 1e3),
}
_FIELD_KIND = {**dict.fromkeys(PERCENT_FIELDS, "percent"), "power_w": "power", "fb_used_mib": "memory",
               "fb_free_mib": "memory", "_fb_total": "memory", "sm_clock_mhz": "clock", "mem_clock_mhz": "clock",
               "energy_mj": "energy"}
_MISSING = {"", "[n/a]", "n/a", "na", "nan", "none", "null", "[not supported]", "not supported", "-", "[unknown error]",
            "n/s"}
_NUM_UNIT = re.compile(r"^\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*([a-zA-Z%/]*)\s*$")
_HEADER_UNIT = re.compile(r"^(.*?)\s*\[([^\]]+)\]\s*$")
_PROM = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)(?:\s+(\d+))?\s*$")
_PROM_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


class TraceError(ValueError):
    """A file that cannot be read at all (unknown format, missing header): one line, no traceback."""


@dataclass
class ParsedTrace:
    format: str
    samples: list[dict[str, Any]] = field(default_factory=list)  # valid native samples, grouped and sorted
    errors: list[tuple[int, str]] = field(default_factory=list)  # (line number, reason)
    notes: list[str] = field(default_factory=list)
    lines: int = 0

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)


def detect_format(text: str) -> str:
    head = [ln.strip() for ln in text.splitlines()[:50] if ln.strip()]
    if not head:
        raise TraceError("empty file")
    if head[0].startswith("{"):
        return "jsonl"
    if any(ln.startswith("#Entity") or ln.startswith("# Entity") for ln in head) or \
            any(re.match(r"^(GPU|GPU-I|GPU-CI)\s+\d+\s", ln) for ln in head):
        return "dcgmi_dmon"
    if any(ln.startswith("# TYPE") or ln.startswith("# HELP") for ln in head) or any(
            _PROM.match(ln) and ("{" in ln and "DCGM_" in ln) for ln in head):
        return "prometheus"
    if "," in head[0]:
        return "nvidia_smi_csv"
    raise TraceError("unrecognised format: not JSONL, nvidia-smi CSV, dcgmi dmon or Prometheus text")


def parse_ts(v: Any) -> float:
    """Epoch seconds from epoch s / ms / us / ns numbers, ISO 8601 or nvidia-smi's 'YYYY/MM/DD HH:MM:SS.fff'
    (no zone: read as UTC)."""
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        x = float(v)
    else:
        s = str(v).strip()
        try:
            x = float(s)
        except ValueError:
            s2 = s.replace("/", "-").replace("Z", "+00:00")
            try:
                d = datetime.fromisoformat(s2)
            except ValueError as exc:
                raise ValueError(f"unreadable timestamp {s!r}") from exc
            return (d if d.tzinfo else d.replace(tzinfo=UTC)).timestamp()
    # epoch seconds stay below 1e11 until the year 5138: larger numbers are ms, us or ns
    for limit, scale in ((1e17, 1e9), (1e14, 1e6), (1e11, 1e3)):
        if x > limit:
            return x / scale
    return x


def _value(raw: Any, fld: str, header_unit: str | None) -> float | None:
    """A reading in the native unit; None for N/A; ValueError for an unknown or mismatched unit."""
    if raw is None:
        return None
    if isinstance(raw, bool):
        raise ValueError(f"{fld}: boolean value")
    if isinstance(raw, (int, float)):
        num, unit = float(raw), ""
    else:
        s = str(raw).strip()
        if s.lower() in _MISSING:
            return None
        m = _NUM_UNIT.match(s)
        if not m:
            raise ValueError(f"{fld}: unreadable value {s!r}")
        num, unit = float(m.group(1)), m.group(2)
    unit = (unit or header_unit or "").strip().lower()
    if not math.isfinite(num):
        return None
    if not unit:
        return num
    if unit not in UNITS:
        raise ValueError(f"{fld}: unknown unit {unit!r}")
    kind, factor = UNITS[unit]
    want = _FIELD_KIND.get(fld)
    if fld in FRACTION_FIELDS and kind == "percent":
        return num / 100.0
    if want is None and fld not in FRACTION_FIELDS and kind not in ("rate",):
        raise ValueError(f"{fld}: unit {unit!r} does not fit this field")
    if want is not None and want != kind:
        raise ValueError(f"{fld}: unit {unit!r} is not a {want} unit")
    return num * factor


def _norm_key(k: str) -> tuple[str | None, str | None]:
    """(native field or None, unit from the header or None) for a column / key name."""
    k = k.strip().strip('"')
    unit = None
    m = _HEADER_UNIT.match(k)
    if m:
        k, unit = m.group(1), m.group(2)
    k = k.strip().lower()
    if unit is None and k.endswith("_pct"):  # the unit in the name: percent, whatever the values look like
        unit = "%"
    return ALIASES.get(k), unit


# ---------------------------------------------------------------------------------------------------------------
# per-format readers: (line number, raw record with native keys and raw values, header units)
# ---------------------------------------------------------------------------------------------------------------
Rec = tuple[int, dict[str, Any], dict[str, str | None], dict[str, Any]]  # line, fields, units, extra labels


def _jsonl(text: str, out: ParsedTrace) -> Iterable[Rec]:
    for i, ln in enumerate(text.splitlines(), 1):
        if not ln.strip():
            continue
        try:
            obj = json.loads(ln)
        except json.JSONDecodeError as exc:
            out.errors.append((i, f"not JSON: {exc.msg}"))
            continue
        if not isinstance(obj, dict):
            out.errors.append((i, "not a JSON object"))
            continue
        rec: dict[str, Any] = {}
        units: dict[str, str | None] = {}
        extra: dict[str, Any] = {}
        for k, v in obj.items():
            f, u = _norm_key(str(k))
            if f is None:
                out.note(f"ignored unknown key {k!r}")
                extra[str(k)] = v
                continue
            rec[f], units[f] = v, u
        yield i, rec, units, {**extra, **obj}


def _csv(text: str, out: ParsedTrace, columns: list[str] | None) -> Iterable[Rec]:
    rows = list(csv.reader(io.StringIO(text), skipinitialspace=True))
    start = 0
    if columns is None:
        header = [c.strip() for c in rows[0]] if rows else []
        if not any(_norm_key(h)[0] for h in header):
            raise TraceError("CSV without a header: pass --columns with the --query-gpu list")
        start = 1
    else:
        header = columns
    keys = [_norm_key(h) for h in header]
    for h, (f, _) in zip(header, keys, strict=True):
        if f is None:
            out.note(f"ignored unknown column {h!r}")
    for r, row in enumerate(rows[start:], start + 1):
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) != len(header):
            out.errors.append((r, f"{len(row)} columns, header has {len(header)}"))
            continue
        rec, units, extra = {}, {}, {}
        for h, (f, u), v in zip(header, keys, row, strict=True):
            extra[h.strip()] = v.strip()
            if f is not None:
                rec[f], units[f] = v.strip(), u
        yield r, rec, units, extra


def _dmon(text: str, out: ParsedTrace, interval_s: float | None, start: float | None) -> Iterable[Rec]:
    header: list[str] | None = None
    units: dict[str, str | None] = {}
    tick = -1
    seen: set[str] = set()
    for i, ln in enumerate(text.splitlines(), 1):
        s = ln.strip()
        if not s:
            continue
        if s.startswith("#"):
            toks = s.lstrip("#").split()
            if toks and toks[0].lower() == "entity":
                header = toks[1:]
                if toks[1:2] == ["ID"]:
                    header = toks[2:]
            elif header is not None and toks and toks[0].lower() == "id":
                pass  # the second header line holds units: dmon prints W, MHz, MB, ... ; read by field below
            continue
        if s.upper().startswith("ID") and header is not None:
            units = {f"u{j}": u for j, u in enumerate(s.split()[1:])}
            continue
        toks = s.split()
        if header is None:
            out.errors.append((i, "data row before the '#Entity' header"))
            continue
        lead_ts = None
        if toks and not toks[0].startswith("GPU"):
            try:  # a leading time column (e.g. piped through `ts` or a logger)
                lead_ts = parse_ts(toks[0] if len(toks) == len(header) + 3 else " ".join(toks[:2]))
                toks = toks[1:] if len(toks) == len(header) + 3 else toks[2:]
            except ValueError:
                out.errors.append((i, f"unreadable row start {toks[0]!r}"))
                continue
        if len(toks) != len(header) + 2 or not toks[0].startswith("GPU"):
            out.errors.append((i, f"expected 'GPU <id>' and {len(header)} values"))
            continue
        ent = toks[1]
        if ent in seen or tick < 0:  # a GPU seen again: the next sampling round
            tick, seen = tick + 1, set()
        seen.add(ent)
        if lead_ts is None:
            if interval_s is None or start is None:
                raise TraceError("dcgmi dmon output has no times: pass --interval (the -d delay in seconds) and "
                                 "--start (epoch seconds or ISO time of the first row)")
            lead_ts = start + tick * interval_s
        rec: dict[str, Any] = {"ts": lead_ts, "gpu_index": int(ent) if ent.isdigit() else ent}
        u: dict[str, str | None] = {}
        for j, (h, v) in enumerate(zip(header, toks[2:], strict=True)):
            f, hu = _norm_key(h)
            if f is None:
                out.note(f"ignored unknown column {h!r}")
                continue
            rec[f] = v
            u[f] = hu or _dmon_unit(f, units.get(f"u{j}"))
        yield i, rec, u, {}


def _dmon_unit(f: str, printed: str | None) -> str | None:
    # dcgmi prints "MB" for framebuffer fields, which are MiB (DCGM_FI_DEV_FB_USED is in MiB)
    if printed is None or printed.upper() in ("", "N/A"):
        return None
    return "MiB" if f in ("fb_used_mib", "fb_free_mib", "_fb_total") and printed.upper() == "MB" else printed


def _prometheus(text: str, out: ParsedTrace) -> Iterable[Rec]:
    groups: dict[tuple[str, float], tuple[int, dict[str, Any], dict[str, Any]]] = {}
    for i, ln in enumerate(text.splitlines(), 1):
        s = ln.strip()
        if not s or s.startswith("#"):
            continue
        m = _PROM.match(s)
        if not m:
            out.errors.append((i, "not a Prometheus sample line"))
            continue
        name, labels_s, value, ts_ms = m.group(1), m.group(3) or "", m.group(4), m.group(5)
        f, _ = _norm_key(name)
        if f is None or f not in METRIC_FIELDS:
            out.note(f"ignored unknown metric {name!r}")
            continue
        if ts_ms is None:
            out.errors.append((i, f"{name}: no timestamp (scrapes must carry their time)"))
            continue
        labels = dict(_PROM_LABEL.findall(labels_s))
        dev = labels.get("UUID") or labels.get("uuid") or f"{labels.get('Hostname', 'host')}:gpu{labels.get('gpu')}"
        key = (dev, float(ts_ms) / 1e3)
        line, rec, lab = groups.setdefault(key, (i, {"ts": key[1], "device": dev}, labels))
        rec[f] = value
        for lk, fk in (("Hostname", "node"), ("modelName", "accelerator"), ("gpu", "gpu_index")):
            if lk in labels:
                rec[fk] = labels[lk]
    for line, rec, lab in groups.values():
        yield line, rec, {}, lab


# ---------------------------------------------------------------------------------------------------------------
def parse_trace(text: str, *, fmt: str | None = None, run_id: str = "run", workload_by: str | None = None,
                columns: list[str] | None = None, accelerator: str | None = None, interval_s: float | None = None,
                start: float | None = None, now: float | None = None) -> ParsedTrace:
    """Every sample of a telemetry file as native sample dicts, grouped per workload and sorted by time."""
    fmt = fmt or detect_format(text)
    if fmt not in FORMATS:
        raise TraceError(f"unknown format {fmt!r} (one of {', '.join(FORMATS)})")
    out = ParsedTrace(fmt)
    out.lines = sum(1 for ln in text.splitlines() if ln.strip())
    reader = {"jsonl": lambda: _jsonl(text, out), "nvidia_smi_csv": lambda: _csv(text, out, columns),
              "dcgmi_dmon": lambda: _dmon(text, out, interval_s, start), "prometheus": lambda: _prometheus(text, out)}
    raw = list(reader[fmt]())
    if workload_by:
        out.notes = [n for n in out.notes if n not in (f"ignored unknown column {workload_by!r}",
                                                        f"ignored unknown key {workload_by!r}")]
    if workload_by and workload_by != "file" and not any(workload_by in extra or workload_by in rec
                                                         for _, rec, _, extra in raw):
        raise TraceError(f"--workload-by {workload_by!r}: no such column, key or label in the file")
    recs: list[tuple[int, dict[str, Any]]] = []
    for line, rec, units, extra in raw:
        try:
            recs.append((line, _to_native(rec, units, extra, run_id, workload_by, accelerator)))
        except ValueError as exc:
            out.errors.append((line, str(exc)))
    _scale_checks(recs, out)
    _positional_devices(recs)
    _fill_intervals(recs, out, interval_s)
    valid: list[tuple[int, dict[str, Any]]] = []
    ctx = {"now": now} if now is not None else None
    for line, s in recs:
        try:
            TelemetrySample.model_validate(s, context=ctx)
        except ValidationError as exc:
            e = exc.errors()[0]
            out.errors.append((line, f"{'.'.join(str(p) for p in e['loc']) or 'sample'}: {e['msg']}"))
            continue
        valid.append((line, s))
    valid.sort(key=lambda ls: (str(ls[1].get("workload_id")), ls[1]["ts"], ls[0]))
    out.samples = [s for _, s in valid]
    out.errors.sort()
    return out


def _to_native(rec: dict[str, Any], units: dict[str, str | None], extra: dict[str, Any], run_id: str,
               workload_by: str | None, accelerator: str | None) -> dict[str, Any]:
    if "ts" not in rec or rec["ts"] in (None, ""):
        raise ValueError("no timestamp")
    s: dict[str, Any] = {"ts": parse_ts(rec["ts"])}
    for k in ID_KEYS[1:]:
        if k in rec and rec[k] not in (None, "") and k != "schema_version":
            s[k] = rec[k]
    if "gpu_index" in s:
        try:
            s["gpu_index"] = int(float(s["gpu_index"]))
        except (TypeError, ValueError):
            s.pop("gpu_index")
    if "interval_s" in s:
        s["interval_s"] = float(_value(s["interval_s"], "interval_s", None) or 0) or None
    for k in ("node", "device", "accelerator", "account_id", "workload_id", "job_id", "run_label"):
        if k in s:
            s[k] = str(s[k])
    for f in METRIC_FIELDS:
        if f in rec:
            v = _value(rec[f], f, units.get(f))
            if v is not None:
                s[f] = v
    if "_fb_total" in rec and "fb_free_mib" not in s and "fb_used_mib" in s:
        total = _value(rec["_fb_total"], "_fb_total", units.get("_fb_total"))
        if total is not None:
            s["fb_free_mib"] = max(total - s["fb_used_mib"], 0.0)
    if workload_by == "file":
        s["workload_id"] = run_id
    elif workload_by:
        v = extra.get(workload_by, rec.get(workload_by))
        if v in (None, ""):
            raise ValueError(f"no {workload_by!r} to group by")
        s["workload_id"] = str(v)
    s.setdefault("workload_id", run_id)
    s.setdefault("node", str(extra.get("Hostname") or extra.get("hostname") or "host"))
    if accelerator and not s.get("accelerator"):
        s["accelerator"] = accelerator
    return s


def _scale_checks(recs: list[tuple[int, dict[str, Any]]], out: ParsedTrace) -> None:
    """Percent fields sent as fractions, and profiling fractions sent in percent: detected per file and field."""
    for f in PERCENT_FIELDS:
        vals = [s[f] for _, s in recs if f in s]
        if vals and max(vals) <= 1.0 and any(0.0 < v < 1.0 and v != round(v) for v in vals):
            for _, s in recs:
                if f in s:
                    s[f] = s[f] * 100.0
            out.note(f"{f}: every value in [0, 1] with fractions: read as a fraction (x100)")
    for f in FRACTION_FIELDS:
        vals = [s[f] for _, s in recs if f in s]
        if vals and max(vals) > 1.0 and max(vals) <= 100.0:
            for _, s in recs:
                if f in s:
                    s[f] = s[f] / 100.0
            out.note(f"{f}: values above 1: read as percent (/100)")


def _positional_devices(recs: list[tuple[int, dict[str, Any]]]) -> None:
    """Without a uuid, a device is (node, gpu index); without an index either, the rows of one timestamp are the
    GPUs in index order (nvidia-smi prints them so)."""
    pos: dict[tuple[str, str, float], int] = defaultdict(int)
    for _, s in recs:
        if "device" in s:
            continue
        if "gpu_index" not in s:
            k = (s["workload_id"], s["node"], s["ts"])
            s["gpu_index"] = pos[k]
            pos[k] += 1
        s["device"] = f"{s['node']}:gpu{s['gpu_index']}"


def _fill_intervals(recs: list[tuple[int, dict[str, Any]]], out: ParsedTrace, given: float | None) -> None:
    by_dev: dict[str, list[float]] = defaultdict(list)
    for _, s in recs:
        by_dev[s["device"]].append(s["ts"])
    med: dict[str, float] = {}
    for d, ts in by_dev.items():
        ts = sorted(set(ts))
        gaps = sorted(b - a for a, b in itertools.pairwise(ts) if b > a)
        if gaps:
            med[d] = min(gaps[len(gaps) // 2], 3600.0)
    filled = 0
    for _, s in recs:
        if s.get("interval_s") is None:
            iv = given or med.get(s["device"])
            if iv:
                s["interval_s"] = iv
                filled += 1
    if filled:
        out.note(f"interval_s set on {filled} sample(s) from each device's median sampling gap")
