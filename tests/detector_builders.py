"""Hand-built windows, CIP records and allocations for the detector tests (no Kafka, no clock)."""

from __future__ import annotations

from typing import Any

from detectors.windows import WorkloadWindow
from schemas.allocation import AllocationEvent
from schemas.cip import BeneficialOwner, CipRecord
from schemas.policy import Policy, load_policy

W = 60.0
T0 = 1_700_000_040.0  # a multiple of W
H100_BF16 = 989e12


def demo() -> Policy:
    return load_policy("demo")


def with_foreign(policy: Policy, **changes: Any) -> Policy:
    return policy.model_copy(update={"foreign_person": policy.foreign_person.model_copy(update=changes)})


TRAINING = {"mean_tensor": 0.6, "sync_nodes_tensor": 0.9, "mean_gpu_util": 0.98, "mean_power": 0.9}
INFERENCE = {"mean_tensor": 0.02, "mean_gpu_util": 0.3, "mean_power": 0.3}
SMI_ONLY = {"mean_gpu_util": 0.6, "mean_power": 0.5}


def window(workload: str, account: str | None, i: int, *, flop: float = 2e17, job: str | None = None,
           label: str | None = None, devices: int = 8, nodes: int = 2, model: str = "H100",
           features: dict[str, float | None] | None = TRAINING, t0: float = T0) -> WorkloadWindow:
    """The i-th window of a workload (window_start = t0 + i*W)."""
    start = t0 + i * W
    return WorkloadWindow(
        workload_id=workload, account_id=account, job_id=job, run_label=label, window_start=start,
        window_end=start + W, devices=[f"{workload}-gpu{d}" for d in range(devices)],
        nodes=[f"{workload}-n{n}" for n in range(nodes)], device_count=devices, node_count=nodes, flop=flop,
        flop_low=flop * 0.9, flop_high=flop * 2, basis="tensor_active", device_seconds=devices * W,
        sample_count=devices * 6, accelerators={model: devices}, unknown_accelerators=[],
        window_ids=[f"win-{workload}-{i}"], sums={}, features=dict(features) if features is not None else None,  # type: ignore[arg-type]
    )


def cip(account: str, *, us_person: bool | None = False, updated_at: float = T0 - 3600, country: str | None = "DE",
        owners: list[BeneficialOwner] | None = None) -> CipRecord:
    return CipRecord(account_id=account, updated_at=updated_at, customer_name=f"{account} Ltd", country=country,
                     us_person=us_person, beneficial_owners=owners or [])


def owner(owner_id: str, pct: float = 50.0, *, us_person: bool | None = False, nationality: str = "DE",
          control: bool = False) -> BeneficialOwner:
    return BeneficialOwner(owner_id=owner_id, name=owner_id, ownership_pct=pct, control=control,
                           nationality=nationality, residence=nationality, us_person=us_person)


def alloc(account: str, kind: str, ts: float, *, workload: str | None = None, count: int = 8,
          accelerator: str = "H100", reserved_until: float | None = None, gbps: float | None = None,
          label: str | None = None, n: int = 0) -> AllocationEvent:
    return AllocationEvent(event_id=f"a-{account}-{kind}-{ts}-{n}", ts=ts, kind=kind, account_id=account,  # type: ignore[arg-type]
                           workload_id=workload, run_label=label, accelerator=accelerator, count=count,
                           reserved_until=reserved_until, interconnect_gbps=gbps, datacenter="dc1")
