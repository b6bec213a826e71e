"""The foreign-person determination (ARCHITECTURE.md, case semantics rule 2): a pure function of CIP and policy."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from schemas.cip import BeneficialOwner, CipRecord
from schemas.policy import Policy


@dataclass(frozen=True, slots=True)
class ForeignDetermination:
    is_foreign: bool
    status: str  # 'foreign' | 'us_person' | 'unknown'
    reasons: list[str] = field(default_factory=list)
    foreign_owners: list[str] = field(default_factory=list)  # qualifying owners that make the customer foreign
    qualifying_owners: list[str] = field(default_factory=list)  # every owner >= owner_min_pct or in control
    incomplete: bool = False  # some fact was unknown and the policy's default decided it
    cip_missing: bool = False
    cip_updated_at: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def qualifies(owner: BeneficialOwner, policy: Policy) -> bool:
    fp = policy.foreign_person
    pct = owner.ownership_pct is not None and owner.ownership_pct >= fp.owner_min_pct
    return pct or (owner.control and fp.owner_control_counts)


def determine(cip: CipRecord | None, policy: Policy) -> ForeignDetermination:
    """Is the customer a foreign person under `policy`? Every reason is listed, not just the first."""
    fp = policy.foreign_person
    unknown_foreign = fp.unknown_is_foreign
    if cip is None:
        return ForeignDetermination(unknown_foreign, "unknown", ["cip_missing"], incomplete=True, cip_missing=True)
    reasons: list[str] = []
    incomplete = False
    owners = [o for o in cip.beneficial_owners if qualifies(o, policy)] if fp.check_beneficial_owners else []
    foreign_owners: list[str] = []
    if not fp.us_countries:
        reasons.append("policy_all_in_scope")
    if cip.us_person is False:
        reasons.append("customer_not_us_person")
    elif cip.us_person is None:
        incomplete = True
        if unknown_foreign:
            reasons.append("customer_status_unknown")
    for o in owners:
        if not fp.us_countries:
            foreign_owners.append(o.owner_id)
        elif o.us_person is False or (o.us_person is None and unknown_foreign):
            foreign_owners.append(o.owner_id)
            reasons.append(f"owner_{'not_us_person' if o.us_person is False else 'status_unknown'}:{o.owner_id}")
        incomplete |= o.us_person is None
    if fp.foreign_reseller_counts and cip.reseller is not None:
        country = cip.reseller.country
        if country is None:
            incomplete = True
        if (country is None and unknown_foreign) or (country is not None and country not in fp.us_countries):
            reasons.append(f"foreign_reseller:{cip.reseller.name}")
    is_foreign = bool(reasons)
    status = "foreign" if is_foreign else ("unknown" if incomplete else "us_person")
    return ForeignDetermination(is_foreign, status, reasons, foreign_owners, [o.owner_id for o in owners],
                                incomplete, False, cip.updated_at)
