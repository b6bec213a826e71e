"""The workload classifier's interface, and an interim transparent rule so the pipeline runs end to end.

A classifier turns a workload's recent windows into a calibrated P(training) and one of three bands. The band
thresholds come from the policy (`uncertainty.p_training_high` / `p_training_low`): uncertainty is an outcome.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from detectors.fields import field_of as _attr

Band = Literal["training", "not_training", "uncertain"]


@runtime_checkable
class WindowLike(Protocol):
    """What detectors read of a merged workload window (detectors/windows.py `WorkloadWindow` has all of it)."""

    workload_id: str
    account_id: str | None
    window_start: float
    window_end: float
    device_count: int
    features: Mapping[str, float | None] | None


#: Why a verdict is `uncertain` (or why a confident-looking probability was not allowed to close the question).
REASONS = (
    "out_of_distribution",  # the history lies outside the region the model was fitted and calibrated on
    "missing_information",  # a field the model expects (or the accelerator's TDP / memory) is absent
    "no_activity_signal",  # neither utilisation, engine, SM, tensor activity nor power
    "no_utilisation_or_power",  # nvidia-smi's core readings absent: outside every provider the model has seen
    "mixed_phases",  # parts of the run disagree (some training-like, some not)
    "between_bands",  # calibrated P between the confident thresholds
    "short_history",  # a run's first windows, fewer than its tier was measured to need for a not_training call
    "rests_on_unlike_kind",  # the call leaves its band without one kind of work, and the run is unlike that kind
    "busier_than_training",  # not_training for a run under more load than every training run the model learnt from
)


@dataclass(frozen=True, slots=True)
class Verdict:
    p_training: float
    band: Band
    top_features: list[tuple[str, float]] = field(default_factory=list)
    model_id: str = ""
    model_version: str = ""
    #: reasons the answer is uncertain or wider than the model alone would say (REASONS); empty when confident
    reasons: tuple[str, ...] = ()
    #: the features that are out of distribution, and the metrics that were missing, by name
    out_features: tuple[str, ...] = ()
    missing: tuple[str, ...] = ()
    #: P(training) over what is unknown (missing fields, accelerator); None when nothing had to be filled in
    p_low: float | None = None
    p_high: float | None = None
    #: None: not checked (the interim rule); False: outside the fitted region
    in_distribution: bool | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"p_training": self.p_training, "band": self.band, "model_id": self.model_id,
                "model_version": self.model_version, "top_features": [[n, v] for n, v in self.top_features],
                "reasons": list(self.reasons), "out_features": list(self.out_features), "missing": list(self.missing),
                "p_low": self.p_low, "p_high": self.p_high, "in_distribution": self.in_distribution}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Verdict:
        def opt(k: str) -> float | None:
            v = d.get(k)
            return None if v is None else float(v)

        return cls(float(d["p_training"]), d["band"], [(str(n), float(v)) for n, v in d.get("top_features", [])],
                   d.get("model_id", ""), d.get("model_version", ""), tuple(d.get("reasons") or ()),
                   tuple(d.get("out_features") or ()), tuple(d.get("missing") or ()), opt("p_low"), opt("p_high"),
                   d.get("in_distribution"))

    def closes_not_training(self, needs: Sequence[str]) -> tuple[bool, list[str]]:
        """Whether a `not_training` band may close the question under a policy's `uncertainty.not_training_needs`
        (confident / in_distribution / evidence / complete), and the unmet needs by name. `in_distribution` fails
        only on a verdict found outside the fitted region (the interim rule has none and is not checked)."""
        if self.band != "not_training":
            return False, ["confident"]
        checked = self.in_distribution is not None  # None: a classifier without a fitted region (the rule)
        failing = {
            "confident": bool(self.reasons),
            "in_distribution": self.in_distribution is False,
            # evidence: a fitted model's top features are signed changes in P, one must push towards not training;
            # the rule's are the readings its rule fired on. None at all: a not_training with no reason is no answer.
            "evidence": not any(v < 0 for _, v in self.top_features) if checked else not self.top_features,
            "complete": bool(self.missing),
        }
        unmet = [n for n in needs if failing.get(n, True)]
        return not unmet, unmet


class WorkloadClassifier(Protocol):
    def predict(self, history: Sequence[Any]) -> Verdict:
        """Verdict over a workload's recent windows (oldest first; objects or dicts with the WindowLike fields)."""
        ...


