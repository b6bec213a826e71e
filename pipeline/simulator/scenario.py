"""A scenario: fleet, accounts, workloads, allocation events and the stream's fault rates, all as data."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from pipeline.simulator.accounts import Account
from pipeline.simulator.fleet import Fleet
from pipeline.simulator.workload import Workload
from schemas.allocation import AllocationEvent
from schemas.ids import content_id

WINDOW_S = 60.0


@dataclass
class Faults:
    gap_share: float = 0.002  # samples never delivered (exporter restarts, scrape misses)
    malformed_share: float = 0.001  # broken JSON, out-of-range values, missing required fields
    duplicate_share: float = 0.002  # delivered twice
    late_share: float = 0.003  # delivered 90 s .. max_late_s after their event time (out of order)
    max_late_s: float = 900.0


@dataclass
class Scenario:
    name: str
    seed: int
    fleet: Fleet
    accounts: list[Account]
    workloads: list[Workload]
    allocations: list[AllocationEvent]
    t_start: float
    t_end: float
    faults: Faults = field(default_factory=Faults)
    block_s: float = 1800.0
    params: dict[str, Any] = field(default_factory=dict)
    window_s: float = WINDOW_S
    # Per account {account_id, kind, change, t_change, ...} where a scenario labels change in scope (`scope`).
    scope_labels: list[dict[str, Any]] | None = None

    def __post_init__(self) -> None:
        assert self.block_s % self.window_s == 0, "blocks must hold whole windows"
        self.allocations.sort(key=lambda e: (e.ts, e.event_id))

    @cached_property
    def interval_by_wl(self) -> np.ndarray:
        return np.array([w.interval_s for w in self.workloads], dtype=np.float64)

    @cached_property
    def peak_by_wl(self) -> np.ndarray:
        return np.array([self.fleet.nodes[w.nodes[0]].accelerator.peak(w.precision) for w in self.workloads])

    @cached_property
    def _starts(self) -> np.ndarray:
        return np.array([w.start for w in self.workloads])

    @cached_property
    def _ends(self) -> np.ndarray:
        return np.array([w.end for w in self.workloads])

    def active(self, c0: float, c1: float) -> list[Workload]:
        idx = np.flatnonzero((self._starts < c1) & (self._ends > c0))
        return [self.workloads[i] for i in idx]


def job_events(w: Workload, sc_accounts: list[Account], fleet: Fleet) -> list[AllocationEvent]:
    """job_started / job_stopped for one workload, with its footprint."""
    node = fleet.nodes[w.nodes[0]]
    common: dict[str, Any] = dict(
        account_id=sc_accounts[w.account].account_id, workload_id=w.workload_id, job_id=w.job_id,
        run_label=w.run_label, accelerator=node.reported_name, count=w.device_count,
        nodes=[fleet.nodes[i].name for i in w.nodes], region=node.region, datacenter=node.datacenter,
        interconnect_gbps=node.interconnect_gbps,
    )
    return [
        AllocationEvent(event_id=content_id("alloc", w.job_id, "start"), ts=w.start, kind="job_started", **common),
        AllocationEvent(event_id=content_id("alloc", w.job_id, "stop"), ts=w.end, kind="job_stopped", **common),
    ]


def reservation_events(account: Account, fleet: Fleet, model: str, steps: list[tuple[float, int, float]]
                       ) -> list[AllocationEvent]:
    """A reservation that may grow: steps of (event time, accelerators held, reserved_until)."""
    out = []
    for i, (ts, count, until) in enumerate(steps):
        out.append(AllocationEvent(
            event_id=content_id("resv", account.account_id, i), ts=ts, kind="reserved" if i == 0 else
            "reservation_changed", account_id=account.account_id, accelerator=fleet.nodes[
                next(n.index for n in fleet.nodes if n.model == model)].reported_name,
            count=count, reserved_until=until,
        ))
    return out
