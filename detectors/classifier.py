"""The workload classifier: calibrated P(training) from a workload's recent windows, in three bands.

Input: a workload's history exactly as the detect engine hands it over (detectors/engine.py on_window): dicts
{workload_id, window_start, window_end, device_count, node_count, basis, features} with `features` =
detectors/windows.py `WorkloadWindow.features` (FEATURE_NAMES). `history_entry` builds one such dict from a merged
window, so training and `trainwatch classify` feed the model the same shape. A window delivered again (a late-data
correction re-merged) replaces its earlier entry; entries are ordered by window start.

Features (`HistoryFeaturizer`): over the last `history_k` windows each per-window feature (plus a few ratios of
them, `DERIVED`) becomes mean, spread, trend, last value, max and min; beside them come scale (devices, nodes,
device-seconds) and duration. Anything that encodes
the sampling interval (sample counts, interval fields) or the telemetry provenance rather than the work
(`fields_present`, `tensor_basis_share`, the basis-dependent `log10_flop_rate`) is dropped by name. Missing stays
NaN: HistGradientBoosting routes missing values natively; nothing is ever filled with zero.

Tiers: a `full` model sees every feature; an `smi` model sees only what nvidia-smi reports (utilisation, memory,
power, clocks) plus scale and duration. A history with any DCGM profiling reading goes to `full`, otherwise to
`smi`. Each tier has its own isotonic calibration and its own band thresholds, both fitted on out-of-fold
predictions grouped by source (a whole family held out per fold), so the smi tier's wider uncertainty comes out
of the data rather than a fudge factor. The full model is also trained on copies with random DCGM fields hidden
(profiling paused, partial exporters), so odd subsets of fields are calibrated rather than extrapolated.

Bands: `training` when calibrated P >= the tier's upper threshold (chosen so held-out precision of confident
training calls >= target), `not_training` when P <= the lower threshold (held-out share of training runs among
those calls <= 1 - target), else `uncertain`. A history with no activity signal at all is always `uncertain`, and so
is one with neither utilisation nor power (outside the training data: every simulated provider sends them).

Top features: replace one input feature at a time by missing and measure the change in the raw model
probability (cheap, model-agnostic, and "missing" is a state the model has learned, unlike an arbitrary fill).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import cache
from typing import Any
from weakref import WeakKeyDictionary

import numpy as np
import sklearn
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.isotonic import IsotonicRegression
from sklearn.model_selection import GroupKFold
from threadpoolctl import ThreadpoolController

from detectors.catalog import load_catalog
from detectors.classifier_base import Verdict
from detectors.fields import field_of as _attr
from detectors.flat_trees import proba_one
from detectors.kind_support import KindSupport
from detectors.neighbours import distances, knn_mean, knn_mean_loo
from detectors.state import combine_verdicts
from detectors.windows import UNIT_FEATURES

BANDS = ("training", "not_training", "uncertain")
TIERS = ("full", "smi")

#: Per-window feature names containing these encode how often we sample, not what the GPU does.
INTERVAL_TOKENS = ("interval", "sample_count", "samples", "sample_rate", "n_obs", "count")
#: Per-window features that describe the telemetry (which fields, which FLOP basis) rather than the workload:
#: dropped, or the model would learn the provider instead of the work (and the smi tier could not be routed).
PROVENANCE_FEATURES = frozenset(("fields_present", "tensor_basis_share", "log10_flop_rate"))
#: Features an nvidia-smi-only provider also yields, whose names carry no metric token.
SMI_EXTRA = frozenset(("devices_per_node",))
#: Tokens of metrics only DCGM profiling (or a richer exporter) provides.
DCGM_TOKENS = (
    "gr_engine",
    "sm_active",
    "sm_occupancy",
    "tensor",
    "dram",
    "fp64",
    "fp32",
    "fp16",
    "pcie",
    "nvlink",
    "net_",
    "flop",
)
#: Tokens of nvidia-smi-level metrics.
SMI_TOKENS = ("gpu_util", "mem_copy", "fb_used", "fb_free", "fb_", "memory", "mem_", "power", "energy", "clock", "util")
#: Base metrics whose presence counts as an activity signal (without one, no confident call is allowed).
ACTIVITY_TOKENS = ("gpu_util", "gr_engine", "sm_active", "tensor", "power")
#: nvidia-smi's core readings (utilisation, power): without either, no confident call (see score_matrix).
SMI_CORE_TOKENS = ("gpu_util", "power")
#: Per-window aggregation over the history. max/min keep a phase that the mean would average away (training
#: interleaved with serving, duty-cycled training: the busy windows are the evidence).
STATS = ("mean", "std", "trend", "last", "max", "min")
#: Per-window ratios of features the windows already carry: name -> (numerator, denominator, smallest denominator).
#: Trees split one feature at a time, so a ratio that means something physically is worth spelling out:
#: share of engine-busy time spent in tensor cores (matrix math), breathing of framebuffer use (a KV cache grows
#: with load; a training allocation is static), power per unit of busy time (memory-hard hashing vs compute), DRAM
#: per engine-busy time (memory-bound decode vs matmul-bound steps).
DERIVED: dict[str, tuple[str, str, float]] = {
    "tensor_per_gr_engine": ("mean_tensor", "mean_gr_engine", 0.02),
    "fb_used_cv": ("std_fb_used", "mean_fb_used", 0.01),
    "power_per_util": ("mean_power", "mean_gpu_util", 0.02),
    # DRAM-busy time per unit of engine-busy time: decode streams weights and KV cache for little math (memory-
    # bound), a training step is matmul-bound (issue 14, leave-one-family-out: full-DCGM F1 0.949 -> 0.954).
    # DCGM tier: no engine activity without profiling fields.
    "dram_per_gr_engine": ("mean_dram", "mean_gr_engine", 0.02),
}
#: Calibrated P a confident band needs at least (training: P >= it; not_training: P <= NOT_TRAINING_CEIL).
BAND_FLOOR = 0.5
#: Asymmetric stakes: a confident not_training closes the question for good, a missed training run is the costlier
#: error, so it needs P <= 0.2 and out-of-fold share of training runs among its calls <= 1 - NOT_TRAINING_TARGET.
NOT_TRAINING_CEIL = 0.2
NOT_TRAINING_TARGET = 0.99
#: Young runs (issue 14): the training rows are histories of whole `history_k` windows almost always (a random delivery
#: of a long workload), so a run's first windows lie where the tier has barely been calibrated. Measured on the
#: prefixes of runs (their first 1..k windows): version 5's smi tier called 21 of 81 training runs confidently
#: not_training on their first window (23 % of those calls training). `fit_young` measures per tier the fewest
#: windows from which every length keeps that share <= 1 - NOT_TRAINING_TARGET; a run with fewer is `uncertain`
#: (reason `short_history`), never confidently not_training. A model never measured so (fit alone) has no such rule:
#: `train_and_save` measures it on the training seed's runs, so the shipped artifact always carries it.
SHORT_HISTORY = "short_history"
#: A confident call that leaves its band when one kind of work is left out of training, for a run unlike that kind
#: (detectors/kind_support.py); the kinds are named in `out_features` as "kind:<name>".
UNLIKE_KIND = "rests_on_unlike_kind"
#: A not_training call for a run under more sustained load than the training runs the model learnt from (issue 14,
#: benchmarks/real_stretch.py): the real H200 captures' training and LoRA runs, continued to a length judged whole,
#: drew 0.99 of TDP at 99.5 % utilisation, beyond every simulated training run (power <= ~0.75 of TDP), and model 6.3
#: called 90-100 % of them not_training at P 0.000, in distribution. Load past what training was seen at is no
#: evidence of not training, so the call is withdrawn (`uncertain`, the statistics named in `out_features`). The
#: bound per statistic is the `LOAD_QUANTILE` of the tier's training kinds' reference rows (kind support).
BUSIER = "busier_than_training"
#: Power and tensor activity only: a run pinned at 100 % utilisation (engine, SM) is no busier in the sense that
#: matters (hashing keeps every engine busy with no matrix math; with utilisation, engine and SM in the set every
#: simulated mining history lost its not_training call: 82 of 299 withdrawn on eval seed 3, against 19 without them).
LOAD_FEATURES = tuple(f"mean_{m}__{s}" for m in ("power", "tensor") for s in ("mean", "min"))
LOAD_QUANTILE = 0.995
#: Young runs' P (issue 14: "missing information is never evidence"): the tiers' calibration was fitted on whole
#: histories, so on a run's first windows P is not calibrated (version 5.1's smi tier read a new 32-GPU pretraining
#: run P 0.000 on its first window, which delayed the change-in-scope call). `fit_young` fits per tier and history
#: length m a weight w_m in [0, 1] (least squares on the training seed's run starts, non-decreasing in m) and a young
#: run's P reads prior + w_m (P - prior): near the tier's base rate while the history says little, the model's own P
#: once it has enough windows. Bands stay the model's: a confident call needs the unshrunk P in its band as before
#: (and a training call the shrunk P as well), so shrinking never makes a call confident.
SCALE_FEATURES = ("scale_devices", "scale_nodes", "scale_log_device_seconds", "duration_log_s", "history_windows")
#: How many devices a run holds is a simulator prior, not evidence: the simulator gives training 8 GPUs per node,
#: real clusters train on 1, 2 or 4 (issue 14: 2- and 4-GPU training runs called not_training, moved by
#: devices_per_node). With `device_scale=False` (the shipped model) these never reach the model.
DEVICE_SCALE = frozenset(("scale_devices", "scale_nodes", "scale_log_device_seconds", "device_count", "node_count",
                          "devices_per_node"))


#: Per-window statistics whose value depends on how many samples a window holds (issue 14, leave-one-family-out): at
#: one sample per device per window (a provider sampling every 30-60 s) a within-window std is the spread between
#: devices, the sub-window profile (sync, cv, lag-1 autocorrelation) is missing, at 1 s it is the work's burstiness.
#: They carry the provider's sampling interval as much as the work, so a model reading them learns the provider.
SAMPLING_FEATURES = (
    *(f"std_{m}" for m in ("tensor", "sm", "sm_occupancy", "dram", "gr_engine", "gpu_util", "mem_copy_util", "power",
                           "fb_used", "sm_clock", "mem_clock")),
    *(f"sync_{s}_{m}" for s in ("devices", "nodes") for m in ("tensor", "util", "power")),
    *(f"profile_{s}_{m}" for s in ("cv", "ac1") for m in ("tensor", "util", "power")),
)

#: nvidia-smi-level metric groups, by the tokens of the per-window features built from them (first match wins, so
#: `power_per_util` is power and `mem_copy_util` is not utilisation). A group the training data always carries and
#: a history lacks is filled in from reference rows (both classes) rather than read as evidence.
SMI_GROUPS = (("power", "power"), ("fb_used", "memory"), ("mem_occupancy", "memory"), ("mem_copy", "mem_copy_util"),
              ("util", "utilisation"), ("sm_clock", "sm_clock"), ("mem_clock", "mem_clock"))
#: History statistics the out-of-distribution guard compares (trend and last add little beyond these).
OOD_STATS = ("mean", "std", "max", "min")
OOD_SCALE = ("scale_devices", "scale_log_device_seconds")


def smi_group(name: str) -> str | None:
    n = name.lower()
    return next((g for t, g in SMI_GROUPS if t in n), None)


def feature_tier(name: str) -> str:
    """'interval' (dropped), 'dcgm' (full tier only) or 'smi' (both tiers) for one per-window feature name."""
    n = name.lower()
    if n in PROVENANCE_FEATURES or n in UNIT_FEATURES or any(t in n for t in INTERVAL_TOKENS):
        return "interval"
    if n in SMI_EXTRA:
        return "smi"
    if any(t in n for t in DCGM_TOKENS):
        return "dcgm"
    if any(t in n for t in SMI_TOKENS):
        return "smi"
    # Unknown provenance (e.g. a synchrony statistic whose source metric is not in its name): treat as DCGM so the
    # smi tier never depends on a field an nvidia-smi provider may not have.
    return "dcgm"


def _num(v: Any) -> float:
    if v is None:
        return math.nan
    try:
        f = float(v)
    except (TypeError, ValueError):
        return math.nan
    return f if math.isfinite(f) else math.nan


def history_entry(window: Any) -> dict[str, Any]:
    """One history entry as detectors/engine.py `on_window` appends it to `run.history` (keep the two in step:
    tests/test_classifier.py checks them against each other)."""
    feats = _attr(window, "features")
    return {"workload_id": _attr(window, "workload_id"), "window_start": _num(_attr(window, "window_start")),
            "window_end": _num(_attr(window, "window_end")), "device_count": _attr(window, "device_count", 0),
            "node_count": _attr(window, "node_count") or len(_attr(window, "nodes") or ()),
            "basis": str(_attr(window, "basis") or "none"), "features": dict(feats) if feats else {}}


def normalise_history(history: Sequence[Any]) -> list[Any]:
    """Each (workload, window) once, its latest delivery kept (a correction re-merges the whole window), in
    window order. The engine appends every delivery, so a late partial would otherwise count a window twice."""
    latest: dict[tuple[Any, float], tuple[int, Any]] = {}
    for i, w in enumerate(history):
        latest[(_attr(w, "workload_id"), _num(_attr(w, "window_start")))] = (i, w)
    ordered = sorted(latest.items(), key=lambda kv: (kv[0][1] if not math.isnan(kv[0][1]) else math.inf, kv[1][0]))
    return [w for _, (_, w) in ordered]


def _trend(vals: np.ndarray) -> float:
    """Least-squares slope per window over the non-missing points; NaN with fewer than 3."""
    idx = np.flatnonzero(~np.isnan(vals))
    if idx.size < 3:
        return math.nan
    x = idx.astype(float)
    y = vals[idx]
    xc = x - x.mean()
    return float((xc * (y - y.mean())).sum() / (xc * xc).sum())


def _trends(wm: np.ndarray, cnt: np.ndarray) -> np.ndarray:
    """`_trend` of each column of `wm`, bit for bit. A column present in every window (most) is computed for all
    such columns at once: each row of the transposed copy is contiguous, so numpy reduces it as it reduces the 1-D
    column (the same pairwise sums); a column with gaps goes through `_trend` itself."""
    k = len(wm)
    out = np.full(wm.shape[1], np.nan)
    full = cnt == k
    if k >= 3 and full.any():
        x = np.arange(k, dtype=float)
        xc = x - x.mean()
        y = np.ascontiguousarray(wm[:, full].T)
        out[full] = (xc * (y - y.mean(axis=1)[:, None])).sum(axis=1) / (xc * xc).sum()
    for j in np.flatnonzero(~full & (cnt >= 3)):
        out[j] = _trend(wm[:, j])
    return out


class HistoryFeaturizer(BaseEstimator):
    """Turns window histories into a fixed feature matrix. fit learns the per-window feature names."""

    def __init__(self, history_k: int = 5, derived: bool = True, device_scale: bool = True,
                 drop: tuple[str, ...] = ()):
        self.history_k = history_k
        self.derived = derived
        self.device_scale = device_scale
        self.drop = drop

    def _dropped(self, name: str) -> bool:
        return (not getattr(self, "device_scale", True) and name in DEVICE_SCALE) or name in getattr(self, "drop", ())

    def fit(self, histories: Sequence[Sequence[Any]], y: Any = None) -> HistoryFeaturizer:
        names: set[str] = set()
        for h in histories:
            for w in normalise_history(h)[-self.history_k :]:
                for k, v in (_attr(w, "features") or {}).items():
                    if feature_tier(k) != "interval" and not isinstance(v, (str, bytes, list, dict)) \
                            and not self._dropped(k):
                        names.add(k)
        # derived ratios whose parts the data carries (their tier follows their name, like any feature)
        self.derived_ = {d: spec for d, spec in DERIVED.items()
                         if self.derived and {spec[0], spec[1]} <= names and not self._dropped(d)}
        names.update(self.derived_)
        self.window_features_ = tuple(sorted(names))
        cols: list[str] = [f"{f}__{s}" for f in self.window_features_ for s in STATS]
        cols += list(SCALE_FEATURES)
        self.feature_names_out_ = tuple(cols)
        tiers = [feature_tier(f) for f in self.window_features_ for _ in STATS] + ["smi"] * len(SCALE_FEATURES)
        self.smi_columns_ = np.array([t == "smi" for t in tiers])
        self.dcgm_columns_ = ~self.smi_columns_
        act = [any(t in f.lower() for t in ACTIVITY_TOKENS) for f in self.window_features_ for _ in STATS]
        self.activity_columns_ = np.array(act + [False] * len(SCALE_FEATURES))
        # Base metric of each column, so augmentation can hide a whole metric (all its statistics) at once.
        self.column_metric_ = tuple([f for f in self.window_features_ for _ in STATS] + list(SCALE_FEATURES))
        return self

    def window_matrix(self, history: Sequence[Any]) -> np.ndarray:
        """(k, n_window_features) of the last k windows (history already normalised), NaN for missing."""
        recent = history[-self.history_k :]
        m = np.full((len(recent), len(self.window_features_)), np.nan)
        pos = {n: i for i, n in enumerate(self.window_features_)}
        for r, w in enumerate(recent):
            for k, v in (_attr(w, "features") or {}).items():
                i = pos.get(k)
                if i is not None:
                    m[r, i] = _num(v)
        for d, (num, den, floor) in self.derived_.items():
            a, b = m[:, pos[num]], m[:, pos[den]]
            with np.errstate(all="ignore"):
                m[:, pos[d]] = np.where(b >= floor, a / b, np.nan)  # NaN stays NaN; an idle window has no ratio
        return m

    def transform_one(self, history: Sequence[Any]) -> np.ndarray:
        history = normalise_history(history)
        wm = self.window_matrix(history)
        nf = wm.shape[1]
        out = np.full(nf * len(STATS) + len(SCALE_FEATURES), np.nan)
        if wm.shape[0]:
            with np.errstate(all="ignore"), _quiet():
                present = ~np.isnan(wm)
                cnt = present.sum(axis=0)
                mean = np.where(cnt > 0, np.nanmean(np.where(present, wm, np.nan), axis=0), np.nan)
                std = np.where(cnt > 1, np.nanstd(wm, axis=0), np.nan)
                hi = np.where(cnt > 0, np.nanmax(wm, axis=0), np.nan)
                lo = np.where(cnt > 0, np.nanmin(wm, axis=0), np.nan)
            cols = np.arange(nf)
            last = np.where(cnt > 0, wm[len(wm) - 1 - np.argmax(present[::-1], axis=0), cols], np.nan)
            trend = _trends(wm, cnt)
            block = np.stack([mean, std, trend, last, hi, lo], axis=1)  # order follows STATS
            out[: nf * len(STATS)] = block.reshape(-1)
        recent = history[-self.history_k :]
        devs = [_num(_attr(w, "device_count")) for w in recent]
        nodes = [_num(_attr(w, "node_count")) for w in recent]
        # device-seconds = devices x window length: the engine's history entries carry no device_seconds field
        dsec = [_num(_attr(w, "device_count")) * (_num(_attr(w, "window_end")) - _num(_attr(w, "window_start")))
                for w in recent]
        base = nf * len(STATS)
        out[base + 0] = np.nanmax(devs) if devs and not np.all(np.isnan(devs)) else np.nan
        out[base + 1] = np.nanmax(nodes) if nodes and not np.all(np.isnan(nodes)) else np.nan
        tot = np.nansum(dsec) if dsec and not np.all(np.isnan(dsec)) else np.nan
        out[base + 2] = math.log10(1.0 + tot) if not math.isnan(tot) else np.nan
        if history:
            start = _num(_attr(history[0], "window_start"))
            end = _num(_attr(history[-1], "window_end"))
            dur = end - start if not (math.isnan(start) or math.isnan(end)) else math.nan
            out[base + 3] = math.log10(1.0 + max(dur, 0.0)) if not math.isnan(dur) else np.nan
        out[base + 4] = float(len(recent))
        for i, name in enumerate(SCALE_FEATURES):
            if self._dropped(name):
                out[base + i] = np.nan
        return out

    def transform(self, histories: Sequence[Sequence[Any]]) -> np.ndarray:
        if not histories:
            return np.empty((0, len(self.feature_names_out_)))
        return np.vstack([self.transform_one(h) for h in histories])


class _quiet:
    """Silence numpy's 'mean of empty slice' warnings inside a block (all-NaN columns are expected)."""

    def __enter__(self) -> None:
        import warnings

        self._cm = warnings.catch_warnings()
        self._cm.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *exc: object) -> None:
        self._cm.__exit__(*exc)


