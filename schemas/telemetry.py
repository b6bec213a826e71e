"""GPU telemetry: one sample per device per interval, DCGM-aligned; every metric optional.

A missing metric means *unknown*, never zero. DCGM's "blank" sentinels (not supported / not found) are turned
into missing here, at the edge, so no later stage can mistake them for a reading.
"""

from __future__ import annotations

import time
from typing import Any, ClassVar, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from schemas.base import Message

# dcgm_fields.h: DCGM_INT32_BLANK = 0x7ffffff0, DCGM_INT64_BLANK = 0x7ffffffffffffff0,
# DCGM_FP64_BLANK = 140737488355328.0;
# the NOT_FOUND / NOT_SUPPORTED / NOT_PERMISSIONED variants sit just above each blank.
_INT32_BLANK = 0x7FFFFFF0
_INT64_BLANK = 0x7FFFFFFFFFFFFFF0
_FP64_BLANK = 140737488355328.0

#: Fractions in [0, 1] (DCGM PROF fields).
FRACTION_FIELDS = (
    "gr_engine_active",
    "sm_active",
    "sm_occupancy",
    "tensor_active",
    "dram_active",
    "fp64_active",
    "fp32_active",
    "fp16_active",
)
#: Percentages in [0, 100] (nvidia-smi level).
PERCENT_FIELDS = ("gpu_util", "mem_copy_util")
#: Non-negative rates and levels.
LEVEL_FIELDS = (
    "fb_used_mib",
    "fb_free_mib",
    "power_w",
    "sm_clock_mhz",
    "mem_clock_mhz",
)
#: Byte rates (bytes/s) and counters; 64-bit in DCGM.
BYTE_FIELDS = (
    "pcie_tx_bytes",
    "pcie_rx_bytes",
    "nvlink_tx_bytes",
    "nvlink_rx_bytes",
    "net_tx_bytes",
    "net_rx_bytes",
    "energy_mj",
)
METRIC_FIELDS = FRACTION_FIELDS + PERCENT_FIELDS + LEVEL_FIELDS + BYTE_FIELDS
#: The fields an nvidia-smi-only provider has.
SMI_FIELDS = ("gpu_util", "mem_copy_util", "fb_used_mib", "fb_free_mib", "power_w", "sm_clock_mhz", "mem_clock_mhz")

#: DCGM field names (dcgm-exporter spelling) for each metric, for decoders and docs.
DCGM_NAMES: dict[str, str] = {
    "gr_engine_active": "DCGM_FI_PROF_GR_ENGINE_ACTIVE",
    "sm_active": "DCGM_FI_PROF_SM_ACTIVE",
    "sm_occupancy": "DCGM_FI_PROF_SM_OCCUPANCY",
    "tensor_active": "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE",
    "dram_active": "DCGM_FI_PROF_DRAM_ACTIVE",
    "fp64_active": "DCGM_FI_PROF_PIPE_FP64_ACTIVE",
    "fp32_active": "DCGM_FI_PROF_PIPE_FP32_ACTIVE",
    "fp16_active": "DCGM_FI_PROF_PIPE_FP16_ACTIVE",
    "pcie_tx_bytes": "DCGM_FI_PROF_PCIE_TX_BYTES",
    "pcie_rx_bytes": "DCGM_FI_PROF_PCIE_RX_BYTES",
    "nvlink_tx_bytes": "DCGM_FI_PROF_NVLINK_TX_BYTES",
    "nvlink_rx_bytes": "DCGM_FI_PROF_NVLINK_RX_BYTES",
    "gpu_util": "DCGM_FI_DEV_GPU_UTIL",
    "mem_copy_util": "DCGM_FI_DEV_MEM_COPY_UTIL",
    "fb_used_mib": "DCGM_FI_DEV_FB_USED",
    "fb_free_mib": "DCGM_FI_DEV_FB_FREE",
    "power_w": "DCGM_FI_DEV_POWER_USAGE",
    "energy_mj": "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION",
    "sm_clock_mhz": "DCGM_FI_DEV_SM_CLOCK",
    "mem_clock_mhz": "DCGM_FI_DEV_MEM_CLOCK",
}