def band_for(p: float, p_high: float, p_low: float) -> Band:
    if p >= p_high:
        return "training"
    if p <= p_low:
        return "not_training"
    return "uncertain"


def _mean_feature(history: Sequence[Any], names: tuple[str, ...]) -> float | None:
    """Mean over the history of the first of `names` each window has (windows.py names first, then aliases)."""
    vals: list[float] = []
    for w in history:
        feats = _attr(w, "features") or {}
        for k in names:
            v = feats.get(k)
            if isinstance(v, (int, float)) and math.isfinite(v):
                vals.append(float(v))
                break
    return sum(vals) / len(vals) if vals else None


class RuleClassifier:
    """A transparent interim rule, not a fitted model. Bands from the policy's uncertainty thresholds.

    - tensor pipes busy and either spread over >1 node or sustained over `sustained_windows` -> training;
    - FP64 pipes busier than tensor pipes (simulation / HPC) -> not training;
    - tensor pipes idle while DRAM is busy (mining-like memory-hard work) or idle altogether -> not training;
    - no DCGM profiling fields: uncertain, unless utilisation and power are high across nodes for a long time.
    """

    model_id = "rule"
    model_version = "1"

    def __init__(self, p_training_high: float = 0.8, p_training_low: float = 0.2, sustained_windows: int = 5):
        self.p_training_high = p_training_high
        self.p_training_low = p_training_low
        self.sustained_windows = sustained_windows

    def predict(self, history: Sequence[Any]) -> Verdict:
        hist = list(history)
        tensor = _mean_feature(hist, ("mean_tensor", "tensor_active"))
        fp64 = _mean_feature(hist, ("fp64_share", "fp64_active"))
        dram = _mean_feature(hist, ("mean_dram", "dram_active"))
        util = _mean_feature(hist, ("mean_gpu_util", "gpu_util"))
        power = _mean_feature(hist, ("mean_power", "power_frac"))
        nodes = max((int(_attr(w, "node_count", 0) or len(_attr(w, "nodes", None) or ())) for w in hist), default=0)
        sustained = len(hist) >= self.sustained_windows
        top: list[tuple[str, float]] = []
        if tensor is not None:
            top.append(("tensor_active", tensor))
            if fp64 is not None and fp64 > 0.5:  # FP64 pipes carry most of the work: simulation / HPC
                p = 0.05
                top.append(("fp64_active", fp64))
            elif tensor >= 0.3 and (nodes > 1 or sustained):
                p = 0.9
                top.append(("nodes" if nodes > 1 else "windows", float(nodes if nodes > 1 else len(hist))))
            elif tensor >= 0.3:
                p = 0.6
            elif tensor < 0.05 and dram is not None and dram >= 0.5:
                p = 0.05
                top.append(("dram_active", dram))
            elif tensor < 0.1:
                p = 0.15
            else:
                p = 0.5
        elif util is not None and power is not None and util >= 0.9 and power >= 0.7 and nodes > 1 \
                and len(hist) >= 2 * self.sustained_windows:
            p = 0.82  # strong coarse evidence: many nodes busy at high power for a long time
            top += [("gpu_util", util), ("power", power), ("nodes", float(nodes))]
        else:
            p = 0.5  # coarse or no telemetry: never guess confidently
            top += [(n, v) for n, v in (("gpu_util", util), ("power", power)) if v is not None]
        band = band_for(p, self.p_training_high, self.p_training_low)
        return Verdict(p, band, top, self.model_id, self.model_version,
                       reasons=("between_bands",) if band == "uncertain" else ())
