"""One simulated job (a workload) and the parameters its archetype generator reads."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

TRAINING_ARCHETYPES = ("pretrain", "finetune_full", "finetune_lora", "diffusion_train", "throttled_train",
                       "interleaved")
NON_TRAINING_ARCHETYPES = ("serving", "batch_inference", "hpc_fp64", "mining", "idle_reserved")
ARCHETYPES = TRAINING_ARCHETYPES + NON_TRAINING_ARCHETYPES
#: Variants that make the nvidia-smi-level world overlap as real fleets do (docs/simulator.md, "Realism variants"):
#: training that is input- or memory-bound at low utilisation, with idle stretches; serving that is busy, flat and
#: pre-allocates its memory; HPC whose power and clocks look like training. Two jobs in five of each archetype,
#: only in the random-mix scenarios (a source family other than "default"), so the hand-placed demo is unchanged.
VARIANTS: dict[str, tuple[str, ...]] = {
    "pretrain": ("stalled",),
    "finetune_full": ("stalled", "small_model"),
    "finetune_lora": ("input_bound",),
    "diffusion_train": ("stalled",),
    "serving": ("busy_flat", "low_load"),
    "batch_inference": ("memory_bound",),
    "hpc_fp64": ("training_like",),
}

#: What a job's exporter leaves out of every line (`params["exporter"]`, read by lines.py; the node's tier still
#: decides the rest). "profiling_only": DCGM profiling fields and framebuffer, no utilisation, power, clocks or
#: energy (an exporter watching only the profiling group, as the MIGProfiler traces were): the classifier cannot
#: judge such a run (no utilisation or power), so a foreign run over the threshold opens as needs_review.
EXPORTER_DROPS: dict[str, frozenset[str]] = {
    "profiling_only": frozenset({"gpu_util", "mem_copy_util", "power_w", "energy_mj", "sm_clock_mhz",
                                 "mem_clock_mhz"}),
}


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
    def variant(self) -> str | None:
        """The realism variant of this workload (None: the archetype's base form); a pure function of the workload."""
        if self.source_family == "default" or self.archetype not in VARIANTS:
            return None
        if "variant" in self.params:
            v = self.params["variant"]
            return None if v in (None, "", "base") else str(v)
        # Every other one of five consecutive jobs of an archetype (the random mix deals archetypes round robin),
        # so each archetype gets its share whatever the seed; of two variants, each takes one of the two slots.
        k = (self.index // len(ARCHETYPES)) % 5
        if k not in (1, 3):
            return None
        choices = VARIANTS[self.archetype]
        return choices[0] if k == 1 else choices[-1]

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
