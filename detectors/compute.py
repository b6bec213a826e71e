"""Compute accounting: FLOP per sample, vectorised, with a band and the basis it rests on.

Formula (DESIGN.md, "Compute accounting"):
- `tensor_active` basis: FLOP = interval x peak(precision) x tensor_active. Unknown precision: point at BF16
  peak, band [BF16 peak x achievable share, FP8 peak] (FP8 doubles the peak on Hopper-class parts). The low end
  takes the part's achievable share of peak, a catalog column with its source per part (detectors/catalog.py:
  the Maximum Achievable Matmul FLOPS measured by stas00/ml-engineering where published, e.g. A100 0.87, B200
  0.78, MI300X 0.51; Hopper parts 0.65, measured on the real H200 capture A, where serving's decode did 0.67 of
  tensor_active x BF16 peak x time and train / LoRA 0.89 / 0.88; `DEFAULT_ACHIEVABLE_SHARE` 0.8, said so in the
  row, where nothing is known): a tensor-active cycle is not a cycle at the dense peak.
- `utilisation_power` basis (tensor activity missing; nvidia-smi-level fields only), weaker and flagged:
  activity a = GPU utilisation (or graphics-engine / SM activity), damped by the power fraction when power and
  TDP are known; FLOP = interval x BF16 peak x a x MFU, with MFU point 0.40 (Epoch AI's assumption), low 0.10,
  high 0.60 of the FP8-or-BF16 peak (above the best published large-run MFU, 56 %; reference/accelerators.md).
  Utilisation without power: same point, the low end halved (a busy engine may be mostly waiting).
  Power without utilisation (power-only exporters): activity a_p = (power fraction - idle share) / (1 - idle
  share), idle share 0.15 of TDP; point = BF16 peak x a_p x MFU point, low = a quarter of that (power also
  buys memory traffic), high = FP8-or-BF16 peak x min(1, 2 a_p) x MFU high: a band about 8x wide, flagged by the
  same basis code (utilisation_power).
- `none`: no activity signal at all; point and low are 0 and high is the device's full capacity at FP8 peak.
- Unknown accelerator (no catalog row, or no model reported): basis `unknown_accelerator`. Per sample the formula
  above runs on `unknown_accelerator_peaks`: point at the catalog's median peak for the precision (BF16 when
  unknown), low at its smallest, high at its largest (FP8-or-BF16 when unknown); no TDP, so power neither damps
  nor stands in for activity. `trainwatch classify`, the store and the cases all read this per-window band.
"""

from __future__ import annotations

from functools import cache

import numpy as np

from detectors.catalog import DEFAULT_ACHIEVABLE_SHARE, resolve
from schemas.window_sums import BASES

#: Basis codes: the index of each name in the window sums' layout (schemas/window_sums.py).
BASIS_NONE, BASIS_UTIL_POWER, BASIS_TENSOR, BASIS_UNKNOWN_ACCELERATOR = (
    BASES.index(b) for b in ("none", "utilisation_power", "tensor_active", "unknown_accelerator"))
BASIS_NAMES = dict(enumerate(BASES))
MFU_POINT, MFU_LOW, MFU_HIGH = 0.40, 0.10, 0.60
#: Share of the dense peak that tensor-active cycles achieve at least (the tensor basis's low end) when the part's own
#: is not given: per part it is the catalog's `achievable_share` (`achievable_share(model)`); this default is the one
#: the catalog gives a part without a figure, and what an unknown part gets.
ACHIEVABLE_SHARE = DEFAULT_ACHIEVABLE_SHARE
#: Power drawn by an idle, clocked-up part, as a share of TDP (H100/A100 idle at 60-90 W of 400-700 W).
IDLE_POWER_SHARE = 0.15


