"""The shipped detectors, listed in one place; `build(config)` instantiates the configured ones.

Registration is this tuple, not an import side effect: a new detector is one line in `DETECTORS` (README,
"Adding a detector"). Another set (a test's toy detector, a plug-in) is passed as `classes` to `build`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from detectors.base import Detector
from detectors.change_in_scope import ChangeInScope
from detectors.cluster_condition import ClusterCondition
from detectors.compute_threshold import ComputeThreshold
from detectors.owner_aggregate import OwnerAggregate
from detectors.reservation_potential import ReservationPotential
from detectors.special_measures import SpecialMeasures

DETECTORS: tuple[type[Detector], ...] = (
    ChangeInScope,
    ClusterCondition,
    ComputeThreshold,
    OwnerAggregate,
    ReservationPotential,
    SpecialMeasures,
)


def registered(classes: Iterable[type[Detector]] = DETECTORS) -> dict[str, type[Detector]]:
    """Detector classes by id; a class that is not a Detector, has no id, or repeats one is a TypeError."""
    out: dict[str, type[Detector]] = {}
    for cls in classes:
        if not (isinstance(cls, type) and issubclass(cls, Detector)) or not cls.id:
            raise TypeError(f"{cls!r} is not a Detector subclass with an id")
        if cls.id in out and out[cls.id] is not cls:
            raise TypeError(f"detector id {cls.id!r} already registered by {out[cls.id].__qualname__}")
        out[cls.id] = cls
    return out


def build(config: Mapping[str, Mapping[str, Any]] | None = None,
          classes: Iterable[type[Detector]] = DETECTORS) -> list[Detector]:
    """Detectors to run, in id order: `config` maps id -> params (None: every one of `classes` with its example
    params)."""
    reg = registered(classes)
    if config is None:
        return [cls(**cls.example_params) for _, cls in sorted(reg.items())]
    unknown = sorted(set(config) - set(reg))
    if unknown:
        raise KeyError(f"unknown detector ids: {', '.join(unknown)} (known: {', '.join(sorted(reg))})")
    return [reg[i](**dict(p)) for i, p in sorted(config.items())]
