"""Whether a confident call rests on a kind of work the run does not resemble (issue 14).

A density guard cannot see a new kind of work inside a region the training data already covers. Fit without
input-bound LoRA and its histories sit among low-load serving's: in distribution, and a quarter of them
confidently `not_training`. What gives such a call away is what it rests on. Refit the tier's model without one
kind of work at a time (a jackknife over kinds, as GroupKFold holds out a source family) and the call leaves its
band when low-load serving is the kind left out; and the history is farther from low-load serving's rows than
low-load serving's rows from one provider are from its rows from the others.

So a confident band needs the row to conform to each kind of its class that it lies near and whose removal takes
it out of that band. To conform is to lie within the `quantile` of the kind's own spread: the mean distance to the
kind's `k` nearest rows, measured from each source family of the kind to its other families (a new provider of a
known kind must pass). Near is within `reach` times that distance: a kind farther off is not what the call rests
on. Only those kinds' members are consulted, so a call costs about three member predictions, not one per kind.
A row that fails is `uncertain`, and the kinds it was unlike are named. A call that no single kind decides, or
that rests on kinds the row resembles, is untouched.

Measured on the simulator's families held out whole (model card, version 6.1): held-out input-bound LoRA called
`not_training` 0.25 -> 0.06 as sent, 0.06 -> 0 nvidia-smi only; every kind's own provider-held-out rows keep their
calls except ~4 % more `uncertain` not-training ones. Consulting every member, and kinds at any distance, withdrew
half as many calls again for no held-out gain. Version 6.2 checks the nvidia-smi tier's training calls too
(`GbmWorkloadClassifier.kind_bands`): held-out low-load serving called training there 0.67 -> 0.04.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from weakref import WeakKeyDictionary

import numpy as np
from sklearn.base import BaseEstimator

from detectors.flat_trees import proba_one
from detectors.neighbours import distances, knn_mean, knn_mean_loo


def _slim(est: Any) -> Any:
    """A fitted member without the bin edges of its numeric features: they are used to bin the training rows
    only, predicting reads the trees' own thresholds (600 KB of a 610 KB member; tests/test_kind_support.py checks
    a slimmed member predicts exactly as before)."""
    bm = getattr(est, "_bin_mapper", None)
    if bm is not None and getattr(bm, "is_categorical_", None) is not None:
        bm.bin_thresholds_ = [t if cat else t[:0] for t, cat in zip(bm.bin_thresholds_, bm.is_categorical_,
                                                                     strict=True)]
    return est


class KindSupport(BaseEstimator):
    """One tier's jackknife over kinds of work and each kind's conformity threshold.

    fit(tier, X, y, kinds, Z, z_kinds, z_groups): `tier` a fitted TierModel (its estimator is cloned per member,
    its columns and calibration are reused); X, y, kinds its training rows (members are fitted on all of them); Z
    the rows the conformity is measured on, standardised as the tier's guard does, with their kinds and source
    families. Only kinds of `classes` get a member (the calls of the other class are never checked).
    """

    def __init__(self, k: int = 5, quantile: float = 0.95, reach: float = 2.0, classes: tuple[int, ...] = (0, 1),
                 max_ref: int = 300, training_quantile: float | None = None, random_state: int = 0):
        self.k = k
        self.classes = classes
        self.quantile = quantile
        self.training_quantile = training_quantile  # a training kind's conformity quantile (None: `quantile`)
        self.reach = reach
        self.max_ref = max_ref
        self.random_state = random_state

    def fit(self, tier: Any, X: np.ndarray, y: np.ndarray, kinds: np.ndarray, Z: np.ndarray,
            z_kinds: np.ndarray, z_groups: np.ndarray) -> KindSupport:
        y, kinds, z_kinds, z_groups = (np.asarray(a) for a in (y, kinds, z_kinds, z_groups))
        rng = np.random.default_rng(self.random_state)
        self.kinds_: list[str] = []
        self.members_: list[Any] = []
        self.ref_: dict[str, np.ndarray] = {}
        self.threshold_: dict[str, float] = {}
        self.class_: dict[str, int] = {}
        for kind in sorted(set(kinds.tolist())):
            keep = kinds != kind
            zk = z_kinds == kind
            cls = round(float(y[kinds == kind].mean()))
            if cls not in self.classes or len(np.unique(y[keep])) < 2 or zk.sum() < self.k + 1:
                continue  # calls of that class are not checked, one class would be gone, or too few rows
            self.kinds_.append(kind)
            self.class_[kind] = cls
            self.members_.append(_slim(tier._new_estimator().fit(X[keep][:, tier.columns_], y[keep])))
            Zk, gk = Z[zk], z_groups[zk]
            scores = [knn_mean(distances(Zk[gk == g], None, Zk[gk != g]), self.k)
                      for g in np.unique(gk) if (gk != g).sum() >= self.k]
            if not scores:  # one source family: each row against the kind's other rows
                scores = [knn_mean_loo(Zk, self.k)]
            s = np.concatenate(scores)
            s = s[np.isfinite(s)]
            q = self.training_quantile if cls == 1 and self.training_quantile is not None else self.quantile
            self.threshold_[kind] = float(np.quantile(s, q)) if s.size else float("inf")
            pick = np.sort(rng.permutation(len(Zk))[: self.max_ref])
            self.ref_[kind] = Zk[pick]
        return self

    def _stack(self) -> tuple[np.ndarray, dict[str, tuple[int, int]]]:
        """Every kind's reference rows in one array, with each kind's span (derived once per fitted object)."""
        hit = _STACKS.get(self)
        if hit is None or hit[0] is not self.ref_:  # refitted: derive again
            spans, n = {}, 0
            for kind in self.kinds_:
                spans[kind] = (n, n + len(self.ref_[kind]))
                n += len(self.ref_[kind])
            hit = (self.ref_, np.vstack([self.ref_[k] for k in self.kinds_]), spans)
            _STACKS[self] = hit
        return hit[1], hit[2]

    def unlike_rows(self, tier: Any, bands: Sequence[str], Xt: np.ndarray, Z: np.ndarray) -> list[tuple[str, ...]]:
        """Per row, the kinds its confident band rests on and it is unlike (empty: the call stands). `Xt`: the rows
        as the tier reads them; `Z`: the same rows standardised as the tier's guard does. One distance and at most
        one member call per kind for the whole batch."""
        cls = np.array([{"training": 1, "not_training": 0}.get(b, -1) for b in bands])
        out: list[list[str]] = [[] for _ in bands]
        asked = np.flatnonzero(cls >= 0)
        if not asked.size:
            return [() for _ in bands]
        # every kind's rows in one distance call (one per kind was most of a call's cost), then split per kind
        stack, spans = self._stack()
        D = distances(Z[asked], self, stack)
        pos = np.full(len(bands), -1)
        pos[asked] = np.arange(asked.size)
        for kind in self.kinds_:
            rows = np.flatnonzero(cls == self.class_[kind])
            if not rows.size:
                continue
            a, b = spans[kind]
            d = knn_mean(D[pos[rows], a:b], self.k)
            th = self.threshold_[kind]
            # like it (the call may rest on it), or too far off to be what the call rests on: not asked
            rows = rows[(d > th) & (d <= self.reach * th)]
            if not rows.size:
                continue
            m = self.members_[self.kinds_.index(kind)]
            p = tier.calibrator_.predict(proba_one(m, Xt[rows][:, tier.columns_]))
            flips = p < tier.t_high_ if self.class_[kind] else p > tier.t_low_
            for r in rows[flips]:
                out[r].append(kind)
        return [tuple(k) for k in out]


#: KindSupport -> (its reference rows stacked, each kind's span); weak, so a dropped model takes its entry along.
_STACKS: WeakKeyDictionary[KindSupport, tuple[Any, np.ndarray, dict[str, tuple[int, int]]]] = WeakKeyDictionary()
