"""One simulated job (a workload) and the parameters its archetype generator reads."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

TRAINING_ARCHETYPES = ("pretrain", "finetune_full", "finetune_lora", "diffusion_train", "throttled_train",
                       "interleaved")
NON_TRAINING_ARCHETYPES = ("serving", "batch_inference", "hpc_fp64", "mining", "idle_reserved")
ARCHETYPES = TRAINING_ARCHETYPES + NON_TRAINING_ARCHETYPES


@dataclass
class Workload:
    index: int
    workload_id: str
    job_id: str
    run_id: str
    account: int  # index into the scenario's accounts
    archetype: str
    model: str  # catalog key of the accelerators
    nodes: list[int]
    gpus_per_node: int
    start: float
    end: float
    interval_s: float
    precision: str
    precision_reported: bool
    run_label: str | None  # reported in telemetry and allocations; None: the pipeline must stitch
    level: float  # nominal tensor-pipe activity while busy
    power_frac: float  # mean power / TDP the workload settles at
    sync_key: int  # jobs with the same key share their step-level fluctuations (one run split across accounts)
    source_family: str = "default"
    params: dict[str, float] = field(default_factory=dict)

    @property
    def is_training(self) -> bool:
        return self.archetype in TRAINING_ARCHETYPES

    @property
    def device_count(self) -> int:
        return len(self.nodes) * self.gpus_per_node

    def steps_in(self, c0: float, c1: float) -> np.ndarray:
        """Sample times in [max(c0, start), min(c1, end)), on this workload's sampling grid."""
        lo, hi = max(c0, self.start), min(c1, self.end)
        if hi <= lo:
            return np.empty(0)
        k0 = int(np.ceil((lo - self.start) / self.interval_s - 1e-9))
        k1 = int(np.ceil((hi - self.start) / self.interval_s - 1e-9))
        return self.start + np.arange(k0, k1, dtype=np.float64) * self.interval_s
