"""Customer Identification Program records (proposed 15 CFR 7.302): who the customer and its owners are."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from schemas.base import EpochSeconds, Message


class BeneficialOwner(Message):
    owner_id: str = Field(min_length=1)
    name: str
    ownership_pct: float | None = Field(default=None, ge=0, le=100)
    control: bool = False
    nationality: str | None = Field(default=None, description="ISO 3166-1 alpha-2")
    residence: str | None = None
    us_person: bool | None = None


class Reseller(Message):
    name: str
    country: str | None = None


class IpAccess(Message):
    ip: str
    accessed_at: EpochSeconds
    purpose: Literal["access", "administration"] = "access"


class CipRecord(Message):
    """One account's identification record. Later `updated_at` wins; records are compacted by account."""

    TOPIC_KEY: ClassVar[str] = "cip"

    schema_version: Literal[1] = 1
    account_id: str = Field(min_length=1)
    updated_at: EpochSeconds
    customer_name: str | None = None
    customer_type: Literal["individual", "entity"] | None = None
    country: str | None = Field(default=None, description="ISO 3166-1 alpha-2 of incorporation or citizenship")
    address: str | None = None
    us_person: bool | None = Field(default=None, description="None: not yet determined")
    beneficial_owners: list[BeneficialOwner] = Field(default_factory=list)
    reseller: Reseller | None = None
    payment_means: str | None = None
    payment_source: str | None = None
    emails: list[str] = Field(default_factory=list)
    phones: list[str] = Field(default_factory=list)
    ip_addresses: list[IpAccess] = Field(default_factory=list)
    national_id: str | None = None
    verification_status: Literal["verified", "pending", "failed", "unverified"] = "unverified"
    verified_at: EpochSeconds | None = None
    special_measures: list[str] = Field(default_factory=list, description="flags set by the provider")
