"""Nearest-neighbour distances over rows with missing features, shared by the out-of-distribution guard and the
kind support (detectors/classifier.py, detectors/kind_support.py).

A distance is sklearn's NaN-aware Euclidean (only the features both rows carry count, scaled up to all of them);
two rows that share no feature are infinitely far. Both callers measure a query against fixed reference rows on
every verdict, so what `nan_euclidean_distances` derives from the reference on each call (a copy, its mask, norms
and squares) is derived once per fitted owner here: a verdict then costs its own rows only.
"""

from __future__ import annotations

from typing import Any
from weakref import WeakKeyDictionary

import numpy as np


def knn_mean(d: np.ndarray, k: int) -> np.ndarray:
    """Each row's mean distance to its `k` nearest columns of `d` (NaN = no shared feature = infinitely far); NaN
    where that mean is not finite."""
    d = np.where(np.isnan(d), np.inf, d)
    k = min(k, d.shape[1])
    if k < 1:
        return np.full(len(d), np.nan)
    with np.errstate(invalid="ignore"):
        out = np.partition(d, k - 1, axis=1)[:, :k].mean(axis=1)
    return np.where(np.isfinite(out), out, np.nan)


def knn_mean_loo(Z: np.ndarray, k: int) -> np.ndarray:
    """`knn_mean` of each row of `Z` to the other rows (itself left out): the score of a set with one source."""
    d = distances(Z, None, Z)
    np.fill_diagonal(d, np.inf)
    return knn_mean(d, min(k, len(Z) - 1))


def _parts(owner: Any, ref: np.ndarray) -> tuple[np.ndarray, ...]:
    hit = _PARTS.get(owner) if owner is not None else None
    if hit is not None and hit[0] is ref:
        return hit[1]
    Y = np.array(ref, dtype=np.float64)
    missing = np.isnan(Y)
    Y[missing] = 0
    # the masks pre-cast to what np.dot casts them to on each call (float for the BLAS product, int64 for the count)
    parts = (Y, missing.astype(np.float64), np.einsum("ij,ij->i", Y, Y)[None, :], Y * Y, (~missing).astype(np.int64))
    if owner is not None:
        _PARTS[owner] = (ref, parts)
    return parts


def distances(Zq: np.ndarray, owner: Any, ref: np.ndarray) -> np.ndarray:
    """`nan_euclidean_distances(Zq, ref)`: the same operations in the same order (bit-identical), without its
    per-call validation; `ref`'s parts are kept for `owner` (a fitted object, held weakly; None: not kept)."""
    Y, missing_Y, y_norm, YY, present_Y = _parts(owner, ref)
    X = np.array(Zq, dtype=np.float64)
    missing_X = np.isnan(X)
    X[missing_X] = 0
    d = -2 * (X @ Y.T)
    d += np.einsum("ij,ij->i", X, X)[:, None]
    d += y_norm
    np.maximum(d, 0, out=d)
    d -= np.dot(X * X, missing_Y.T)
    d -= np.dot(missing_X, YY.T)
    np.clip(d, 0, None, out=d)
    present_count = np.dot(1 - missing_X, present_Y.T)
    d[present_count == 0] = np.nan
    np.maximum(1, present_count, out=present_count)
    d /= present_count
    d *= X.shape[1]
    np.sqrt(d, out=d)
    return d


#: fitted owner -> (the reference it was derived from, its parts); weak, so a dropped model takes its entry along.
_PARTS: WeakKeyDictionary[Any, tuple[np.ndarray, tuple[np.ndarray, ...]]] = WeakKeyDictionary()