def estimate_flop(
    interval_s: np.ndarray,
    peak_point: np.ndarray,
    peak_low: np.ndarray,
    peak_high: np.ndarray,
    tensor_active: np.ndarray,
    activity: np.ndarray,
    power_frac: np.ndarray,
    achievable_share: np.ndarray | float = ACHIEVABLE_SHARE,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-sample FLOP (point, low, high) and basis code. Missing inputs are NaN; NaN peaks mean unknown model.

    `activity` is a 0-1 utilisation proxy; `power_frac` is power / TDP (NaN when either is unknown);
    `achievable_share` is each sample's part's share of peak (`achievable_share(model)`), the tensor basis's low end.
    """
    dt = np.nan_to_num(interval_s, nan=0.0)
    pk_point = np.nan_to_num(peak_point, nan=0.0)
    pk_low = np.nan_to_num(peak_low, nan=0.0)
    pk_high = np.nan_to_num(peak_high, nan=0.0)
    has_tensor = ~np.isnan(tensor_active)
    has_act = ~np.isnan(activity)
    ta = np.where(has_tensor, tensor_active, 0.0)
    # Power damps utilisation: "100 % utilised" at a third of TDP is mostly waiting (kernel-launch bound).
    has_power = ~np.isnan(power_frac)
    damp = np.where(has_power, np.clip(power_frac * 1.5, 0.0, 1.0), 1.0)
    act = np.where(has_act, np.clip(activity, 0.0, 1.0) * damp, 0.0)
    # power-only: activity from the draw above idle, a wide band (power also pays for memory traffic)
    power_only = ~has_act & has_power
    a_p = np.where(power_only, np.clip((power_frac - IDLE_POWER_SHARE) / (1.0 - IDLE_POWER_SHARE), 0.0, 1.0), 0.0)
    low_mfu = np.where(has_power, MFU_LOW, MFU_LOW / 2.0)  # utilisation without power: "busy" may be waiting

    # the point at the point peak (BF16 for a known part; the catalog's median for an unknown one), the low at the low
    point = np.where(has_tensor, dt * pk_point * ta,
                     np.where(power_only, dt * pk_point * a_p * MFU_POINT, dt * pk_point * act * MFU_POINT))
    share = np.clip(np.nan_to_num(np.asarray(achievable_share, dtype=float), nan=ACHIEVABLE_SHARE), 0.0, 1.0)
    low = np.where(has_tensor, dt * pk_low * ta * share,
                   np.where(power_only, dt * pk_low * a_p * MFU_POINT / 4.0, dt * pk_low * act * low_mfu))
    high = np.where(has_tensor, dt * pk_high * ta,
                    np.where(has_act, dt * pk_high * act * MFU_HIGH,
                             np.where(power_only, dt * pk_high * np.minimum(1.0, 2.0 * a_p) * MFU_HIGH, dt * pk_high)))
    basis = np.where(has_tensor, BASIS_TENSOR,
                     np.where(has_act | power_only, BASIS_UTIL_POWER, BASIS_NONE)).astype(np.int8)
    return point, low, high, basis


@cache
def achievable_share(model_name: str | None) -> float:
    """The share of peak the part's tensor-active cycles achieve at least (catalog column, with its source there);
    a part the catalog does not know gets the default (its peaks are the catalog-wide band anyway)."""
    acc = resolve(model_name)
    return acc.achievable_share if acc is not None else ACHIEVABLE_SHARE


@cache
def unknown_accelerator_peaks(precision: str | None) -> tuple[float, float, float]:
    """(point, low, high) peak FLOP/s for a part the catalog does not know, from the parts it does: point at their
    median peak at `precision` (BF16 when unknown), low at the smallest, high at the largest (at FP8-or-BF16 when
    the precision is unknown: it may be an FP8 run)."""
    from detectors.catalog import load_catalog

    parts = [a for a in load_catalog().values() if "bf16" in a.peak_flops]
    at = sorted(a.peak(precision) for a in parts)
    high = max(a.low_precision_band[1] for a in parts) if precision is None else at[-1]
    return at[len(at) // 2], at[0], high