def _upper_threshold(p: np.ndarray, y: np.ndarray, target: float, min_calls: int) -> float:
    """Smallest t such that every cut >= t keeps precision(P >= t) >= target (monotone, so robust). Cuts are only
    between distinct probabilities and only where at least `min_calls` calls lie above: judged inside a plateau of
    tied calibrated values, or on the first few calls, one negative at the top would erase the whole band."""
    order = np.argsort(-p, kind="stable")
    ps, ys = p[order], y[order]
    n = np.arange(1, len(ps) + 1)
    prec = np.cumsum(ys) / n
    cuts = np.flatnonzero(np.r_[ps[1:] < ps[:-1], True] & (n >= min_calls))
    best = 1.0 + 1e-9  # nothing confident
    for i in cuts:
        if prec[i] < target:
            break
        best = float(ps[i])
    return best


def _lower_threshold(p: np.ndarray, y: np.ndarray, target: float, min_calls: int) -> float:
    """Largest t such that the share of training among P <= t stays <= 1 - target for every cut below it."""
    t_hi = _upper_threshold(1.0 - p, 1 - y, target, min_calls)
    return -1e-9 if t_hi > 1.0 else 1.0 - t_hi


def default_gbm(random_state: int | None = 0) -> HistGradientBoostingClassifier:
    """The base boosting settings: 150 iterations, 15 leaves, min 40 per leaf, L2 1.0, missing values native (the
    shipped model overrides some: pipeline/model_train.py DEFAULT_PARAMS). No early stopping: it would hold out a
    random validation split, ignoring the source families."""
    return HistGradientBoostingClassifier(max_iter=150, learning_rate=0.08, max_leaf_nodes=15, min_samples_leaf=40,
                                          l2_regularization=1.0, max_features=1.0, early_stopping=False,
                                          random_state=random_state)


