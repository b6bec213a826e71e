"""Leave-one-family-out full-DCGM F1 (issue 14 target ">= 0.97 kept"), per recipe, with the abstention's parts
measured apart so a gate can be judged without refitting.

For each recipe (`build_model(params)`: the shipped recipe plus the named parameter changes) and each source family
of the eval scenario (seed 11, scale 3: `pipeline.model_eval.loso_simulated`'s folds), the model is fitted on the
other families and the held-out histories are assessed as `loso_simulated` does (`uncertain` counts as a miss).
Besides the verdicts, each held-out row keeps its calibrated P, its tier's band cuts, its kNN score and the
fold's kNN threshold, and whether the envelope flagged it, so the figures are given for:

- `shipped`: the model's own bands (what `loso_simulated` reports);
- `knn_x{s}`: the kNN threshold scaled by s (the envelope kept), from the verdicts' P and reasons;
- `no_guard`: the out-of-distribution guard off (a flagged row gets the band its P gives);
- `covered`: F1 over the confident verdicts only, with the coverage.

    nice -n 10 .venv/bin/python -m benchmarks.classifier_levers [--recipes base,leaves7_min80] [--cache DIR]

Results go under `levers` of benchmarks/results/classifier_lofo.json with the commit and date (written after every
recipe). The held-out rows per recipe are pickled into --cache, so a rerun only re-reads them.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import pickle
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.classifier_heldout import RESULTS, _commit
from detectors.classifier import SAMPLING_FEATURES
from pipeline.model_eval import _fold_plan, binary_metrics
from pipeline.model_train import (
    GBM,
    HISTORIES_PER_WORKLOAD,
    TIER,
    TRAIN_SCENARIO,
    Dataset,
    build_model,
    dataset_from_entries,
    run_prefixes,
    simulated_entries,
)

#: A recipe key (not a model parameter): fit the young-run rules per fold (`GbmWorkloadClassifier.fit_young`).
YOUNG = "fit_young"
#: A recipe key: train on the coarse-sampled twins too (pipeline/model_train.py `simulated_entries`; never scored).
#: Absent: as the shipped recipe does (TRAIN_SCENARIO).
TWINS = "coarse_twins"
#: Recipes: parameter changes over the shipped recipe (nested set_params names). Both tiers get them; the full-DCGM
#: figure reads the full tier only.
RECIPES: dict[str, dict[str, Any]] = {
    "base": {},
    "leaves7_min80": {f"{GBM}max_leaf_nodes": 7, f"{GBM}min_samples_leaf": 80},
    "min80": {f"{GBM}min_samples_leaf": 80},
    "leaves7_min80_aug2": {f"{GBM}max_leaf_nodes": 7, f"{GBM}min_samples_leaf": 80, "augment_copies": 2},
    "leaves7_min80_cv3": {f"{GBM}max_leaf_nodes": 7, f"{GBM}min_samples_leaf": 80, f"{TIER}cv_folds": 3},
    "leaves5_min120": {f"{GBM}max_leaf_nodes": 5, f"{GBM}min_samples_leaf": 120},
    # the shipped recipe with 5.1/5.2's young-run rules (short history, P read towards the prior) fitted per fold on
    # the training families' run starts, as `trainwatch model train` fits them on the training seed
    "fit_seed1": {"random_state": 1},  # the fit's own seed (masked-field copies, reference rows, guard sample)
    "fit_seed2": {"random_state": 2},
    "base_young": {YOUNG: True},
    # issue 14's sampling lever (2026-12-05 it was patched in; now a model parameter): the per-window statistics
    # that depend on samples per window dropped, and with them power per utilisation
    "sampling_free": {"drop_features": SAMPLING_FEATURES},
    "sampling_free_no_ppu": {"drop_features": (*SAMPLING_FEATURES, "power_per_util")},
    "profile_sync_free": {"drop_features": tuple(f for f in SAMPLING_FEATURES if not f.startswith("std_"))},
    "leaves7_min80_young": {f"{GBM}max_leaf_nodes": 7, f"{GBM}min_samples_leaf": 80, YOUNG: True},
    # 6.1's kind support on confident training calls too (shipped: not_training calls only)
    "kind_training": {"kind_bands": ("not_training", "training")},
    # ... on the nvidia-smi tier's training calls only (the full-DCGM figure cannot move; real traces are smi-level)
    "kind_training_smi": {"kind_bands": ("not_training", "smi:training")},
    "kind_training_smi_q99": {"kind_bands": ("not_training", "smi:training"), "kind_training_quantile": 0.99},
    # the shipped recipe with and without coarse-sampled twins in each fold's training data (2026-12-07)
    "base_twins": {TWINS: True},
    "base_no_twins": {TWINS: False},
}
KNN_SCALES = (0.727, 0.8, 0.9, 1.0, 1.1, 1.25, 1.5)


def fold_rows(ds: Dataset, params: dict[str, Any], prefixes: tuple[list[Any], np.ndarray, np.ndarray] | None = None,
              family: dict[str, str] | None = None, train_ds: Dataset | None = None) -> list[dict[str, Any]]:
    """Per fold: the held-out rows' verdict parts (full-tier rows and smi-tier rows alike; `tier` tells). With
    `params[YOUNG]`, the young-run rules are fitted on the `prefixes` (run_prefixes) of the fold's training families
    (`family`: workload -> source family) and apply to every held-out history (a history under 16 windows is a
    run's start here: `sample_histories` takes the entries up to a delivery). With `train_ds` (another seed), each
    fold fits on its histories of the other families and `prefixes` / `family` are that seed's."""
    young = bool(params.get(YOUNG))
    params = {k: v for k, v in params.items() if k not in (YOUNG, TWINS)}
    out = []
    for held in _fold_plan(ds.groups, 8):
        test = np.isin(ds.groups, held) & ds.scored  # coarse twins train with their family, never scored
        other = ~np.isin(ds.groups, held)
        train = ds.subset(other) if train_ds is None else train_ds.subset(~np.isin(train_ds.groups, held))
        t0 = time.perf_counter()
        model = build_model(params).fit(train.histories, train.y, train.groups, train.archetypes)
        if young and prefixes is not None and family is not None:
            H, yp, wl = prefixes
            keep = np.array([family.get(str(w)) not in held for w in wl])
            model.fit_young([H[i] for i in np.flatnonzero(keep)], yp[keep])
        X = model.featurizer_.transform([ds.histories[i] for i in np.flatnonzero(test)])
        a = model.assess(X)
        tiers = np.array([d["tier"] for d in a])
        knn = np.full(len(a), np.nan)
        env = np.zeros(len(a), dtype=bool)
        for t in ("full", "smi"):
            rows = np.flatnonzero(tiers == t)
            if rows.size:
                g = model.guards_[t]
                Xt = model._tier_input(X[rows], t)
                env[rows] = g._out(Xt[:, g.columns_], g.lo_, g.hi_, g.pad_).any(axis=1)
                knn[rows] = g.check(Xt)[2]
        out.append({
            "held_out": held, "y": ds.y[test], "archetypes": ds.archetypes[test], "workloads": ds.workloads[test],
            "tier": tiers, "p": np.array([d["p"] for d in a]), "band": np.array([d["band"] for d in a]),
            "reasons": [d["reasons"] for d in a], "knn": knn, "env": env,
            "cuts": {t: (float(m.t_low_), float(m.t_high_)) for t, m in model.tiers_.items()},
            "min_history_windows": dict(getattr(model, "min_history_windows_", {})),
            "knn_threshold": {t: float(g.threshold_) for t, g in model.guards_.items()},
            "fit_s": round(time.perf_counter() - t0, 1),
        })
    return out


def _entries(seed: int, scale: float, cache: Path | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The eval scenario's history entries and truth per workload, coarse-sampled twins included (a recipe without
    them drops them: `_recipe_data`); with `cache`, pickled there once."""
    path = cache / f"entries-{seed}-{scale}-twins.pkl" if cache else None
    if path and path.is_file():
        entries, truth, _ = pickle.loads(path.read_bytes())  # written by this script into a folder the caller chose
        return entries, truth
    entries, truth, digest = simulated_entries("eval", seed, **{**TRAIN_SCENARIO, "scale": scale, TWINS: True})
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(pickle.dumps((entries, truth, digest)))
    return entries, truth


def _recipe_data(ds: Dataset, params: dict[str, Any]) -> Dataset:
    """The histories a recipe trains on: with the twins or without them (the scored rows are the same)."""
    return ds if params.get(TWINS, TRAIN_SCENARIO[TWINS]) else ds.subset(ds.scored)


def _originals(entries: dict[str, Any], truth: dict[str, Any]) -> dict[str, Any]:
    return {w: e for w, e in entries.items() if not truth.get(w, {}).get("twin_of")}


def _band_from_p(p: float, cut: tuple[float, float]) -> str:
    return "training" if p >= cut[1] else "not_training" if p <= cut[0] else "uncertain"


def gated(folds: list[dict[str, Any]], knn_scale: float | None) -> tuple[np.ndarray, np.ndarray]:
    """(y, band) over the full-tier rows with the kNN threshold scaled (None: the guard off, envelope too). Other
    reasons for `uncertain` (missing information, no activity) are kept as the model gave them."""
    ys, bands = [], []
    for f in folds:
        for i in np.flatnonzero(f["tier"] == "full"):
            reasons = set(f["reasons"][i]) - {"out_of_distribution"}
            band = f["band"][i]
            if band == "uncertain" and not reasons:  # uncertain only because out of distribution
                band = _band_from_p(float(f["p"][i]), f["cuts"]["full"])
            if band != "uncertain" and knn_scale is not None:
                far = np.nan_to_num(f["knn"][i], nan=0.0) > knn_scale * f["knn_threshold"]["full"]
                if far or f["env"][i]:
                    band = "uncertain"
            ys.append(int(f["y"][i]))
            bands.append(band)
    return np.array(ys), np.array(bands)


def bootstrap_f1(y: np.ndarray, positive: np.ndarray, workloads: np.ndarray, n: int = 2000) -> list[float]:
    """95 % interval of F1 over workloads drawn with replacement (a workload's histories move together: they are
    one job seen at several lengths, so the histories are not independent)."""
    ids, inv = np.unique(workloads, return_inverse=True)
    tp = np.bincount(inv, positive & (y == 1), len(ids))
    fp = np.bincount(inv, positive & (y == 0), len(ids))
    fn = np.bincount(inv, ~positive & (y == 1), len(ids))
    rng = np.random.default_rng(0)
    f1 = []
    for _ in range(n):
        k = np.bincount(rng.integers(0, len(ids), len(ids)), minlength=len(ids))
        t = float(k @ tp)
        f1.append(2 * t / max(2 * t + float(k @ fp) + float(k @ fn), 1.0))
    return [round(float(np.quantile(f1, q)), 4) for q in (0.025, 0.975)]


def figures(folds: list[dict[str, Any]]) -> dict[str, Any]:
    def block(y: np.ndarray, band: np.ndarray) -> dict[str, Any]:
        m = band != "uncertain"
        cov = binary_metrics(y[m], band[m] == "training")
        return {**binary_metrics(y, band == "training"), "uncertain": round(float((~m).mean()), 4),
                "covered_f1": cov["f1"], "coverage": round(float(m.mean()), 4),
                "training_called_not_training": int(((y == 1) & (band == "not_training")).sum())}

    full = [np.flatnonzero(f["tier"] == "full") for f in folds]
    y = np.concatenate([f["y"][r] for f, r in zip(folds, full, strict=True)])
    band = np.concatenate([f["band"][r] for f, r in zip(folds, full, strict=True)])
    wl = np.concatenate([f["workloads"][r] for f, r in zip(folds, full, strict=True)])
    res: dict[str, Any] = {"n_full": len(y), "workloads": len(set(wl.tolist())), "shipped": block(y, band),
                           "shipped_f1_bootstrap_95": bootstrap_f1(y, band == "training", wl),
                           "no_guard": block(*gated(folds, None))}
    for s in KNN_SCALES:
        res[f"knn_x{s}"] = block(*gated(folds, s))
    res["per_fold"] = {",".join(f["held_out"]): {
        **{k: v for k, v in binary_metrics(f["y"][r], f["band"][r] == "training").items() if k in ("f1", "fp", "fn")},
        "cuts_full": [round(c, 4) for c in f["cuts"]["full"]],
        "knn_threshold_full": round(f["knn_threshold"]["full"], 3),
        "fit_s": f["fit_s"]} for f, r in zip(folds, full, strict=True)}
    return res


def young_training_precision(params: dict[str, Any], fit_seed: int, seeds: tuple[int, ...], scale: float,
                             cache: Path | None) -> dict[str, Any]:
    """The recipe fitted on `fit_seed` (all families), then per tier and history length m of the run starts
    (`run_prefixes`) of each of `seeds`: confident training calls by the tier's own band (no young-run rule), how
    many were not training, precision. Would a young-run rule for training calls, measured as 5.1's is for
    not_training, hold back a 1-2-window run's training call?"""
    entries, truth = _entries(fit_seed, scale, cache)
    ds = _recipe_data(dataset_from_entries(entries, truth, "", fit_seed, HISTORIES_PER_WORKLOAD), params)
    model = build_model({k: v for k, v in params.items() if k not in (YOUNG, TWINS)})
    model.fit(ds.histories, ds.y, ds.groups, ds.archetypes)
    out: dict[str, Any] = {}
    for seed in seeds:
        e, t = _entries(seed, scale, cache)
        H, y, _ = run_prefixes(_originals(e, t), t)
        X = model.featurizer_.transform(H)
        n = X[:, model.featurizer_.feature_names_out_.index("history_windows")]
        for tier in model.tiers_:
            rows = np.ones(len(X), dtype=bool) if tier == "smi" else model.tier_of(X) == tier
            Xt = model._tier_input(X[rows], tier)
            band = np.array([d["band"] for d in model.assess(Xt, young=np.zeros(len(Xt), dtype=bool))])
            yt, nt = y[rows], n[rows]
            per = {}
            for m in range(1, model.history_k + 1):
                calls = (nt == m) & (band == "training")
                if calls.any():
                    per[str(m)] = {"calls": int(calls.sum()), "not_training": int((yt[calls] == 0).sum()),
                                   "precision": round(float(yt[calls].mean()), 4)}
            out[f"seed{seed}_{tier}"] = per
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipes", default="base,leaves7_min80")
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--train-seed", type=int, default=None,
                    help="fit each fold on this seed's histories of the other families (default: --seed's own)")
    ap.add_argument("--scale", type=float, default=3.0)
    ap.add_argument("--cache", type=Path, default=None, help="simulated dataset and held-out rows per recipe")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--young-precision", action="store_true",
                    help="instead: young_training_precision of each recipe, fitted on --train-seed (default 7), "
                         "scored on the run starts of it and --seed")
    args = ap.parse_args()
    if args.young_precision:
        fit_seed = 7 if args.train_seed is None else args.train_seed
        res = {"date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"), "commit": _commit(),
               "command": f"nice -n 10 python -m benchmarks.classifier_levers --young-precision --recipes "
                          f"{args.recipes}", "fit_seed": fit_seed,
               "recipes": {name: young_training_precision(RECIPES[name], fit_seed, (fit_seed, args.seed),
                                                          args.scale, args.cache)
                           for name in args.recipes.split(",") if name}}
        data = json.loads(args.out.read_text()) if args.out.is_file() else {}
        data["young_training_precision"] = res
        args.out.write_text(json.dumps(data, indent=1) + "\n")
        print(json.dumps(res))
        return
    entries, truth = _entries(args.seed, args.scale, args.cache)
    ds = dataset_from_entries(entries, truth, "", args.seed, HISTORIES_PER_WORKLOAD)
    train_ds = None
    if args.train_seed is not None and args.train_seed != args.seed:
        entries, truth = _entries(args.train_seed, args.scale, args.cache)
        train_ds = dataset_from_entries(entries, truth, "", args.train_seed, HISTORIES_PER_WORKLOAD)
    prefixes = run_prefixes(_originals(entries, truth), truth)
    family = {w: str(t.get("source_family")) for w, t in truth.items()}
    split = f"seed{args.seed}" if train_ds is None else f"train{args.train_seed}_test{args.seed}"
    block: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"), "commit": _commit(),
        "command": f"nice -n 10 python -m benchmarks.classifier_levers --recipes {args.recipes}"
                   + (f" --train-seed {args.train_seed}" if train_ds is not None else ""),
        "what": f"leave-one-family-out on the eval scenario seed {args.seed} scale {args.scale} (today's detect-stage "
                "histories), full-DCGM rows, uncertain = miss; gates applied to each fold's verdicts"
                + (f"; each fold fitted on seed {args.train_seed}'s other families" if train_ds is not None else
                   " (pipeline.model_eval.loso_simulated's split)"),
        "recipes": {},
    }
    for name in (r for r in args.recipes.split(",") if r):
        path = args.cache / f"levers-{name}-{split}-{args.scale}.pkl" if args.cache else None
        if path and path.is_file():
            folds = pickle.loads(path.read_bytes())  # written by this script into a folder the caller chose
        else:
            rd = None if train_ds is None else _recipe_data(train_ds, RECIPES[name])
            folds = fold_rows(_recipe_data(ds, RECIPES[name]), RECIPES[name], prefixes, family, rd)
            if path:
                path.write_bytes(pickle.dumps(folds))
        block["recipes"][name] = {"params": dict(RECIPES[name]), **figures(folds),
                                  "min_history_windows": [f.get("min_history_windows") for f in folds]}
        print(name, json.dumps({k: block["recipes"][name][k] for k in ("shipped", "no_guard")}), flush=True)
        data = json.loads(args.out.read_text()) if args.out.is_file() else {}
        data.setdefault("levers", {})[split] = block
        args.out.write_text(json.dumps(data, indent=1) + "\n")


if __name__ == "__main__":
    main()
