"""A small helper that scenarios use to add accounts and jobs without repeating ids and allocation events."""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.simulator.accounts import Account
from pipeline.simulator.fleet import Fleet
from pipeline.simulator.scenario import Faults, Scenario, job_events, reservation_events
from pipeline.simulator.workload import Workload
from schemas.allocation import AllocationEvent
from schemas.cip import CipRecord
from schemas.ids import content_id

#: Mean power / TDP per archetype (mean, sd): ~0.4 for training, inference and HPC alike (docs/simulator.md).
POWER_FRAC = {"pretrain": (0.45, 0.08), "finetune_full": (0.42, 0.08), "finetune_lora": (0.23, 0.03),
              "diffusion_train": (0.42, 0.08), "throttled_train": (0.25, 0.05), "interleaved": (0.38, 0.06),
              "serving": (0.36, 0.08), "batch_inference": (0.5, 0.08), "hpc_fp64": (0.42, 0.08),
              "mining": (0.6, 0.06), "idle_reserved": (0.09, 0.015)}


class Builder:
    def __init__(self, name: str, seed: int, fleet: Fleet, t_start: float) -> None:
        self.name, self.seed, self.fleet, self.t_start = name, seed, fleet, t_start
        self.rng = np.random.default_rng([seed, 7])
        self.accounts: list[Account] = []
        self.workloads: list[Workload] = []
        self.allocations: list[AllocationEvent] = []

    def account(self, cip: CipRecord, kind: str) -> int:
        self.accounts.append(Account(len(self.accounts), cip, kind))
        return len(self.accounts) - 1

    def job(self, account: int, archetype: str, model: str, n_nodes: int, start: float, end: float, *,
            gpus_per_node: int = 8, interval_s: float = 10.0, level: float = 0.4, precision: str = "bf16",
            precision_reported: bool = True, run: str | None = None, run_label: str | None = None,
            smi_only: bool | None = None, sync_key: int | None = None, family: str = "default",
            nodes: list[int] | None = None, **params: Any) -> Workload:
        acct = self.accounts[account].account_id
        i = len(self.workloads)
        job_id = content_id("job", self.name, self.seed, acct, i)
        mean, sd = POWER_FRAC[archetype]
        w = Workload(
            index=i, workload_id=content_id("wl", job_id), job_id=job_id,
            run_id=run or content_id("run", self.name, self.seed, acct, i), account=account, archetype=archetype,
            model=model, nodes=nodes if nodes is not None else self.fleet.take(model, n_nodes, start, end, smi_only),
            gpus_per_node=gpus_per_node, start=float(start), end=float(end), interval_s=float(interval_s),
            precision=precision, precision_reported=precision_reported, run_label=run_label, level=level,
            power_frac=float(np.clip(self.rng.normal(mean, sd), 0.05, 0.95)),
            sync_key=sync_key if sync_key is not None else 1_000_003 * (i + 1) + self.seed, source_family=family,
            params={"phase": float(self.rng.uniform(0, 3600)), "energy0": float(self.rng.uniform(1e8, 1e11)),
                    **params},
        )
        self.workloads.append(w)
        self.allocations += job_events(w, self.accounts, self.fleet)
        return w

    def reserve(self, account: int, model: str, steps: list[tuple[float, int, float]]) -> None:
        self.allocations += reservation_events(self.accounts[account], self.fleet, model, steps)

    def build(self, t_end: float, faults: Faults, params: dict[str, Any], block_s: float = 1800.0) -> Scenario:
        return Scenario(self.name, self.seed, self.fleet, self.accounts, self.workloads, self.allocations,
                        self.t_start, t_end, faults, block_s, params)