class TierModel(BaseEstimator):
    """One tier: a probabilistic classifier (default `default_gbm()`) + isotonic calibration fitted on grouped
    out-of-fold predictions, and the band thresholds read off them.

    `estimator` is cloned for every out-of-fold fit and for the final fit (as `CalibratedClassifierCV` does), so its
    hyperparameters are its own: set them on it, or through `set_params(estimator__max_iter=...)`.
    """

    def __init__(
        self,
        estimator: Any = None,
        cv_folds: int = 4,
        target_precision: float = 0.95,
        threshold_margin: float = 0.02,
        min_band_calls: int = 20,
    ):
        self.estimator = estimator
        self.cv_folds = cv_folds
        self.target_precision = target_precision
        self.threshold_margin = threshold_margin
        self.min_band_calls = min_band_calls

    def _new_estimator(self) -> Any:
        base = default_gbm() if self.estimator is None else self.estimator
        if not (hasattr(base, "fit") and hasattr(base, "predict_proba")):
            raise TypeError(f"TierModel needs a classifier with fit and predict_proba, got {type(base).__name__}")
        return clone(base)

    def fit(self, X: np.ndarray, y: np.ndarray, groups: np.ndarray | None = None) -> TierModel:
        """`groups`: the source of each row (a whole source is held out per calibration fold); None = each row its
        own source."""
        y = np.asarray(y, dtype=int)
        groups = np.arange(len(y)) if groups is None else np.asarray(groups)
        # Columns never seen filled carry nothing (and break binning); the tier ignores them.
        self.columns_ = (~np.isnan(X)).any(axis=0)
        X = X[:, self.columns_]
        n_groups = len(np.unique(groups))
        oof = np.full(len(y), np.nan)
        if n_groups >= 2:
            for tr, te in GroupKFold(n_splits=min(self.cv_folds, n_groups)).split(X, y, groups):
                if len(np.unique(y[tr])) < 2:
                    oof[te] = y[tr].mean()  # a fold with one class teaches nothing; the prior is the honest answer
                    continue
                oof[te] = self._new_estimator().fit(X[tr], y[tr]).predict_proba(X[te])[:, 1]
        else:
            oof[:] = y.mean()
        self.calibrator_ = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(oof, y)
        cal = self.calibrator_.predict(oof)
        target = min(self.target_precision + self.threshold_margin, 0.999)
        # A band never contradicts its own probability: the cumulative-precision cut alone can fall below 0.5 when
        # the tier separates well out of fold, and then a history with calibrated P = 0.33 would be "training".
        self.t_high_ = max(_upper_threshold(cal, y, target, self.min_band_calls), BAND_FLOOR)
        self.t_low_ = min(_lower_threshold(cal, y, max(target, NOT_TRAINING_TARGET), self.min_band_calls),
                          NOT_TRAINING_CEIL, self.t_high_ - 1e-6)
        self.oof_brier_ = float(np.mean((cal - y) ** 2))
        self.estimator_ = self._new_estimator().fit(X, y) if len(np.unique(y)) == 2 else None
        self.prior_ = float(y.mean())
        self.n_train_ = len(y)
        return self

    def raw_proba(self, X: np.ndarray) -> np.ndarray:
        if self.estimator_ is None:
            return np.full(len(X), self.prior_)
        return proba_one(self.estimator_, X[:, self.columns_])  # scikit-learn's P, all trees walked at once

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        return self.calibrator_.predict(self.raw_proba(X))

    def band(self, p: np.ndarray) -> np.ndarray:
        return np.where(p >= self.t_high_, "training", np.where(p <= self.t_low_, "not_training", "uncertain"))


