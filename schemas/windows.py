"""Partial window aggregates: what one ingest partition saw of one workload in one event-time window.

Detect merges the partials of a workload (sums add; means combine through their sums and counts), which is why
every feature travels as sums rather than finished statistics; the `sums` keys are laid out, written and read by
schemas/window_sums.py alone.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from schemas.base import EpochSeconds, Message
from schemas.window_sums import ComputeBasis

__all__ = ["ComputeBasis", "WindowAggregate"]


class WindowAggregate(Message):
    TOPIC_KEY: ClassVar[str] = "windows"

    schema_version: Literal[1] = 1
    window_id: str = Field(description="hash of (workload, window_start, source topic, partition, revision)")
    workload_id: str
    account_id: str | None = None
    job_id: str | None = None
    run_label: str | None = None
    partition: int = 0
    revision: int = Field(default=0, ge=0, description="0 = first emission; n > 0 = n-th late-data correction")
    window_start: EpochSeconds
    window_end: EpochSeconds
    sample_count: int = Field(ge=0)
    device_count: int = Field(ge=0)
    node_count: int = Field(ge=0)
    devices: list[str] = Field(default_factory=list)
    nodes: list[str] = Field(default_factory=list)
    device_seconds: float = Field(ge=0)
    flop: float = Field(ge=0, description="point estimate")
    flop_low: float = Field(ge=0)
    flop_high: float = Field(ge=0)
    basis: ComputeBasis
    accelerators: dict[str, int] = Field(default_factory=dict, description="model -> devices")
    unknown_accelerators: list[str] = Field(default_factory=list)
    sums: dict[str, float] = Field(
        default_factory=dict,
        description="additive statistics, merged by adding key by key: rows, per field the time-weighted sum and "
                    "sum of squares, seconds covered and rows, rows per FLOP basis, sub-window profiles and their "
                    "spreads (schemas/window_sums.py)")
    features: dict[str, float | None] = Field(default_factory=dict)
    missing_fields: list[str] = Field(default_factory=list)
    offsets: dict[str, list[int]] = Field(default_factory=dict, description="'topic:partition' -> [first, last]")

    @model_validator(mode="after")
    def _window_has_length(self) -> WindowAggregate:
        # Rates and features divide by the window's length: a window that ends where it starts cannot be one.
        if not self.window_end > self.window_start:
            raise ValueError(f"window_end {self.window_end} is not after window_start {self.window_start}")
        return self
