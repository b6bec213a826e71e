"""Synthetic DCGM-like telemetry in every wire format ingest reads: for its tests and its benchmark.

Not the simulator (pipeline/simulator): no ground truth, no customers — just plausible samples of a few workloads,
generated with numpy, and encoders to the native, columnar, OTLP JSON and prometheus-kafka-adapter formats.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
import orjson

from schemas.telemetry import DCGM_NAMES

_ID_KEYS = ("ts", "node", "device", "accelerator", "workload_id", "account_id", "job_id", "interval_s", "precision")


@dataclass(frozen=True, slots=True)
class WorkloadSpec:
    workload_id: str
    account_id: str | None = "acct-1"
    nodes: int = 2
    gpus_per_node: int = 4
    accelerator: str = "NVIDIA H100 80GB HBM3"
    synchronous: bool = True  # one shared activity signal (training-like) vs independent per device
    smi_only: bool = False  # only nvidia-smi level fields
    precision: str | None = None
    tensor: float = 0.6


def samples(specs: list[WorkloadSpec], t0: float, duration_s: float, interval_s: float, seed: int = 0,
            with_interval: bool = True) -> list[dict]:
    """Native sample dicts, time-ordered (then by workload, node, device)."""
    rng = np.random.default_rng(seed)
    times = t0 + np.arange(0.0, duration_s, interval_s)
    out: list[dict] = []
    shared = {s.workload_id: rng.uniform(-1, 1, len(times)) for s in specs}
    for ti, t in enumerate(times.tolist()):
        for s in specs:
            for n in range(s.nodes):
                node = f"{s.workload_id}-node-{n}"
                for g in range(s.gpus_per_node):
                    wave = shared[s.workload_id][ti] if s.synchronous else rng.uniform(-1, 1)
                    act = float(np.clip(s.tensor + 0.25 * wave, 0.0, 1.0))
                    d: dict = {"ts": round(t, 3), "node": node, "device": f"GPU-{s.workload_id}-{n}-{g}",
                               "accelerator": s.accelerator, "workload_id": s.workload_id, "account_id": s.account_id}
                    if with_interval:
                        d["interval_s"] = interval_s
                    if s.precision:
                        d["precision"] = s.precision
                    d.update(gpu_util=min(100.0, 60.0 + 40.0 * act), mem_copy_util=30.0 * act,
                             fb_used_mib=70_000.0, fb_free_mib=11_000.0, power_w=200.0 + 450.0 * act,
                             sm_clock_mhz=1980.0, mem_clock_mhz=2619.0)
                    if not s.smi_only:
                        d.update(tensor_active=act, sm_active=min(1.0, act + 0.2), gr_engine_active=min(1.0, act + 0.3),
                                 dram_active=0.5 * act, nvlink_tx_bytes=2e10 * act, nvlink_rx_bytes=2e10 * act,
                                 pcie_tx_bytes=1e8, pcie_rx_bytes=1e8)
                    out.append({k: v for k, v in d.items() if v is not None})
    return out


def native(rows: list[dict]) -> list[tuple[bytes, bytes]]:
    """(key = node, value) per sample."""
    return [(r["node"].encode(), orjson.dumps(r)) for r in rows]


def columnar(rows: list[dict], span_s: float = 0.0) -> list[tuple[bytes, bytes]]:
    """TelemetryColumns messages: one per node (and shared ids) per `span_s` of event time (0: per timestamp)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        bucket = r["ts"] if span_s <= 0 else r["ts"] // span_s
        key = tuple(r.get(k) for k in ("node", "accelerator", "workload_id", "account_id", "job_id", "interval_s",
                                       "precision"))
        groups.setdefault((bucket, *key), []).append(r)
    msgs = []
    for (_, *key), chunk in groups.items():
        names = sorted({k for r in chunk for k in r} - set(_ID_KEYS))
        m: dict = dict(zip(("node", "accelerator", "workload_id", "account_id", "job_id", "interval_s", "precision"),
                           key, strict=True))
        m = {k: v for k, v in m.items() if v is not None}
        m["ts"] = [r["ts"] for r in chunk]
        m["device"] = [r["device"] for r in chunk]
        m["metrics"] = {n: [r.get(n) for r in chunk] for n in names}
        msgs.append((key[0].encode(), orjson.dumps(m)))
    return msgs


def _kv(key: str, value: object) -> dict:
    return {"key": key, "value": {"stringValue": str(value)}}


def otlp(rows: list[dict]) -> list[tuple[bytes, bytes]]:
    """One ExportMetricsServiceRequest per (node, ts), as the OpenTelemetry Collector kafka exporter writes it."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["node"], r["ts"]), []).append(r)
    out = []
    for (node, ts), rs in groups.items():
        metrics = []
        for field, dcgm in DCGM_NAMES.items():
            dps = []
            for r in rs:
                if field not in r:
                    continue
                attrs = [_kv("UUID", r["device"]), _kv("modelName", r["accelerator"]), _kv("pod", r["workload_id"])]
                if r.get("account_id"):
                    attrs.append(_kv("namespace", r["account_id"]))
                v = r[field]
                dp: dict = {"attributes": attrs, "timeUnixNano": str(round(ts * 1e9))}
                if field in ("fb_used_mib", "fb_free_mib", "sm_clock_mhz", "mem_clock_mhz") and float(v).is_integer():
                    dp["asInt"] = str(int(v))
                else:
                    dp["asDouble"] = v
                dps.append(dp)
            if dps:
                metrics.append({"name": dcgm, "gauge": {"dataPoints": dps}})
        req = {"resourceMetrics": [{"resource": {"attributes": [_kv("host.name", node)]},
                                    "scopeMetrics": [{"scope": {"name": "dcgm"}, "metrics": metrics}]}]}
        out.append((node.encode(), orjson.dumps(req)))
    return out


def prometheus(rows: list[dict]) -> list[tuple[bytes, bytes]]:
    """prometheus-kafka-adapter: one message per (sample, metric), value as a string, RFC 3339 timestamp."""
    out = []
    for r in rows:
        ts = datetime.fromtimestamp(r["ts"], UTC).isoformat().replace("+00:00", "Z")
        for field, dcgm in DCGM_NAMES.items():
            if field not in r:
                continue
            labels = {"__name__": dcgm, "UUID": r["device"], "Hostname": r["node"], "modelName": r["accelerator"],
                      "pod": r["workload_id"]}
            if r.get("account_id"):
                labels["namespace"] = r["account_id"]
            msg = {"timestamp": ts, "value": repr(float(r[field])), "name": dcgm, "labels": labels}
            out.append((r["node"].encode(), orjson.dumps(msg)))
    return out