#: Telemetry further ahead of the reference clock than this is rejected as a broken clock.
MAX_FUTURE_SKEW_S = 86_400.0

#: The exact DCGM blank markers (dcgm_fields.h: each BLANK and its NOT_FOUND / NOT_SUPPORTED / NOT_PERMISSIONED
#: successors, +1..+3). The INT64 ones are not representable in float64: they all read as 2**63 once parsed.
INT32_BLANKS = tuple(float(_INT32_BLANK + k) for k in range(4))
FP64_BLANKS = tuple(_FP64_BLANK + k for k in range(4))
INT64_BLANKS = tuple(sorted({float(_INT64_BLANK + k) for k in range(4)}))
#: Byte fields are 64-bit in DCGM: an INT32 marker there (~2.1 GB/s) is a plausible reading, not a blank.
SENTINELS_ALL = FP64_BLANKS + INT64_BLANKS
SENTINELS_NON_BYTE = INT32_BLANKS + SENTINELS_ALL

#: Largest plausible reading per field; above is `out_of_range` (an absurd magnitude is an error, not a blank).
#: Memory: 4 TiB in MiB (B200: 192 GB); clocks: 10 GHz; rates: 1e13 B/s (NVLink 5 is 1.8 TB/s per GPU);
#: energy since driver load: 1e16 mJ (1 kW for 300 years).
MAX_VALUES: dict[str, float] = {
    **{f: 1.0 for f in FRACTION_FIELDS},
    **{f: 100.0 for f in PERCENT_FIELDS},
    "fb_used_mib": 4 * 1024 * 1024.0,
    "fb_free_mib": 4 * 1024 * 1024.0,
    "power_w": 5000.0,
    "sm_clock_mhz": 10_000.0,
    "mem_clock_mhz": 10_000.0,
    **{f: 1e13 for f in BYTE_FIELDS if f != "energy_mj"},
    "energy_mj": 1e16,
}
#: gpu_index: a node's accelerator index (MIG instances included) stays below this.
MAX_GPU_INDEX = 4096
#: ids (device, node, workload, account, ...) longer than this are refused: they travel in every window (and a batch
#: of messages all no longer than this, the usual case, needs no check at all).
MAX_ID_CHARS = 1024


def is_sentinel(value: float, field: str) -> bool:
    """True when a raw DCGM value is exactly one of its 'blank / not supported' markers."""
    return value in (SENTINELS_ALL if field in BYTE_FIELDS else SENTINELS_NON_BYTE)


