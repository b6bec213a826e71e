"""The accelerator catalog: peak dense throughput per precision, TDP, memory and the share of peak its tensor
cycles achieve at least (the compute band's low end), each row with its sources.

Data lives in `detectors/data/accelerators.csv` (figures from shared reference/accelerators.md and the vendors'
datasheets named in its `source` column). Models the catalog does not know are kept and flagged, never dropped.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from functools import cache
from importlib import resources

PRECISIONS = ("fp8", "bf16", "tf32", "fp32", "fp64")
#: Share of the dense peak a part's tensor-active cycles achieve at least, for a row without a figure of its own:
#: a tuned BF16 matmul reaches 80.3 % of peak on H100 SXM (stas00/ml-engineering, Maximum Achievable Matmul FLOPS;
#: reference/accelerators.md). Each row's `achievable_share` / `achievable_source` columns say what it uses and why.
DEFAULT_ACHIEVABLE_SHARE = 0.8


@dataclass(frozen=True, slots=True)
class Accelerator:
    key: str
    vendor: str
    name: str
    peak_flops: dict[str, float]  # precision -> dense FLOP/s; absent = not supported / not found
    tdp_w: float | None
    memory_gib: float | None
    source: str
    #: the tensor basis's low end as a share of peak (detectors/compute.py), and where the figure comes from
    achievable_share: float = DEFAULT_ACHIEVABLE_SHARE
    achievable_source: str = "default"

    @property
    def low_precision_band(self) -> tuple[float, float]:
        """(BF16, FP8-or-BF16) peak: the band used when the run's precision is unknown."""
        bf16 = self.peak_flops["bf16"]
        return bf16, self.peak_flops.get("fp8", bf16)

    def peak(self, precision: str | None) -> float:
        """Peak at `precision`; unknown precision -> BF16, the common training precision (the point estimate)."""
        p = precision or "bf16"
        if p == "fp16":
            p = "bf16"
        return self.peak_flops.get(p, self.peak_flops["bf16"])


def _norm(name: str) -> str:
    return re.sub(r"[\s_]+", " ", name.strip().lower().removeprefix("nvidia ").removeprefix("amd ").strip())


def _rows() -> list[dict[str, str]]:
    with resources.files("detectors.data").joinpath("accelerators.csv").open() as f:
        return list(csv.DictReader(f))


@cache
def load_catalog() -> dict[str, Accelerator]:
    out = {}
    for r in _rows():
        peaks = {p: float(r[f"{p}_tflops"]) * 1e12 for p in PRECISIONS if r[f"{p}_tflops"]}
        out[r["key"]] = Accelerator(
            key=r["key"],
            vendor=r["vendor"],
            name=r["name"],
            peak_flops=peaks,
            tdp_w=float(r["tdp_w"]) if r["tdp_w"] else None,
            memory_gib=float(r["memory_gib"]) if r["memory_gib"] else None,
            source=r["source"],
            achievable_share=float(r["achievable_share"]) if r.get("achievable_share") else DEFAULT_ACHIEVABLE_SHARE,
            achievable_source=r.get("achievable_source") or "default: no figure for this part",
        )
    return out


@cache
def _alias_index() -> dict[str, str]:
    idx: dict[str, str] = {}
    for r in _rows():
        for a in [r["key"], r["name"], *r["aliases"].split("|")]:
            idx[_norm(a)] = r["key"]
    return idx


#: What a window's basis says when the part is not in the catalog (or not reported): its FLOP band is the widest the
#: catalog allows (detectors/compute.py `unknown_accelerator_peaks`), never a silent zero.
UNKNOWN_ACCELERATOR = "unknown_accelerator"


@cache
def resolve(model_name: str | None) -> Accelerator | None:
    """Map a reported model name (DCGM modelName, inventory key) to a catalog entry; None when unknown."""
    if not model_name:
        return None
    n = _norm(model_name)
    idx = _alias_index()
    if n in idx:
        return load_catalog()[idx[n]]
    # Longest alias contained in the reported name, e.g. "NVIDIA H100 80GB HBM3" -> h100.
    best = max((a for a in idx if re.search(rf"(^|[^a-z0-9]){re.escape(a)}([^a-z0-9]|$)", n)), key=len, default=None)
    if best is None:
        return None
    key = idx[best]
    cat = load_catalog()
    if "pcie" in n and f"{key}-PCIE" in cat:  # e.g. "Tesla V100-PCIE-32GB", "H100 PCIe": not the SXM row
        key = f"{key}-PCIE"
    return cat[key]
