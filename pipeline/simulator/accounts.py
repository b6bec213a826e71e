"""Simulated customer accounts with CIP records, and the policy tests the ground truth applies to them.

The tests follow ARCHITECTURE.md "Case semantics" 2 (foreign subject) and 5 (special measures) literally; the
detection engineers implement the same contract independently, and the ground truth is what they are held to.
"""

from __future__ import annotations

from dataclasses import dataclass

from schemas.cip import BeneficialOwner, CipRecord, Reseller
from schemas.policy import Policy


@dataclass
class Account:
    index: int
    cip: CipRecord
    kind: str  # us_person | foreign_person | us_entity_foreign_owner | foreign_reseller | incomplete | special

    @property
    def account_id(self) -> str:
        return self.cip.account_id


def make_cip(account_id: str, created: float, *, name: str, country: str | None, us_person: bool | None,
             customer_type: str = "entity", owners: list[BeneficialOwner] | None = None,
             reseller: Reseller | None = None) -> CipRecord:
    verified = us_person is not None
    return CipRecord(
        account_id=account_id, updated_at=created, customer_name=name, customer_type=customer_type,  # type: ignore[arg-type]
        country=country, us_person=us_person, beneficial_owners=owners or [], reseller=reseller,
        payment_means="card" if customer_type == "individual" else "wire",
        emails=[f"ops@{account_id}.example"], verification_status="verified" if verified else "pending",
        verified_at=created if verified else None,
    )


def owner(owner_id: str, pct: float | None, nationality: str | None, us_person: bool | None,
          control: bool = False) -> BeneficialOwner:
    return BeneficialOwner(owner_id=owner_id, name=f"Owner {owner_id}", ownership_pct=pct, control=control,
                           nationality=nationality, residence=nationality, us_person=us_person)


def _unknown_or_false(v: bool | None, unknown_is_foreign: bool) -> bool:
    return v is False or (v is None and unknown_is_foreign)


def qualifying_owners(cip: CipRecord, policy: Policy) -> list[BeneficialOwner]:
    """Owners that count under the policy: >= owner_min_pct, or control when control counts."""
    fp = policy.foreign_person
    return [o for o in cip.beneficial_owners
            if (o.ownership_pct is not None and o.ownership_pct >= fp.owner_min_pct)
            or (o.control and fp.owner_control_counts)]


def owner_is_foreign(o: BeneficialOwner, policy: Policy) -> bool:
    fp = policy.foreign_person
    return not fp.us_countries or _unknown_or_false(o.us_person, fp.unknown_is_foreign)


def is_foreign(cip: CipRecord, policy: Policy) -> bool:
    """Case semantics 2: customer, qualifying owner or reseller foreign; empty us_countries: everyone."""
    fp = policy.foreign_person
    if not fp.us_countries:
        return True
    if _unknown_or_false(cip.us_person, fp.unknown_is_foreign):
        return True
    if fp.check_beneficial_owners and any(owner_is_foreign(o, policy) for o in qualifying_owners(cip, policy)):
        return True
    if fp.foreign_reseller_counts and cip.reseller is not None:
        c = cip.reseller.country
        if (c is None and fp.unknown_is_foreign) or (c is not None and c not in fp.us_countries):
            return True
    return False


def under_special_measures(cip: CipRecord, policy: Policy) -> bool:
    """Case semantics 5: customer country or any owner's nationality/residence listed, or a listed id."""
    sm = policy.special_measures
    if cip.country in sm.jurisdictions or cip.account_id in sm.persons:
        return True
    return any(o.nationality in sm.jurisdictions or o.residence in sm.jurisdictions or o.owner_id in sm.persons
               for o in cip.beneficial_owners)