class TelemetrySample(Message):
    """One accelerator's readings at one event time."""

    TOPIC_KEY: ClassVar[str] = "telemetry"

    schema_version: Literal[1] = 1
    ts: float = Field(description="event time, epoch seconds (UTC)")
    node: str = Field(min_length=1, description="host name (DCGM label Hostname)")
    device: str = Field(min_length=1, description="accelerator UUID")
    gpu_index: int | None = Field(default=None, ge=0, lt=MAX_GPU_INDEX)
    accelerator: str | None = Field(default=None, description="model name as reported (DCGM label modelName)")
    account_id: str | None = None
    workload_id: str | None = None
    job_id: str | None = None
    run_label: str | None = Field(default=None, description="scheduler run label, if the provider has one")
    interval_s: float | None = Field(default=None, gt=0, le=3600, description="sampling interval this reading covers")
    precision: Literal["fp8", "bf16", "fp16", "tf32", "fp32", "fp64"] | None = None

    gr_engine_active: float | None = Field(default=None, ge=0, le=1)
    sm_active: float | None = Field(default=None, ge=0, le=1)
    sm_occupancy: float | None = Field(default=None, ge=0, le=1)
    tensor_active: float | None = Field(default=None, ge=0, le=1)
    dram_active: float | None = Field(default=None, ge=0, le=1)
    fp64_active: float | None = Field(default=None, ge=0, le=1)
    fp32_active: float | None = Field(default=None, ge=0, le=1)
    fp16_active: float | None = Field(default=None, ge=0, le=1)
    gpu_util: float | None = Field(default=None, ge=0, le=100)
    mem_copy_util: float | None = Field(default=None, ge=0, le=100)
    fb_used_mib: float | None = Field(default=None, ge=0, le=MAX_VALUES["fb_used_mib"])
    fb_free_mib: float | None = Field(default=None, ge=0, le=MAX_VALUES["fb_free_mib"])
    power_w: float | None = Field(default=None, ge=0, le=5000)
    sm_clock_mhz: float | None = Field(default=None, ge=0, le=MAX_VALUES["sm_clock_mhz"])
    mem_clock_mhz: float | None = Field(default=None, ge=0, le=MAX_VALUES["mem_clock_mhz"])
    pcie_tx_bytes: float | None = Field(default=None, ge=0, le=MAX_VALUES["pcie_tx_bytes"])
    pcie_rx_bytes: float | None = Field(default=None, ge=0, le=MAX_VALUES["pcie_rx_bytes"])
    nvlink_tx_bytes: float | None = Field(default=None, ge=0, le=MAX_VALUES["nvlink_tx_bytes"])
    nvlink_rx_bytes: float | None = Field(default=None, ge=0, le=MAX_VALUES["nvlink_rx_bytes"])
    net_tx_bytes: float | None = Field(default=None, ge=0, le=MAX_VALUES["net_tx_bytes"],
                                       description="node NIC bytes/s attributed to this device")
    net_rx_bytes: float | None = Field(default=None, ge=0, le=MAX_VALUES["net_rx_bytes"])
    energy_mj: float | None = Field(default=None, ge=0, le=MAX_VALUES["energy_mj"])

    @model_validator(mode="before")
    @classmethod
    def _sentinels_to_missing(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name in METRIC_FIELDS:
                v = data.get(name)
                if isinstance(v, (int, float)) and not isinstance(v, bool) and is_sentinel(float(v), name):
                    data = {**data, name: None}
        return data

    @field_validator("ts")
    @classmethod
    def _not_far_future(cls, ts: float, info: ValidationInfo) -> float:
        ctx = info.context or {}
        now = float(ctx.get("now", time.time()))
        if ts > now + MAX_FUTURE_SKEW_S:
            raise ValueError(f"timestamp {ts} is more than {MAX_FUTURE_SKEW_S:.0f} s ahead of {now}")
        if ts < 946_684_800:  # 2000-01-01: older means a unit or clock error
            raise ValueError(f"timestamp {ts} is before 2000-01-01")
        return ts


class TelemetryBatch(Message):
    """Many samples in one message, as a provider's own per-node exporter sends them."""

    TOPIC_KEY: ClassVar[str] = "telemetry"

    schema_version: Literal[1] = 1
    node: str | None = None
    samples: list[TelemetrySample]


class TelemetryColumns(Message):
    """A columnar batch: one list per field, all of equal length; `null` marks a missing reading.

    The fast wire format: decoding one message yields whole columns, which the ingest stage turns into numpy
    arrays without touching each sample in Python.
    """

    TOPIC_KEY: ClassVar[str] = "telemetry"

    schema_version: Literal[1] = 1
    node: str = Field(min_length=1)
    accelerator: str | None = None
    account_id: str | None = None
    workload_id: str | None = None
    job_id: str | None = None
    run_label: str | None = None
    interval_s: float | None = Field(default=None, gt=0, le=3600)
    precision: Literal["fp8", "bf16", "fp16", "tf32", "fp32", "fp64"] | None = None
    ts: list[float]
    device: list[str]
    metrics: dict[str, list[float | None]] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _columns_line_up(self) -> TelemetryColumns:
        n = len(self.ts)
        if len(self.device) != n:
            raise ValueError(f"device has {len(self.device)} entries, ts has {n}")
        for name, col in self.metrics.items():
            if name not in METRIC_FIELDS:
                raise ValueError(f"unknown metric {name!r}")
            if len(col) != n:
                raise ValueError(f"metric {name} has {len(col)} entries, ts has {n}")
        return self
