"""The files users have: nvidia-smi CSV, dcgmi dmon, Prometheus text and loose JSONL read into native samples."""

from __future__ import annotations

import json

import pytest

from pipeline.trace_formats import TraceError, detect_format, parse_trace, parse_ts

T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z
NOW = T0 + 86_400


def test_nvidia_smi_csv_with_units_in_header_and_values_and_an_unknown_column():
    text = ("timestamp, index, uuid, name, utilization.gpu [%], memory.used [MiB], memory.total [MiB], "
            "power.draw [W], temperature.gpu\n"
            "2026/01/01 00:00:00.000, 0, GPU-a, NVIDIA A100-PCIE-40GB, 45 %, 2048 MiB, 40960 MiB, 120.5 W, 60\n"
            "2026/01/01 00:00:01.000, 0, GPU-a, NVIDIA A100-PCIE-40GB, 50 %, 2048 MiB, 40960 MiB, [N/A], 61\n")
    t = parse_trace(text, run_id="r1", now=NOW)
    assert t.format == "nvidia_smi_csv" and not t.errors
    assert any("temperature.gpu" in n for n in t.notes)
    a, b = t.samples
    assert a["ts"] == T0 and a["gpu_util"] == 45.0 and a["power_w"] == 120.5 and a["fb_free_mib"] == 40960 - 2048
    assert "power_w" not in b  # [N/A] is missing, not zero
    assert a["workload_id"] == "r1" and a["interval_s"] == 1.0  # from the device's own gap


def test_nvidia_smi_noheader_nounits_rows_per_gpu_in_index_order():
    rows = [f"{T0 + i}, {u}, 300" for i in range(3) for u in (90, 10)]
    t = parse_trace("\n".join(rows), columns=["timestamp", "utilization.gpu", "power.draw"], now=NOW)
    devs = {(s["ts"], s["device"]): s["gpu_util"] for s in t.samples}
    assert devs[(T0, "host:gpu0")] == 90 and devs[(T0, "host:gpu1")] == 10
    with pytest.raises(TraceError, match="--columns"):
        parse_trace("\n".join(rows), now=NOW)


def test_fraction_utilisation_is_detected_not_read_as_percent():
    lines = [json.dumps({"ts": T0 + i, "node": "n", "device": "d", "gpu_util": 0.5 + 0.01 * i}) for i in range(5)]
    t = parse_trace("\n".join(lines), now=NOW)
    assert [round(s["gpu_util"], 1) for s in t.samples] == [50.0, 51.0, 52.0, 53.0, 54.0]
    assert any("fraction" in n for n in t.notes)


def test_jsonl_units_iso_and_ms_timestamps_dcgm_names_and_bad_lines_with_reasons():
    lines = [
        json.dumps({"ts": "2026-01-01T00:00:00Z", "node": "n", "device": "d", "power_w": "72 W", "temperature": 50}),
        json.dumps({"timestamp": (T0 + 1) * 1000, "Hostname": "n", "UUID": "d", "DCGM_FI_DEV_GPU_UTIL": 40}),
        json.dumps({"ts": T0 + 2, "node": "n", "device": "d", "power_w": "72 parsecs"}),
        "{not json",
        json.dumps({"ts": T0 + 3, "node": "n", "device": "d", "tensor_active": 1.7, "gpu_util": 140}),
    ]
    t = parse_trace("\n".join(lines), now=NOW)
    assert [s["ts"] for s in t.samples] == [T0, T0 + 1]
    assert t.samples[0]["power_w"] == 72.0 and t.samples[1]["gpu_util"] == 40.0
    reasons = dict(t.errors)
    assert set(reasons) == {3, 4, 5} and "unit" in reasons[3] and "JSON" in reasons[4]
    assert any("temperature" in n for n in t.notes)


def test_several_workloads_out_of_order_are_grouped_and_sorted():
    lines = []
    for i in range(20):
        for w in ("b", "a"):
            lines.append(json.dumps({"ts": T0 + 100 - i, "node": "n", "device": f"d{w}", "workload_id": w,
                                     "gpu_util": 50}))
    t = parse_trace("\n".join(lines), now=NOW)
    order = [(s["workload_id"], s["ts"]) for s in t.samples]
    assert order == sorted(order) and len(order) == 40
    t2 = parse_trace("\n".join(lines), workload_by="device", now=NOW)
    assert {s["workload_id"] for s in t2.samples} == {"da", "db"}
    with pytest.raises(TraceError, match="no such column"):
        parse_trace("\n".join(lines), workload_by="pid", now=NOW)


def test_dcgmi_dmon_needs_times_and_reads_mb_as_mib():
    text = ("#Entity   ID    GPUTL  FBUSD  POWER  TENSO\n"
            "ID                %      MB     W\n"
            "GPU 0             80     1000   300.0  0.45\n"
            "GPU 1             81     1000   301.0  0.46\n"
            "GPU 0             82     1000   302.0  0.47\n"
            "GPU 1             N/A    1000   303.0  0.48\n")
    assert detect_format(text) == "dcgmi_dmon"
    with pytest.raises(TraceError, match="--interval"):
        parse_trace(text, now=NOW)
    t = parse_trace(text, interval_s=1.0, start=T0, now=NOW)
    assert not t.errors and len(t.samples) == 4
    s = {(x["device"], x["ts"]): x for x in t.samples}
    assert s[("host:gpu1", T0 + 1)]["power_w"] == 303.0 and "gpu_util" not in s[("host:gpu1", T0 + 1)]
    assert s[("host:gpu0", T0)]["fb_used_mib"] == 1000 and s[("host:gpu0", T0)]["tensor_active"] == 0.45


def test_prometheus_text_with_timestamps():
    lab = 'gpu="0",UUID="GPU-x",Hostname="node-1",modelName="NVIDIA H100 80GB HBM3"'
    text = "\n".join([
        "# HELP DCGM_FI_DEV_GPU_UTIL GPU utilization (in %).", "# TYPE DCGM_FI_DEV_GPU_UTIL gauge",
        f"DCGM_FI_DEV_GPU_UTIL{{{lab}}} 45 {int(T0 * 1000)}",
        f"DCGM_FI_DEV_POWER_USAGE{{{lab}}} 350.5 {int(T0 * 1000)}",
        f"DCGM_FI_PROF_PIPE_TENSOR_ACTIVE{{{lab}}} 0.4 {int((T0 + 30) * 1000)}",
        f"DCGM_FI_DEV_GPU_UTIL{{{lab}}} 45",
        f"DCGM_FI_DEV_GPU_TEMP{{{lab}}} 60 {int(T0 * 1000)}",
    ])
    t = parse_trace(text, now=NOW)
    assert t.format == "prometheus"
    first = t.samples[0]
    assert first["ts"] == T0 and first["gpu_util"] == 45 and first["power_w"] == 350.5
    assert first["node"] == "node-1" and first["accelerator"] == "NVIDIA H100 80GB HBM3" and first["device"] == "GPU-x"
    assert t.samples[1]["tensor_active"] == 0.4
    assert len(t.errors) == 1 and "timestamp" in t.errors[0][1]
    assert any("GPU_TEMP" in n for n in t.notes)


def test_timestamp_units():
    assert parse_ts(T0) == parse_ts(T0 * 1e3) == parse_ts(T0 * 1e6) == parse_ts(T0 * 1e9) == T0
    assert parse_ts("2026-01-01 00:00:00") == T0
