"""The accelerator catalog's achievable share of peak (issue 14): a per-part column with a source per value, used by
the compute estimate for the tensor basis's low end."""

from __future__ import annotations

import math

import numpy as np
import pytest

from detectors.catalog import DEFAULT_ACHIEVABLE_SHARE, load_catalog, resolve
from detectors.compute import ACHIEVABLE_SHARE, BASIS_TENSOR, achievable_share, estimate_flop

#: The parts issue 14 names as rented today, by the name a driver reports.
RENTED = ("Tesla V100-SXM2-32GB", "Tesla T4", "NVIDIA A10G", "NVIDIA L40", "NVIDIA L4",
          "NVIDIA RTX 6000 Ada Generation", "NVIDIA GH200 480GB", "AMD Instinct MI210", "NVIDIA H20",
          "NVIDIA H100 80GB HBM3", "NVIDIA H200",
          "NVIDIA A100-SXM4-80GB", "AMD Instinct MI300X", "NVIDIA L40S", "NVIDIA B200", "NVIDIA H100 NVL")


def test_every_part_has_an_achievable_share_with_its_source():
    for a in load_catalog().values():
        assert 0.3 <= a.achievable_share <= 1.0, a.key
        assert a.achievable_source and a.source, a.key
        if a.achievable_share == DEFAULT_ACHIEVABLE_SHARE:  # no figure of its own: the row says it is the default
            assert "default" in a.achievable_source, a.key
        else:
            assert "stas00" in a.achievable_source or "gpu_capture" in a.achievable_source, a.key
    for name in RENTED:
        assert resolve(name) is not None, name


def test_the_shares_are_the_cited_figures():
    # MAMF / this row's dense BF16 peak (stas00/ml-engineering); reference/accelerators.md says MI300X ~51 %
    assert resolve("AMD Instinct MI300X").achievable_share == pytest.approx(668.4 / 1307.4, abs=1e-3)
    assert resolve("NVIDIA A100-SXM4-80GB").achievable_share == pytest.approx(271.2 / 312, abs=1e-3)
    assert resolve("NVIDIA B200").achievable_share == pytest.approx(1745.0 / 2250, abs=1e-3)
    # Hopper: measured on the H200 capture A, below its lowest model-FLOP / tensor-time ratio (serving decode 0.674)
    h200 = resolve("NVIDIA H200")
    assert h200.achievable_share < 0.674 and "gpu_capture_h200" in h200.achievable_source
    assert {resolve(n).achievable_share for n in ("NVIDIA H100 80GB HBM3", "NVIDIA GH200 480GB", "NVIDIA H800")} == {
        h200.achievable_share}
    assert resolve("Tesla T4").achievable_share == DEFAULT_ACHIEVABLE_SHARE  # nothing published: the default
    nvl = resolve("NVIDIA H100 NVL")  # its own row (400 W, 94 GB), not the SXM one's 700 W / 80 GB
    assert (nvl.key, nvl.tdp_w, nvl.memory_gib) == ("H100-NVL", 400.0, 94.0)
    assert achievable_share("Mystery X9") == achievable_share(None) == ACHIEVABLE_SHARE == DEFAULT_ACHIEVABLE_SHARE


@pytest.mark.parametrize("part", ["AMD Instinct MI300X", "NVIDIA H200", "Tesla T4", "Mystery X9"])
def test_the_tensor_basis_low_end_is_the_parts_share_of_peak(part: str):
    one, nan = np.array([1.0]), np.array([math.nan])
    peak = np.array([1e15])
    share = achievable_share(part)
    point, low, high, basis = estimate_flop(one, peak, peak, peak * 2, np.array([0.5]), nan, nan,
                                            np.array([share]))
    assert basis[0] == BASIS_TENSOR
    assert low[0] == pytest.approx(share * point[0]) and high[0] == pytest.approx(2 * point[0])
    # the utilisation / power basis does not take it (its own MFU band already says what a busy cycle does)
    _, low_u, _, _ = estimate_flop(one, peak, peak, peak, nan, np.array([0.5]), nan, np.array([share]))
    _, low_d, _, _ = estimate_flop(one, peak, peak, peak, nan, np.array([0.5]), nan)
    assert low_u[0] == low_d[0]


def test_without_a_share_the_default_is_used():
    one, nan, peak = np.array([1.0]), np.array([math.nan]), np.array([1e15])
    point, low, _, _ = estimate_flop(one, peak, peak, peak, np.array([1.0]), nan, nan)
    assert low[0] == pytest.approx(DEFAULT_ACHIEVABLE_SHARE * point[0])
