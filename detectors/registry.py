"""Loads every shipped detector so it registers; `build(config)` instantiates the configured ones."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from detectors import (  # noqa: F401  (imported to register)
    change_in_scope,
    cluster_condition,
    compute_threshold,
    owner_aggregate,
    reservation_potential,
    special_measures,
)
from detectors.base import Detector, registered


def build(config: Mapping[str, Mapping[str, Any]] | None = None) -> list[Detector]:
    """Detectors to run: `config` maps id -> params (None: every registered detector with its example params)."""
    reg = registered()
    if config is None:
        return [cls(**cls.example_params) for _, cls in sorted(reg.items())]
    unknown = sorted(set(config) - set(reg))
    if unknown:
        raise KeyError(f"unknown detector ids: {', '.join(unknown)} (known: {', '.join(sorted(reg))})")
    return [reg[i](**dict(p)) for i, p in sorted(config.items())]
