"""Young runs (issue 14): P and bands on each run's first 1..16 windows, the packaged model with and without its
young-run shrink (version 5.2 vs 5.1), the shrink refitted on the training seed's run starts and measured on a seed
never fitted.

    nice -n 10 python -m benchmarks.classifier_young [OUT.json]   # simulates eval seeds 7 and 11, scale 3 (slow)

Per view (as sent; nvidia-smi only) and tier: the window of each training run's first confident training call, the
first window with P >= 0.2 (the scope baseline's p_low), confident errors, Brier per history length.
"""
from __future__ import annotations

import copy
import json
import sys
from typing import Any

import numpy as np

from detectors.model_artifact import load_artifact
from pipeline.model_train import TRAIN_SCENARIO, run_prefixes, simulated_entries

P_LOW = 0.2  # the scope baseline's p_low (policy demo): a window under it cannot start a change's dwell


def _first(ns: np.ndarray, hit: np.ndarray) -> int | None:
    return int(ns[hit][0]) if hit.any() else None


def tier_figures(p: np.ndarray, band: np.ndarray, sel: np.ndarray, y: np.ndarray, n: np.ndarray,
                 wl: np.ndarray) -> dict[str, Any]:
    first_train: list[int | None] = []
    first_low: list[int | None] = []
    conf_nt, neg_dwell = 0, []
    for w in sorted(set(wl[sel].tolist())):
        s = sel & (wl == w)
        o = np.argsort(n[s])
        ns, ps, bs, ys = n[s][o], p[s][o], band[s][o], y[s][o]
        if ys[0] == 1:
            first_train.append(_first(ns, bs == "training"))
            first_low.append(_first(ns, ps >= P_LOW))
            conf_nt += int((bs == "not_training").any())
        else:  # a non-training run whose first three windows are all over p_low: a dwell could start on it
            neg_dwell.append(int((ps[:3] >= P_LOW).all()))
    ft = [f for f in first_train if f is not None]
    ct = (band == "training") & sel
    first_y = sel & (n == 1) & (y == 1)
    return {
        "prefixes": int(sel.sum()), "training_runs": len(first_train),
        "first_confident_training_window": {
            "median": float(np.median(ft)) if ft else None, "mean": round(float(np.mean(ft)), 2) if ft else None,
            "never": sum(f is None for f in first_train), "hist": {str(k): ft.count(k) for k in sorted(set(ft))}},
        "training_runs_p_ge_p_low_on_first_window": sum(f == 1 for f in first_low),
        "training_runs_ever_confident_not_training": conf_nt,
        "prefix_confident_not_training_on_training": int(((band == "not_training") & sel & (y == 1)).sum()),
        "prefix_confident_training_calls": int(ct.sum()),
        "prefix_confident_training_precision": round(float(y[ct].mean()), 4) if ct.any() else None,
        "negative_runs_first3_windows_all_p_ge_p_low": f"{sum(neg_dwell)}/{len(neg_dwell)}",
        "brier_by_length": {str(m): round(float(((p[sel & (n == m)] - y[sel & (n == m)]) ** 2).mean()), 4)
                            for m in (1, 2, 3, 4, 6, 8, 12, 16) if (sel & (n == m)).any()},
        "p_first_window_training_min": round(float(p[first_y].min()), 4) if first_y.any() else None,
    }


def main(out_path: str) -> dict[str, Any]:
    model, _ = load_artifact()
    e7, t7, _ = simulated_entries("eval", 7, **TRAIN_SCENARIO)
    table = model.fit_young(*run_prefixes(e7, t7)[:2])
    base = copy.copy(model)
    base.young_shrink_ = {}  # version 5.1: the same trees, bands and short-history rule, P as the tier gives it
    e11, t11, _ = simulated_entries("eval", 11, **{**TRAIN_SCENARIO, "coarse_twins": False})  # scored: no twins
    H, y, wl = run_prefixes(e11, t11)
    X = model.featurizer_.transform(H)
    n = X[:, model.featurizer_.feature_names_out_.index("history_windows")]
    out: dict[str, Any] = {"fit_seed7": {t: table[t]["shrink"] for t in table},
                           "min_history_windows": model.min_history_windows_}
    for view in ("as_sent", "smi_only"):
        Xv = X if view == "as_sent" else model._tier_input(X, "smi")
        out[view] = {}
        for name, mdl in (("v5_1", base), ("v5_2", model)):
            a = mdl.assess(Xv, young=np.ones(len(Xv), dtype=bool))
            p = np.array([d["p"] for d in a])
            band = np.array([d["band"] for d in a])
            tier = np.array([d["tier"] for d in a])
            out[view][name] = {t: tier_figures(p, band, tier == t, y, n, wl) for t in ("full", "smi")
                               if (tier == t).any()}
    with open(out_path, "w") as fh:
        json.dump(out, fh, indent=1)
    return out


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "var/classifier_young.json")
