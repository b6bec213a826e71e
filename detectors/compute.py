"""Compute accounting: FLOP per sample, vectorised, with a band and the basis it rests on.

Formula (DESIGN.md, "Compute accounting"):
- `tensor_active` basis: FLOP = interval x peak(precision) x tensor_active. Unknown precision: point at BF16
  peak, band [BF16 peak, FP8 peak] (FP8 doubles the peak on Hopper-class parts).
- `utilisation_power` basis (tensor activity missing; nvidia-smi-level fields only), weaker and flagged:
  activity a = GPU utilisation (or graphics-engine / SM activity), damped by the power fraction when power and
  TDP are known; FLOP = interval x BF16 peak x a x MFU, with MFU point 0.40 (Epoch AI's assumption), low 0.10,
  high 0.60 of the FP8-or-BF16 peak (above the best published large-run MFU, 56 %; reference/accelerators.md).
- `none`: no activity signal at all; point and low are 0 and high is the device's full capacity at FP8 peak.
"""

from __future__ import annotations

import numpy as np

BASIS_NONE, BASIS_UTIL_POWER, BASIS_TENSOR = 0, 1, 2
BASIS_NAMES = {BASIS_NONE: "none", BASIS_UTIL_POWER: "utilisation_power", BASIS_TENSOR: "tensor_active"}
MFU_POINT, MFU_LOW, MFU_HIGH = 0.40, 0.10, 0.60


def estimate_flop(
    interval_s: np.ndarray,
    peak_point: np.ndarray,
    peak_low: np.ndarray,
    peak_high: np.ndarray,
    tensor_active: np.ndarray,
    activity: np.ndarray,
    power_frac: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-sample FLOP (point, low, high) and basis code. Missing inputs are NaN; NaN peaks mean unknown model.

    `activity` is a 0-1 utilisation proxy; `power_frac` is power / TDP (NaN when either is unknown).
    """
    dt = np.nan_to_num(interval_s, nan=0.0)
    pk_point = np.nan_to_num(peak_point, nan=0.0)
    pk_low = np.nan_to_num(peak_low, nan=0.0)
    pk_high = np.nan_to_num(peak_high, nan=0.0)
    has_tensor = ~np.isnan(tensor_active)
    has_act = ~np.isnan(activity)
    ta = np.where(has_tensor, tensor_active, 0.0)
    # Power damps utilisation: "100 % utilised" at a third of TDP is mostly waiting (kernel-launch bound).
    damp = np.where(np.isnan(power_frac), 1.0, np.clip(power_frac * 1.5, 0.0, 1.0))
    act = np.where(has_act, np.clip(activity, 0.0, 1.0) * damp, 0.0)

    point = np.where(has_tensor, dt * pk_point * ta, dt * pk_low * act * MFU_POINT)
    low = np.where(has_tensor, dt * pk_low * ta, dt * pk_low * act * MFU_LOW)
    high = np.where(has_tensor, dt * pk_high * ta, np.where(has_act, dt * pk_high * act * MFU_HIGH, dt * pk_high))
    basis = np.where(has_tensor, BASIS_TENSOR, np.where(has_act, BASIS_UTIL_POWER, BASIS_NONE)).astype(np.int8)
    return point, low, high, basis
