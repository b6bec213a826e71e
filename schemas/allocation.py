"""Allocation and billing events: what capacity an account holds, for which workload, until when."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from schemas.base import EpochSeconds, Message

AllocationKind = Literal[
    "instance_started",
    "instance_stopped",
    "job_started",
    "job_stopped",
    "reserved",
    "reservation_changed",
    "reservation_released",
]


class AllocationEvent(Message):
    TOPIC_KEY: ClassVar[str] = "allocations"

    schema_version: Literal[1] = 1
    event_id: str = Field(min_length=1)
    ts: EpochSeconds = Field(description="event time, epoch seconds")
    kind: AllocationKind
    account_id: str = Field(min_length=1)
    workload_id: str | None = None
    job_id: str | None = None
    run_label: str | None = None
    accelerator: str | None = None
    count: int = Field(ge=0, description="accelerators held")
    nodes: list[str] = Field(default_factory=list)
    reserved_until: EpochSeconds | None = None
    region: str | None = None
    datacenter: str | None = None
    interconnect_gbps: float | None = Field(default=None, ge=0, description="per-node network bandwidth")

    @model_validator(mode="after")
    def _reservation_ends_after_start(self) -> AllocationEvent:
        if self.reserved_until is not None and self.reserved_until < self.ts:
            raise ValueError(f"reserved_until {self.reserved_until} is before the event time {self.ts}")
        return self