class OodGuard(BaseEstimator):
    """Where the model was fitted: a per-feature envelope and a k-nearest-neighbour distance on the training rows.

    Columns are robustly standardised (median, 5-95 % spread). A row is out of distribution when a feature lies
    beyond the training envelope (0.1-99.9 % quantiles widened by a margin of their range, the smallest margin
    that flags <= `envelope_rate` of a source family held out whole) or when its mean
    distance to the `k` nearest training rows (NaN-aware Euclidean: only features both rows carry count) exceeds
    the `quantile` of the same distance measured from each source family to the *other* families (GroupKFold):
    the threshold is what a new provider of known kinds of work looks like, so it is calibrated, not guessed.
    """

    def __init__(self, k: int = 5, quantile: float = 0.99, envelope_q: float = 0.001, envelope_rate: float = 0.01,
                 margin_grid: tuple[float, ...] = (0.1, 0.25, 0.5, 1.0, 2.0), max_ref: int = 2000,
                 random_state: int = 0):
        self.k = k
        self.quantile = quantile
        self.envelope_q = envelope_q
        self.envelope_rate = envelope_rate
        self.margin_grid = margin_grid
        self.max_ref = max_ref
        self.random_state = random_state

    def _z(self, X: np.ndarray) -> np.ndarray:
        return (X[:, self.columns_] - self.center_) / self.scale_

    def _quantiles(self, Xc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with np.errstate(all="ignore"), _quiet():
            return np.nanquantile(Xc, [self.envelope_q, 1.0 - self.envelope_q], axis=0)

    @staticmethod
    def _pad(lo: np.ndarray, hi: np.ndarray, margin: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return lo, hi, margin * (hi - lo) + 0.01 * (np.abs(hi) + np.abs(lo)) / 2 + 1e-6

    def _bounds(self, Xc: np.ndarray, margin: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self._pad(*self._quantiles(Xc), margin)

    @staticmethod
    def _out(Xq: np.ndarray, lo: np.ndarray, hi: np.ndarray, pad: np.ndarray) -> np.ndarray:
        with np.errstate(invalid="ignore"):
            return (Xq < lo - pad) | (Xq > hi + pad)

    def _knn(self, Zq: np.ndarray, Zr: np.ndarray) -> np.ndarray:
        return knn_mean(distances(Zq, self if Zr is getattr(self, "ref_", None) else None, Zr), self.k)

    def fit(self, X: np.ndarray, columns: np.ndarray, names: Sequence[str], groups: np.ndarray) -> OodGuard:
        present = (~np.isnan(X[:, columns])).mean(axis=0) >= 0.05
        self.columns_ = np.asarray(columns)[present]
        self.names_ = tuple(np.asarray(names, dtype=object)[self.columns_].tolist())
        Xc = X[:, self.columns_]
        with np.errstate(all="ignore"), _quiet():
            self.center_ = np.nanmedian(Xc, axis=0)
            q05, q95 = np.nanquantile(Xc, 0.05, axis=0), np.nanquantile(Xc, 0.95, axis=0)
        self.scale_ = np.maximum((q95 - q05) / 3.29, 0.01 * (np.abs(self.center_) + 0.01))
        g = np.asarray(groups)
        n_groups = len(np.unique(g))
        folds = list(GroupKFold(n_splits=min(4, n_groups)).split(Xc, groups=g)) if n_groups >= 2 else []
        # The envelope's margin is measured too: the smallest that flags at most `envelope_rate` of the rows of a
        # source family held out whole (a new provider of known work must pass).
        self.margin_ = self.margin_grid[-1]
        fold_q = [(self._quantiles(Xc[tr]), Xc[te]) for tr, te in folds]
        for mg in self.margin_grid:
            hits = [self._out(Xte, *self._pad(lo, hi, mg)).any(axis=1).mean() for (lo, hi), Xte in fold_q]
            if not hits or max(hits) <= self.envelope_rate:
                self.margin_ = mg
                break
        self.lo_, self.hi_, self.pad_ = self._bounds(Xc, self.margin_)
        Z = self._z(X)
        rng = np.random.default_rng(self.random_state)
        ref = rng.permutation(len(Z))[: self.max_ref]
        self.ref_ = Z[np.sort(ref)]
        scores = np.full(len(Z), np.nan)
        if folds:
            for tr, te in folds:
                sub = tr if len(tr) <= self.max_ref else rng.choice(tr, self.max_ref, replace=False)
                scores[te] = self._knn(Z[te], Z[sub])
        else:  # one source: leave each row out of its own neighbours
            scores = knn_mean_loo(Z, self.k)
        finite = scores[np.isfinite(scores)]
        self.threshold_ = float(np.quantile(finite, self.quantile)) if finite.size else math.inf
        self.fit_scores_ = finite
        return self

    def check(self, X: np.ndarray) -> tuple[np.ndarray, list[tuple[str, ...]], np.ndarray]:
        """(out of distribution?, the features that are out per row, kNN score) for tier-input rows."""
        env = self._out(X[:, self.columns_], self.lo_, self.hi_, self.pad_)
        Z = self._z(X)
        score = self._knn(Z, self.ref_)
        far = np.nan_to_num(score, nan=0.0) > self.threshold_
        names: list[tuple[str, ...]] = []
        for i in range(len(X)):
            out = [self.names_[j] for j in np.flatnonzero(env[i])]
            if far[i] and not out:
                # farthest features from the nearest training row: what makes this row unlike anything seen
                d = distances(Z[i : i + 1], self, self.ref_)[0]
                nn = self.ref_[int(np.nanargmin(np.where(np.isnan(d), np.inf, d)))]
                gap = np.abs(Z[i] - nn)
                order = [j for j in np.argsort(-np.nan_to_num(gap, nan=-1.0)) if not np.isnan(gap[j])][:3]
                out = [self.names_[j] for j in order]
            names.append(tuple(out))
        return env.any(axis=1) | far, names, score


def training_load_bounds(support: KindSupport, guard: OodGuard, names: Sequence[str]) -> dict[int, float]:
    """Per `LOAD_FEATURES` statistic the guard standardises (by its column in the tier input `names`): the
    `LOAD_QUANTILE` of the training kinds' reference rows, put back in the feature's units. Derived, not stored."""
    hit = _LOAD_BOUNDS.get(support)
    if hit is not None and hit[0] is support.ref_:
        return hit[1]
    ref = [support.ref_[k] for k in support.kinds_ if support.class_[k] == 1]
    bounds: dict[int, float] = {}
    if ref:
        X = np.vstack(ref) * guard.scale_ + guard.center_
        for j, name in enumerate(guard.names_):
            if name in LOAD_FEATURES and np.isfinite(X[:, j]).any():
                with np.errstate(all="ignore"), _quiet():
                    bounds[list(names).index(name)] = float(np.nanquantile(X[:, j], LOAD_QUANTILE))
    _LOAD_BOUNDS[support] = (support.ref_, bounds)
    return bounds


#: KindSupport -> (its reference rows, `training_load_bounds`): weak, so a dropped model takes its entry along.
_LOAD_BOUNDS: WeakKeyDictionary[KindSupport, tuple[Any, dict[int, float]]] = WeakKeyDictionary()

#: HistoryFeaturizer -> (its column_metric_, the smi core columns' mask), likewise.
_SMI_CORE_COLS: WeakKeyDictionary[HistoryFeaturizer, tuple[Any, np.ndarray]] = WeakKeyDictionary()


@cache
def _openmp() -> ThreadpoolController:
    # Finding the loaded thread pools is the slow part (~3 ms): do it once per process, then only flip limits.
    return ThreadpoolController()


class GbmWorkloadClassifier(ClassifierMixin, BaseEstimator):
    """Tiered, calibrated classifier over window histories; implements the WorkloadClassifier protocol.

    fit(histories, y, groups, kinds): `histories` is a sequence of window sequences (oldest first), `y` 1 =
    training, `groups` the source each history came from (a whole group is held out per calibration fold), `kinds`
    (optional) the kind of work each is (e.g. "serving:low_load"): with it and `kind_quantile`, each tier also
    fits a `KindSupport`, and a confident call in `kind_bands` that rests on a kind the run is unlike becomes
    uncertain. An entry is a band (every tier) or `tier:band` (that tier only). Default: not_training only; the
    shipped recipe (6.3) checks training calls too: fitted on one seed that cost the full tier's leave-one-family-out
    F1 0.951 -> 0.924, on four seeds nothing (`kind_bands_of`; model card).
    `kind_training_quantile`: a training kind's conformity quantile, when it should differ from `kind_quantile`.

    `estimator` is the per-tier model, cloned once per tier (as `CalibratedClassifierCV(estimator=...)` does): a
    `TierModel` (its calibration and band settings and its own inner classifier), or a bare scikit-learn classifier
    with `predict_proba`, which is wrapped in a default `TierModel`; None = `TierModel()` (`default_gbm()` inside).
    Its hyperparameters are reached as nested parameters, e.g. `set_params(estimator__cv_folds=3,
    estimator__estimator__max_iter=40)`.
    """

    def __init__(
        self,
        estimator: Any = None,
        history_k: int = 5,
        derived: bool = True,
        augment_copies: int = 1,
        n_reference: int = 48,
        device_scale: bool = True,
        drop_features: tuple[str, ...] = (),
        kind_quantile: float | None = 0.95,
        kind_bands: tuple[str, ...] = ("not_training",),
        kind_training_quantile: float | None = None,
        top_k: int = 5,
        random_state: int = 0,
        model_id: str = "trainwatch-workload-gbm",
        model_version: str = "1",
    ):
        self.estimator = estimator
        self.history_k = history_k
        self.derived = derived
        self.augment_copies = augment_copies
        self.n_reference = n_reference
        self.device_scale = device_scale
        self.drop_features = drop_features
        self.kind_quantile = kind_quantile
        self.kind_bands = kind_bands
        self.kind_training_quantile = kind_training_quantile
        self.top_k = top_k
        self.random_state = random_state
        self.model_id = model_id
        self.model_version = model_version

    # -- young runs -------------------------------------------------------------------------------------------
    def fit_young(self, prefixes: Sequence[Sequence[Any]], y: Sequence[int]) -> dict[str, Any]:
        """Measure per tier the fewest windows a run needs before a confident not_training is allowed
        (`min_history_windows_`). `prefixes`: the first 1..history_k windows of runs seen from their start (each
        prefix one history), `y` their labels. Per tier (its own input: smi = DCGM columns hidden; full = the rows
        that route to it) and per length m, the share of training runs among the confident not_training calls; the
        minimum is the smallest n such that every length >= n keeps it <= 1 - NOT_TRAINING_TARGET. Returns the
        per-length table (the evidence)."""
        y_arr = np.asarray(y, dtype=int)
        f = self.featurizer_
        X = f.transform(prefixes)
        n = X[:, f.feature_names_out_.index("history_windows")]
        self.min_history_windows_: dict[str, int] = {}
        table: dict[str, Any] = {}
        for t in self.tiers_:
            rows = np.ones(len(X), dtype=bool) if t == "smi" else self.tier_of(X) == t
            Xt = self._tier_input(X[rows], t)  # smi: every prefix with its DCGM columns hidden
            band = np.array([d["band"] for d in self.assess(Xt, young=np.zeros(len(Xt), dtype=bool))])
            yt, nt = y_arr[rows], n[rows]
            per: dict[str, dict[str, Any]] = {}
            for m in range(1, self.history_k + 1):
                calls = (nt == m) & (band == "not_training")
                per[str(m)] = {"histories": int((nt == m).sum()), "training": int(((nt == m) & (yt == 1)).sum()),
                          "not_training_calls": int(calls.sum()), "of_them_training": int((calls & (yt == 1)).sum())}
            ok = [p["of_them_training"] <= (1.0 - NOT_TRAINING_TARGET) * p["not_training_calls"] for p in per.values()]
            need = self.history_k
            while need > 1 and ok[need - 2]:
                need -= 1
            self.min_history_windows_[t] = int(need)
            table[t] = {"min_history_windows": int(need), "per_length": per}
            p_raw = np.array([d["p"] for d in self.assess(Xt, young=np.zeros(len(Xt), dtype=bool))])
            table[t]["shrink"] = self._fit_shrink(t, p_raw, yt, nt)
        return table

    def _fit_shrink(self, tier: str, p: np.ndarray, y: np.ndarray, n: np.ndarray) -> dict[str, Any]:
        """Per history length m < history_k, the weight w_m that best maps a young run's P to its label as
        prior + w_m (P - prior) (least squares = Brier, clipped to [0, 1]), made non-decreasing in m (more windows
        never count for less); the prior is the base rate of the young runs. Length history_k: w = 1."""
        from sklearn.isotonic import IsotonicRegression

        prior = float(y.mean()) if len(y) else 0.5
        ms = np.arange(1, self.history_k)
        raw, cnt = [], []
        for m in ms:
            sel = n == m
            d = p[sel] - prior
            den = float((d * d).sum())
            raw.append(float(np.clip(((y[sel] - prior) * d).sum() / den, 0.0, 1.0)) if den > 0 else 1.0)
            cnt.append(max(int(sel.sum()), 1))
        w = IsotonicRegression(y_min=0.0, y_max=1.0, increasing=True).fit(ms, raw, sample_weight=cnt).predict(ms)
        weights = [round(float(x), 4) for x in w] + [1.0]
        self.young_shrink_ = {**getattr(self, "young_shrink_", {}), tier: {"prior": prior, "weights": weights}}
        brier = {}
        for m in ms:
            sel = n == m
            if sel.any():
                ps = prior + weights[m - 1] * (p[sel] - prior)
                brier[str(int(m))] = {"raw": round(float(((p[sel] - y[sel]) ** 2).mean()), 4),
                                      "shrunk": round(float(((ps - y[sel]) ** 2).mean()), 4)}
        return {"prior": round(prior, 4), "weights_raw": [round(x, 4) for x in raw], "weights": weights,
                "brier": brier}

    def shrink(self, tier: str, n_windows: float, p: float | None) -> float | None:
        """A young run's P read towards its tier's prior by the windows it has (identity when not fitted)."""
        fit = getattr(self, "young_shrink_", {}).get(tier)
        if p is None or fit is None or not n_windows < self.history_k:
            return p
        w = fit["weights"][max(int(n_windows), 1) - 1]
        return float(fit["prior"] + w * (p - fit["prior"]))

    def min_windows(self, tier: str) -> int:
        """Fewest windows of a run's start before a confident not_training (1, no rule, until `fit_young`)."""
        return int(getattr(self, "min_history_windows_", {}).get(tier, 1))

    # -- fitting -----------------------------------------------------------------------------------------------
    def _tier_model(self) -> TierModel:
        """A fresh, unfitted copy of the tier model (each tier fits its own)."""
        base = TierModel() if self.estimator is None else self.estimator
        if not isinstance(base, TierModel):  # a bare classifier: calibrated and banded the default way
            base = TierModel(estimator=base)
        return clone(base)

    def _mask_random_metrics(self, X: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Copies of DCGM-tier rows with random DCGM metrics hidden (whole metric: every statistic of it)."""
        f = self.featurizer_
        dcgm_metrics = sorted({m for m, d in zip(f.column_metric_, f.dcgm_columns_, strict=True) if d})
        if not dcgm_metrics:
            return X[:0]
        metric_cols = {m: np.array([cm == m for cm in f.column_metric_]) for m in {*dcgm_metrics, *f.derived_}}
        out = X.copy()
        for r in range(len(out)):
            keep = rng.random(len(dcgm_metrics)) < rng.uniform(0.15, 0.85)
            if keep.all():
                keep[rng.integers(len(keep))] = False
            if not keep.any():  # keep at least one profiling field, else the row belongs to the smi tier
                keep[rng.integers(len(keep))] = True
            hidden = {m for m, k in zip(dcgm_metrics, keep, strict=True) if not k}
            hidden |= {d for d, (a, b, _) in f.derived_.items() if a in hidden or b in hidden}
            for m in hidden:
                if m in metric_cols:
                    out[r, metric_cols[m]] = np.nan
        return out

    def fit(self, histories: Sequence[Sequence[Any]], y: Sequence[int], groups: Sequence[Any] | None = None,
            kinds: Sequence[str] | None = None):
        # One OpenMP thread: on a shared, busy host the thread team's spin-waits made fitting ~20x slower
        # (cProfile: 130 s of 216 s in the grower's split loop for 350 histories); the trees are small.
        with _openmp().limit(limits=1, user_api="openmp"):
            return self._fit(histories, y, groups, kinds)

    def _fit(self, histories: Sequence[Sequence[Any]], y: Sequence[int], groups: Sequence[Any] | None = None,
             kinds: Sequence[str] | None = None):
        y_arr = np.asarray(y, dtype=int)
        g = np.asarray(groups if groups is not None else np.arange(len(y_arr)))
        kd = None if kinds is None else np.asarray(kinds).astype(str)
        self.featurizer_ = HistoryFeaturizer(self.history_k, self.derived, self.device_scale,
                                             tuple(self.drop_features)).fit(histories)
        X = self.featurizer_.transform(histories)
        self.classes_ = np.array([0, 1])
        self.n_features_in_ = X.shape[1]
        has_dcgm = self._has_dcgm(X)
        rng = np.random.default_rng(self.random_state)

        # full tier: rows with DCGM readings, plus copies with random DCGM fields hidden.
        Xf, yf, gf = X[has_dcgm], y_arr[has_dcgm], g[has_dcgm]
        parts_X, parts_y, parts_g = [Xf], [yf], [gf]
        for _ in range(self.augment_copies):
            parts_X.append(self._mask_random_metrics(Xf, rng))
            parts_y.append(yf)
            parts_g.append(gf)
        self.tiers_: dict[str, TierModel] = {}
        tier_rows: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        if len(yf):
            tier_rows["full"] = (np.vstack(parts_X), np.concatenate(parts_y), np.concatenate(parts_g))
            self.tiers_["full"] = self._tier_model().fit(*tier_rows["full"])
        # smi tier: every row, DCGM columns hidden (what an nvidia-smi-only provider would have sent).
        Xs = X.copy()
        Xs[:, self.featurizer_.dcgm_columns_] = np.nan
        tier_rows["smi"] = (Xs, y_arr, g)
        self.tiers_["smi"] = self._tier_model().fit(Xs, y_arr, g)
        self._fit_abstention(tier_rows, rng)
        self.supports_: dict[str, KindSupport] = {}
        if kd is not None and self.kind_quantile is not None:
            # members on the tier's own rows (masked copies too); conformity on the histories as they were
            kinds_of = {"full": (np.tile(kd[has_dcgm], 1 + self.augment_copies), int(has_dcgm.sum())),
                        "smi": (kd, len(kd))}
            for t, (Xt, yt, gt) in tier_rows.items():
                kt, n0 = kinds_of[t]
                classes = tuple(int(b == "training") for b in self.kind_bands_of(t))
                self.supports_[t] = KindSupport(quantile=self.kind_quantile, classes=classes,
                                                training_quantile=self.kind_training_quantile,
                                                random_state=self.random_state).fit(
                    self.tiers_[t], Xt, yt, kt, self.guards_[t]._z(Xt[:n0]), kt[:n0], gt[:n0])
        return self

    def _fit_abstention(self, tier_rows: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]],
                        rng: np.random.Generator) -> None:
        """Per tier: the out-of-distribution guard, the smi metric groups the training rows always carry, and a
        class-balanced set of reference rows to fill a missing group from (missing information widens P)."""
        f = self.featurizer_
        names = f.feature_names_out_
        stat = [n.rsplit("__", 1)[1] if "__" in n else n for n in names]
        self.group_cols_ = {}
        for gname in dict.fromkeys(g for _, g in SMI_GROUPS):
            cols = [i for i, m in enumerate(f.column_metric_) if f.smi_columns_[i] and m not in SCALE_FEATURES
                    and smi_group(m) == gname]
            if cols:
                self.group_cols_[gname] = np.array(cols)
        self.guards_: dict[str, OodGuard] = {}
        self.expected_groups_: dict[str, tuple[str, ...]] = {}
        self.reference_: dict[str, np.ndarray] = {}
        for t, (Xt, yt, gt) in tier_rows.items():
            allowed = f.smi_columns_ if t == "smi" else np.ones(len(names), dtype=bool)
            cols = np.array([i for i, n in enumerate(names) if allowed[i]
                             and (stat[i] in OOD_STATS or n in OOD_SCALE)])
            self.guards_[t] = OodGuard(random_state=self.random_state).fit(Xt, cols, names, gt)
            have = {gname: (~np.isnan(Xt[:, c])).any(axis=1) for gname, c in self.group_cols_.items()}
            self.expected_groups_[t] = tuple(gname for gname, h in have.items() if h.mean() >= 0.5)
            complete = np.ones(len(Xt), dtype=bool)
            for gname in self.expected_groups_[t]:
                complete &= have[gname]
            picks = []
            for cls in (0, 1):
                idx = np.flatnonzero(complete & (yt == cls))
                picks.append(rng.choice(idx, min(self.n_reference // 2, len(idx)), replace=False) if len(idx) else idx)
            self.reference_[t] = Xt[np.sort(np.concatenate(picks))]

    # -- prediction --------------------------------------------------------------------------------------------
    def _has_dcgm(self, X: np.ndarray) -> np.ndarray:
        return (~np.isnan(X[:, self.featurizer_.dcgm_columns_])).any(axis=1)

    def _has_activity(self, X: np.ndarray) -> np.ndarray:
        return (~np.isnan(X[:, self.featurizer_.activity_columns_])).any(axis=1)

    def _has_smi_core(self, X: np.ndarray) -> np.ndarray:
        f = self.featurizer_
        hit = _SMI_CORE_COLS.get(f)  # a fitted featurizer's columns do not change: found once, not per window
        if hit is None or hit[0] is not f.column_metric_:
            hit = (f.column_metric_, np.array([any(t in m.lower() for t in SMI_CORE_TOKENS) and s
                                               for m, s in zip(f.column_metric_, f.smi_columns_, strict=True)]))
            _SMI_CORE_COLS[f] = hit
        cols = hit[1]
        return (~np.isnan(X[:, cols])).any(axis=1) if cols.any() else np.zeros(len(X), dtype=bool)

    def tier_of(self, X: np.ndarray) -> np.ndarray:
        full = self._has_dcgm(X) & ("full" in self.tiers_)
        return np.where(full, "full", "smi")

    def _tier_input(self, X: np.ndarray, tier: str) -> np.ndarray:
        if tier == "smi":
            X = X.copy()
            X[:, self.featurizer_.dcgm_columns_] = np.nan
        return X

    def missing_groups(self, xt: np.ndarray, tier: str) -> list[str]:
        """The smi metric groups the tier's training rows carry (>= half of them) and this tier-input row lacks."""
        expected = getattr(self, "expected_groups_", {}).get(tier, ())  # an artifact of format 1 has none
        return [g for g in expected if np.isnan(xt[self.group_cols_[g]]).all()]

    def _fill(self, Xv: np.ndarray, tier: str, groups: Sequence[str]) -> np.ndarray:
        """Each row once per reference row, the missing groups' columns taken from it (both classes alike)."""
        ref = getattr(self, "reference_", {}).get(tier)
        if not groups or ref is None or not len(ref):
            return Xv
        cols = np.concatenate([self.group_cols_[g] for g in groups])
        out = np.repeat(Xv, len(ref), axis=0)
        out[:, cols] = np.tile(ref[:, cols], (len(Xv), 1))
        return out

    def assess(self, X: np.ndarray, variants: Sequence[np.ndarray | None] | None = None,
               young: np.ndarray | None = None, *, raw: np.ndarray | None = None,
               fill_raw: Sequence[np.ndarray | None] | None = None) -> list[dict[str, Any]]:
        """Everything a verdict needs, per feature row: calibrated P (the mean over what is unknown), its 5-95 %
        range, band, tier, reasons, missing groups, out-of-distribution features.

        `variants[i]` (optional) holds alternative rows for row i where a missing group could be bounded from
        the data (power in watts for an unknown TDP): they replace the row and the spread over them is kept.
        `young[i]`: row i's history starts at its run's start (default: every row), so fewer windows than the
        tier's `min_windows` make a not_training verdict `uncertain` (`short_history`).
        `raw[i]` (optional): row i's raw model probability on its tier input, already computed by the caller;
        `fill_raw[i]` likewise for the rows `_fill` makes of row i (None: computed here)."""
        tiers = self.tier_of(X)
        n_windows = X[:, self.featurizer_.feature_names_out_.index("history_windows")]
        young = np.ones(len(X), dtype=bool) if young is None else np.asarray(young, dtype=bool)
        out: list[dict[str, Any]] = []
        for t in TIERS:
            rows = np.flatnonzero(tiers == t)
            if not rows.size:
                continue
            m, guard = self.tiers_[t], getattr(self, "guards_", {}).get(t)
            Xt = self._tier_input(X[rows], t)
            p_base = m.predict_proba(Xt) if raw is None else m.calibrator_.predict(np.asarray(raw)[rows])
            ood, ood_names, _ = guard.check(Xt) if guard is not None else (np.zeros(len(rows), bool), [()] * len(rows),
                                                                          None)
            act, core = self._has_activity(Xt), self._has_smi_core(Xt)
            support = getattr(self, "supports_", {}).get(t)  # an artifact before 6.1 has none
            for j, r in enumerate(rows):
                alt = variants[r] if variants is not None else None
                Xv = self._tier_input(alt, t) if alt is not None and len(alt) else Xt[j : j + 1]
                missing = self.missing_groups(Xt[j], t)
                still = self.missing_groups(Xv[0], t)
                if missing or len(Xv) > 1:
                    pre = fill_raw[r] if fill_raw is not None else None
                    pc = m.predict_proba(self._fill(Xv, t, still)) if pre is None else m.calibrator_.predict(pre)
                    p, lo, hi = float(pc.mean()), float(np.quantile(pc, 0.05)), float(np.quantile(pc, 0.95))
                    # the 5-95 % range in one band; not_training (asymmetric stakes) also needs the highest candidate
                    # in it: a flat trace of an unknown part whose range ended on the cut was closed (issue 14)
                    cand = set(m.band(np.array([lo, hi, float(pc.max())])).tolist())
                    band = cand.pop() if len(cand) == 1 else "uncertain"
                    if len(Xv) > 1 or alt is not None:  # bounded from the data: check what is known, not a guess
                        o, nm, _ = guard.check(Xv[len(Xv) // 2 : len(Xv) // 2 + 1]) if guard else ([False], [()], 0)
                        is_ood, names_out = bool(o[0]), nm[0]
                    else:
                        is_ood, names_out = bool(ood[j]), ood_names[j]
                else:
                    p, lo, hi = float(p_base[j]), None, None
                    band = str(m.band(np.array([p]))[0])
                    is_ood, names_out = bool(ood[j]), ood_names[j]
                widened = bool(missing) or len(Xv) > 1
                reasons = []
                # a young run's not_training is read off windows the tier was barely calibrated on: not confident
                short = bool(young[r]) and band == "not_training" and not n_windows[r] >= self.min_windows(t)
                if young[r] and n_windows[r] < self.history_k:
                    # a young run reads towards the prior; a training call needs the evidence to hold there too
                    p, lo, hi = (self.shrink(t, n_windows[r], v) for v in (p, lo, hi))
                    if band == "training" and p < m.t_high_:
                        short = True
                if short:
                    band = "uncertain"
                    reasons.append(SHORT_HISTORY)
                if band == "uncertain" and not short:
                    # the mean alone would have been confident: only what is unknown keeps it open
                    if not widened or m.band(np.array([p]))[0] == "uncertain":
                        reasons.append("between_bands")
                    if widened:
                        reasons.append("missing_information")
                if is_ood:
                    reasons.append("out_of_distribution")
                if not act[j]:
                    reasons.append("no_activity_signal")
                if not core[j]:
                    reasons.append("no_utilisation_or_power")
                if is_ood or not act[j] or not core[j]:
                    band = "uncertain"
                out.append({"row": int(r), "p": p, "p_low": lo, "p_high": hi, "band": band, "tier": t,
                            "reasons": tuple(dict.fromkeys(reasons)) if band == "uncertain" else (),
                            "missing": tuple(missing),
                            "out_features": tuple(names_out) if is_ood else (),
                            "in_distribution": not is_ood})
            if support is not None and guard is not None:
                self._withdraw_unlike(out[len(out) - len(rows) :], Xt, support, m, guard)
                self._withdraw_busier(out[len(out) - len(rows) :], Xt, variants, t, support, guard)
        out.sort(key=lambda d: d["row"])
        return out

    def kind_bands_of(self, tier: str) -> tuple[str, ...]:
        """The bands whose confident calls the kind support checks on `tier` (`kind_bands`: "band" for every
        tier, "tier:band" for one)."""
        out = []
        for entry in self.kind_bands:
            t, _, band = entry.rpartition(":")
            if band not in ("training", "not_training") or t not in ("", *TIERS):
                raise ValueError(f"kind_bands entry {entry!r}: expected 'band' or 'tier:band' with a band of "
                                 f"training / not_training and a tier of {', '.join(TIERS)}")
            if t in ("", tier):
                out.append(band)
        return tuple(dict.fromkeys(out))

    def _withdraw_unlike(self, entries: list[dict[str, Any]], Xt: np.ndarray, support: KindSupport, tier: TierModel,
                         guard: OodGuard) -> None:
        """A confident call in `kind_bands` (asymmetric stakes: by default not_training only) that rests on a kind
        of work the run is unlike becomes uncertain, the kinds named (detectors/kind_support.py). `entries` are
        the tier's verdicts in the order of its input rows `Xt`."""
        checked = self.kind_bands_of(entries[0]["tier"]) if entries else ()
        pick = [j for j, d in enumerate(entries) if d["band"] in checked]
        if not pick:
            return
        bands = [entries[j]["band"] for j in pick]
        for j, kinds in zip(pick, support.unlike_rows(tier, bands, Xt[pick], guard._z(Xt[pick])), strict=True):
            if kinds:
                entries[j].update(band="uncertain", reasons=(UNLIKE_KIND,),
                                  out_features=tuple(f"kind:{k}" for k in kinds))

    def _withdraw_busier(self, entries: list[dict[str, Any]], Xt: np.ndarray,
                         variants: Sequence[np.ndarray | None] | None, tier: str, support: KindSupport,
                         guard: OodGuard) -> None:
        """A not_training call for a run under more load than the tier's training runs (`BUSIER`): withdrawn. A
        row bounded from its readings (unknown part: `variants`) is checked at its busiest candidate."""
        bounds = training_load_bounds(support, guard, self.featurizer_.feature_names_out_)
        if not bounds:
            return
        cols = np.fromiter(bounds, dtype=int)
        lim = np.fromiter(bounds.values(), dtype=float)
        names = self.featurizer_.feature_names_out_
        for j, d in enumerate(entries):
            if d["band"] != "not_training":
                continue
            alt = variants[d["row"]] if variants is not None else None
            rows = self._tier_input(alt, tier) if alt is not None and len(alt) else Xt[j : j + 1]
            with np.errstate(all="ignore"), _quiet():
                top = np.nanmax(rows[:, cols], axis=0)
            over = [names[c] for c, v, b in zip(cols, top, lim, strict=True) if np.isfinite(v) and v > b]
            if over:
                d.update(band="uncertain", reasons=(BUSIER,), out_features=tuple(over))

    def score_matrix(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(calibrated P(training), band, tier) for a feature matrix (abstention included)."""
        a = self.assess(X)
        return (np.array([d["p"] for d in a]), np.array([d["band"] for d in a]).astype(str),
                np.array([d["tier"] for d in a]).astype(str))

    def predict_proba(self, histories: Sequence[Sequence[Any]]) -> np.ndarray:
        p, _, _ = self.score_matrix(self.featurizer_.transform(histories))
        return np.column_stack([1.0 - p, p])

    def contributions(self, x: np.ndarray, tier: str) -> list[tuple[str, float]]:
        """Per-feature change in the raw model probability when that feature is made missing (top_k by size)."""
        probe, present = self._probe(x, tier)
        if present.size == 0:
            return []
        return self._ranked(self.tiers_[tier].raw_proba(probe), present)

    def _probe(self, x: np.ndarray, tier: str) -> tuple[np.ndarray, np.ndarray]:
        """(the tier-input row, then one copy per present feature with that feature missing; the present columns)."""
        xi = self._tier_input(x[None, :], tier)[0]
        present = np.flatnonzero(~np.isnan(xi))
        probe = np.repeat(xi[None, :], present.size + 1, axis=0)
        probe[np.arange(1, present.size + 1), present] = np.nan
        return probe, present

    def _ranked(self, raw: np.ndarray, present: np.ndarray) -> list[tuple[str, float]]:
        if present.size == 0:
            return []
        delta = raw[0] - raw[1:]
        order = np.argsort(-np.abs(delta), kind="stable")[: self.top_k]
        names = self.featurizer_.feature_names_out_
        return [(names[present[i]], round(float(delta[i]), 4)) for i in order]

    # -- missing accelerator: bound power and memory fractions from watts and MiB ------------------------------
    def unit_variants(self, history: Sequence[Any]) -> np.ndarray | None:
        """Feature rows of `history` with its power / memory fractions computed for every catalog TDP / memory the
        readings allow (TDP >= the highest draw seen, memory >= the most used), when the windows carry watts or
        MiB but not the fractions (accelerator unknown or absent). None when there is nothing to bound."""
        hist = normalise_history(history)[-self.history_k :]
        feats = [_attr(w, "features") or {} for w in hist]

        def lacks(frac: str, unit: str) -> bool:
            return all(_num(f.get(frac)) != _num(f.get(frac)) for f in feats) and any(
                _num(f.get(unit)) == _num(f.get(unit)) for f in feats)

        need_power = lacks("mean_power", "mean_power_watts")
        need_mem = lacks("mean_fb_used", "mean_fb_used_mib")
        if not (need_power or need_mem):
            return None
        cat = load_catalog().values()
        tdps: list[float | None] = [None]
        mems: list[float | None] = [None]
        if need_power:
            top = max(_num(f.get("mean_power_watts")) + 2.0 * (_num(f.get("std_power_watts")) if _num(
                f.get("std_power_watts")) == _num(f.get("std_power_watts")) else 0.0) for f in feats
                if _num(f.get("mean_power_watts")) == _num(f.get("mean_power_watts")))
            tdps = _spread(sorted({a.tdp_w for a in cat if a.tdp_w and a.tdp_w >= 0.9 * top}) or [1.1 * top], 5)
        if need_mem:
            top = max(_num(f.get("mean_fb_used_mib")) for f in feats
                      if _num(f.get("mean_fb_used_mib")) == _num(f.get("mean_fb_used_mib")))
            mems = _spread(sorted({a.memory_gib * 1024.0 for a in cat if a.memory_gib and a.memory_gib * 1024.0 >= top})
                           or [1.1 * top], 4)
        hs = []
        for tdp in tdps:
            for mem in mems:
                h2 = []
                for w in hist:
                    f = dict(_attr(w, "features") or {})
                    if tdp is not None:
                        for frac, unit in (("mean_power", "mean_power_watts"), ("std_power", "std_power_watts")):
                            v = _num(f.get(unit))
                            f[frac] = v / tdp if v == v else None
                    if mem is not None:
                        for frac, unit in (("mean_fb_used", "mean_fb_used_mib"), ("std_fb_used", "std_fb_used_mib")):
                            v = _num(f.get(unit))
                            f[frac] = v / mem if v == v else None
                        f["mem_occupancy"] = f.get("mean_fb_used")
                    h2.append({**(w if isinstance(w, dict) else history_entry(w)), "features": f})
                hs.append(h2)
        return self.featurizer_.transform(hs)

    # -- verdicts ------------------------------------------------------------------------------------------------
    def _verdict(self, history: Sequence[Any], young: bool = True) -> tuple[Verdict, dict[str, Any]]:
        x = self.featurizer_.transform_one(history)
        # One row per call: scikit-learn's input and parameter validation was most of a window's cost (the rows are
        # built here, NaN = missing is what the model and the guard expect); it changes no value.
        with _openmp().limit(limits=1, user_api="openmp"), sklearn.config_context(
                assume_finite=True, skip_parameter_validation=True):
            variants = self.unit_variants(history)
            # the verdict's row and its contribution probe in one model call (the per-call cost is per tree, not
            # per row; each row's result does not depend on the others)
            tier = str(self.tier_of(x[None, :])[0])
            probe, present = self._probe(x if variants is None else variants[len(variants) // 2], tier)
            xt = self._tier_input(x[None, :], tier)
            # and the rows assess fills in for what is missing (the same rule as there)
            xv = self._tier_input(variants, tier) if variants is not None and len(variants) else xt
            filled = (self._fill(xv, tier, self.missing_groups(xv[0], tier))
                      if self.missing_groups(xt[0], tier) or len(xv) > 1 else xt[:0])
            raw = self.tiers_[tier].raw_proba(np.vstack([xt, filled, probe]))
            n = 1 + len(filled)
            a = self.assess(x[None, :], [variants], np.array([young]), raw=raw[:1],
                            fill_raw=[raw[1:n] if len(filled) else None])[0]
            top = self._ranked(raw[n:], present)
        missing = list(a["missing"])
        if variants is not None:
            missing = [g + (" (bounded from readings: accelerator unknown)" if g in ("power", "memory") else "")
                       for g in missing] or ["accelerator (bounded from readings)"]
        v = Verdict(p_training=round(a["p"], 4), band=a["band"], top_features=top,
                    model_id=f"{self.model_id}/{a['tier']}", model_version=self.model_version,
                    reasons=a["reasons"], out_features=a["out_features"], missing=tuple(missing),
                    p_low=None if a["p_low"] is None else round(a["p_low"], 4),
                    p_high=None if a["p_high"] is None else round(a["p_high"], 4),
                    in_distribution=a["in_distribution"])
        return v, a

    def predict(self, history: Sequence[Any]) -> Verdict:  # type: ignore[override]
        """The WorkloadClassifier protocol: one verdict over a workload's window history (oldest first).

        A history longer than `history_k` windows is judged whole: cut into consecutive parts of `history_k`
        windows (the last part ends at the newest window), each part judged, then combined (`combine_parts`).
        One row at a time: OpenMP's thread team costs far more than it saves here (148 ms vs 2 ms measured on 2
        shared cores)."""
        hist = normalise_history(history)
        k = self.history_k
        if len(hist) <= k:
            # Young: fewer deliveries than the engine holds. A full history of an old run whose corrections
            # collapse into fewer windows is not young (the engine keeps only the last `history_k` deliveries).
            return self._verdict(hist, young=len(history) < k)[0]
        cuts = list(range(len(hist), 0, -k))
        parts = [hist[max(0, e - k) : e] for e in reversed(cuts)]
        if len(parts) > 1 and len(parts[0]) < k // 2:  # a short oldest remainder joins the next part's judgement
            parts = parts[1:]
        # only the first part holds the run's start (a later part is no young run, whatever its length)
        return combine_parts([self._verdict(p, young=i == 0)[0] for i, p in enumerate(parts)],
                             [len(p) for p in parts])

    def explain_tiers(self) -> dict[str, dict[str, float]]:
        return {
            t: {"t_low": float(m.t_low_), "t_high": float(m.t_high_), "oof_brier": m.oof_brier_, "n_train": m.n_train_}
            for t, m in self.tiers_.items()
        }


def _spread(values: list[float], n: int) -> list[float | None]:
    """At most n values spread over a sorted list (its ends kept)."""
    if len(values) <= n:
        return list(values)
    idx = np.unique(np.rint(np.linspace(0, len(values) - 1, n)).astype(int))
    return [values[i] for i in idx]


def combine_parts(parts: Sequence[Verdict], weights: Sequence[float]) -> Verdict:
    """One verdict for a whole run from the verdicts of its consecutive parts (oldest first).

    P is the window-weighted mean. `not_training` needs every part confidently not training; `training` needs at
    least half the windows in confidently training parts (a run that trains is a training run even with idle or
    serving stretches); anything else is `uncertain` (`mixed_phases` when parts disagree). The reasons,
    out-of-distribution features and missing fields of the parts are kept (the first 16 of each); top features come
    from the part that decided (the strongest training part, else the newest). The rule is written once, in
    `detectors.state.combine_verdicts`, the one the detect engine applies as a run goes on."""
    return combine_verdicts(parts, weights)
