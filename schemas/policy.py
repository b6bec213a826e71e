"""Policy profiles: thresholds, report window and who counts as foreign, as versioned TOML data.

The 2024 BIS rule was only proposed and left its thresholds to later rulemaking, so nothing here is a constant
of the code: a profile says it, and every case records the profile id and version that decided it.
"""

from __future__ import annotations

import tomllib
from importlib import resources
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from schemas.errors import PolicyError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Thresholds(_Strict):
    training_ops: float = Field(gt=0, description="total operations of one training run")
    bio_training_ops: float | None = Field(default=None, gt=0, description="runs primarily on biological sequences")
    cluster_ops_per_s: float | None = Field(default=None, gt=0, description="computing-cluster theoretical peak")
    cluster_network_gbps: float | None = Field(default=None, ge=0, description="cluster networking must exceed this")
    count_projected: bool = Field(default=True, description="'could result in': compare the projected total too")
    reservation_opens_case: bool = Field(
        default=False,
        description="a reservation whose maximum possible compute crosses opens a needs_review case by itself; "
        "off by default: a reservation says nothing of purpose, so it raises the watch level and feeds change in scope",
    )


class Reporting(_Strict):
    window_days: float = Field(gt=0)
    day_kind: Literal["calendar", "business"] = "calendar"
    reminder_lead_days: tuple[float, ...] = (7.0, 3.0, 1.0)


class ForeignPersonTest(_Strict):
    us_countries: tuple[str, ...] = ("US",)
    check_beneficial_owners: bool = True
    owner_min_pct: float = Field(default=25.0, ge=0, le=100)
    owner_control_counts: bool = True
    foreign_reseller_counts: bool = True
    unknown_is_foreign: bool = True


class SpecialMeasures(_Strict):
    jurisdictions: tuple[str, ...] = ()
    persons: tuple[str, ...] = ()


class Uncertainty(_Strict):
    p_training_high: float = Field(default=0.8, gt=0, lt=1, description="at or above: training")
    p_training_low: float = Field(default=0.2, gt=0, lt=1, description="at or below: not training")
    needs_review_is_knowledge: bool = Field(
        default=True, description="an uncertain workload over the threshold is 'reason to believe': the clock starts"
    )
    not_training_needs: tuple[Literal["confident", "in_distribution", "evidence", "complete"], ...] = Field(
        default=("confident", "in_distribution", "evidence"),
        description="what a `not_training` verdict on a foreign run over the threshold needs to close the question "
        "(a confident call, inside the model's fitted region, with features that say why, optionally no missing "
        "fields); otherwise the case opens as needs_review. A missed training run is the costlier error.",
    )


class Suppressions(_Strict):
    max_days: float = Field(default=90.0, gt=0, description="longest a suppression may run; every one must expire")
    knowledge_at: Literal["end", "detection"] = Field(
        default="end",
        description="when a suppression ends, a finding it held back that still holds counts as knowledge from the "
        "end (the documented determination stood until then), or from the finding's own event time (stricter)",
    )


class Inquiry(_Strict):
    respond_days: float = Field(default=10.0, gt=0, description="customer's time to answer a needs_review inquiry")
    on_timeout: Literal["escalate", "open"] = Field(
        default="escalate",
        description="an unanswered inquiry at its deadline: an escalation event on the feed, or also open the case "
        "as training (knowledge at the deadline unless already counted)",
    )


class Policy(_Strict):
    id: str = Field(min_length=1)
    version: str = Field(min_length=1)
    title: str
    demo: bool = Field(default=False, description="scaled down for demonstrations; never for compliance")
    source: str = ""
    thresholds: Thresholds
    reporting: Reporting
    foreign_person: ForeignPersonTest = ForeignPersonTest()
    special_measures: SpecialMeasures = SpecialMeasures()
    uncertainty: Uncertainty = Uncertainty()
    suppressions: Suppressions = Suppressions()
    inquiry: Inquiry = Inquiry()

    @property
    def window_seconds(self) -> float:
        return self.reporting.window_days * 86_400.0


def shipped_policies() -> list[str]:
    """Names of the profiles shipped in the package."""
    return sorted(p.name.removesuffix(".toml") for p in resources.files("schemas.policies").iterdir()
                  if p.name.endswith(".toml"))


def load_policy(name_or_path: str | Path) -> Policy:
    """Load a shipped profile by name, or a TOML file by path. Errors name the file, the key and the reason."""
    path = Path(name_or_path)
    if path.suffix != ".toml":
        res = resources.files("schemas.policies") / f"{name_or_path}.toml"
        if not res.is_file():
            raise PolicyError(f"{name_or_path}: no such policy profile (shipped: {', '.join(shipped_policies())})")
        text, where = res.read_text(), f"schemas/policies/{name_or_path}.toml"
    else:
        try:
            text, where = path.read_text(), str(path)
        except OSError as exc:
            raise PolicyError(f"{path}: cannot read: {exc.strerror}") from exc
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(f"{where}: not valid TOML: {exc}") from exc
    try:
        return Policy.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"]) or "<root>"
        raise PolicyError(f"{where}: key {key}: {err['msg']}") from exc
