"""What the `analyst` role may see: everything but the foreign person's identity.

Two layers, because identity leaks in two ways: (1) the identity objects themselves (a case's `identity`, a draft
report's `foreign_person` section) are withheld whole; (2) identity *values* can appear inside other text (a
foreign-person reason names the reseller, a summary could name a customer), so every string in what remains is
scrubbed of the case's identity values. Pseudonymous ids (account, owner, run ids) are not identity: the store's
analyst views carry them too (pipeline/migrations/0003_views.sql).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

WITHHELD = "[withheld]"
ANALYST_NOTE = "Withheld: the analyst role does not see the identity of the foreign person (compliance does)."
#: Keys of a CIP identity snapshot (and of owners / resellers inside it) whose values identify a person.
PII_KEYS = frozenset({
    "name", "address", "emails", "email", "phones", "phone", "ip", "ip_addresses", "national_id", "payment_source",
    "payment_means", "date_of_birth", "dob", "contact",
})
#: Shorter values are not scrubbed inside other text: "wire" or "DE" would blank unrelated words.
_MIN_SCRUB_LEN = 5


def identity_values(identity: dict[str, Any]) -> list[str]:
    """Every string under a PII key anywhere in an identity snapshot, longest first (so a name is replaced before
    a shorter value inside it)."""
    found: set[str] = set()

    def walk(x: Any, under_pii: bool) -> None:
        if isinstance(x, dict):
            for k, v in x.items():
                walk(v, under_pii or k in PII_KEYS)
        elif isinstance(x, list):
            for v in x:
                walk(v, under_pii)
        elif isinstance(x, str) and under_pii and len(x.strip()) >= _MIN_SCRUB_LEN:
            found.add(x.strip())

    walk(identity, False)
    return sorted(found, key=lambda s: (-len(s), s))


def scrub(x: Any, values: Iterable[str]) -> Any:
    """A copy of JSON-like `x` with every occurrence of `values` inside its strings (keys too) replaced."""
    vals = list(values)
    if not vals:
        return x

    def text(s: str) -> str:
        for v in vals:
            if v in s:
                s = s.replace(v, WITHHELD)
        return s

    def walk(y: Any) -> Any:
        if isinstance(y, dict):
            return {text(k) if isinstance(k, str) else k: walk(v) for k, v in y.items()}
        if isinstance(y, list | tuple):
            return [walk(v) for v in y]
        if isinstance(y, str):
            return text(y)
        return y

    return walk(x)


def redact_case(case: dict[str, Any], values: Iterable[str]) -> dict[str, Any]:
    """A case (model_dump) without its identity, values scrubbed."""
    out = {k: v for k, v in case.items() if k != "identity"}
    out["identity_withheld"] = True
    return scrub(out, values)


def redact_report(report: dict[str, Any], values: Iterable[str]) -> dict[str, Any]:
    """A draft report without its identity section, values scrubbed."""
    out = dict(report)
    fp = out.get("foreign_person") or {}
    # The report's own convention for an absent identity (pipeline/cases/report.py: a `withheld` note that the
    # Markdown and PDF renderers print in place of the section).
    out["foreign_person"] = {"withheld": ANALYST_NOTE, "account_id": fp.get("account_id"),
                             "cip_on_file": fp.get("cip_on_file")}
    return scrub(out, values)
