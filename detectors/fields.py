"""Reading fields from windows and records that arrive as objects or as plain dicts (faust tables, JSON)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any


def field_of(obj: Any, name: str, default: Any = None) -> Any:
    """`obj[name]` for a mapping, else `obj.name`; `default` when absent."""
    return obj.get(name, default) if isinstance(obj, Mapping) else getattr(obj, name, default)


def finite_or_zero(v: Any) -> float:
    """A finite float, or 0.0 for None, non-numbers, NaN and infinities (for sums that must not be poisoned)."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return 0.0
    return f if math.isfinite(f) else 0.0
