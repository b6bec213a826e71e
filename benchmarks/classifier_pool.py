"""Leave-one-family-out full-DCGM F1 (issue 14's simulator target, ">= 0.97 kept") with training pooled over
simulation seeds, as version 6.3 is trained (pipeline/model_train.py TRAIN_SEEDS).

For each source family, one model is fitted on the other families of every seed in `--train` and scores that
family's histories of every seed in `--seeds` (scored as `benchmarks.classifier_levers` scores: the model's own
bands, `uncertain` a miss; figures per seed). With `--seeds 11 --train 11` it is the levers' single-seed split (seed
11: 0.951, the figure 6.0-6.2 quoted).

    nice -n 5 python -m benchmarks.classifier_pool [--seeds 11,7,1,2] [--train 11,7,1,2] [--recipe shipped|6.2]
        [--cache DIR] [--out benchmarks/results/classifier_lofo.json]

Results under `pooled_seeds.<recipe>` of the output, with the commit and date. ~25 min on the shared 2-core host
(four simulations of the eval scenario at scale 3, 3-8 min each; 4 fits of ~5,000 histories, 50-110 s each). Each
scored seed's histories are also scored as nvidia-smi sends them (profiling fields hidden: `smi_only`, every row).
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
from benchmarks.classifier_levers import figures
from pipeline.model_eval import _fold_plan, _smi_view, binary_metrics
from pipeline.model_train import (
    HISTORIES_PER_WORKLOAD,
    TRAIN_SCENARIO,
    Dataset,
    build_model,
    dataset_from_entries,
    simulated_entries,
)

#: Recipes: parameter changes over the shipped one. "6.2": the kind support on the nvidia-smi tier's training calls
#: only, as 6.2 shipped it.
RECIPES: dict[str, dict[str, Any]] = {"shipped": {}, "6.2": {"kind_bands": ("not_training", "smi:training")}}


def seed_dataset(seed: int, cache: Path | None) -> Dataset:
    path = cache / f"pool-ds-{seed}.pkl" if cache else None
    if path and path.is_file():
        return pickle.loads(path.read_bytes())  # written by this script into a folder the caller chose
    entries, truth, digest = simulated_entries("eval", seed, **TRAIN_SCENARIO)
    ds = dataset_from_entries(entries, truth, digest, seed, HISTORIES_PER_WORKLOAD)
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(pickle.dumps(ds))
    return ds


def pooled_folds(dss: dict[int, Dataset], seeds: list[int], train: list[int],
                 params: dict[str, Any]) -> dict[int, list[dict[str, Any]]]:
    """Per scored seed, the held-out rows of each fold in `classifier_levers.fold_rows`' form."""
    pool = Dataset.pooled([(f"{s}:", dss[s]) for s in train])
    folds: dict[int, list[dict[str, Any]]] = {s: [] for s in seeds}
    for held in _fold_plan(dss[seeds[0]].groups, 8):
        t0 = time.perf_counter()
        tr = pool.subset(~np.isin(pool.groups, held))
        model = build_model(params).fit(tr.histories, tr.y, tr.groups, tr.archetypes)
        fit_s = round(time.perf_counter() - t0, 1)
        for s in seeds:
            ds = dss[s]
            test = np.isin(ds.groups, held)
            X = model.featurizer_.transform([ds.histories[i] for i in np.flatnonzero(test)])
            a = model.assess(X)
            smi = [d["band"] for d in model.assess(_smi_view(model, X))]  # every row as nvidia-smi sends it
            folds[s].append({"smi_band": np.array(smi),
                "held_out": held, "y": ds.y[test], "archetypes": ds.archetypes[test], "workloads": ds.workloads[test],
                "tier": np.array([d["tier"] for d in a]), "p": np.array([d["p"] for d in a]),
                "band": np.array([d["band"] for d in a]), "reasons": [d["reasons"] for d in a],
                "knn": np.full(len(a), np.nan), "env": np.zeros(len(a), dtype=bool),
                "cuts": {t: (float(m.t_low_), float(m.t_high_)) for t, m in model.tiers_.items()},
                "knn_threshold": {t: float(g.threshold_) for t, g in model.guards_.items()}, "fit_s": fit_s})
        print("fold", held, fit_s, "s", flush=True)
    return folds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="11,7,1,2")
    ap.add_argument("--train", default="11,7,1,2")
    ap.add_argument("--recipe", default="shipped", choices=sorted(RECIPES))
    ap.add_argument("--cache", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    seeds, train = [int(s) for s in args.seeds.split(",")], [int(s) for s in args.train.split(",")]
    dss = {s: seed_dataset(s, args.cache) for s in dict.fromkeys(seeds + train)}
    folds = pooled_folds(dss, seeds, train, RECIPES[args.recipe])
    per_seed = {}
    for s in seeds:
        f = figures(folds[s])  # knn_x* / no_guard there read the guard's parts, not kept here: the bands only
        y, smi = np.concatenate([x["y"] for x in folds[s]]), np.concatenate([x["smi_band"] for x in folds[s]])
        per_seed[str(s)] = {"shipped": f["shipped"], "shipped_f1_bootstrap_95": f["shipped_f1_bootstrap_95"],
                            "per_fold": f["per_fold"], "smi_only": {
                                **binary_metrics(y, smi == "training"), "uncertain": round(float(np.mean(
                                    smi == "uncertain")), 4),
                                "training_called_not_training": int(((y == 1) & (smi == "not_training")).sum())}}
        print(f"seed {s}: F1 {f['shipped']['f1']} (uncertain {f['shipped']['uncertain']}, training called "
              f"not_training {f['shipped']['training_called_not_training']}); nvidia-smi only: F1 "
              f"{per_seed[str(s)]['smi_only']['f1']}, training called not_training "
              f"{per_seed[str(s)]['smi_only']['training_called_not_training']}", flush=True)
    mean = round(float(np.mean([v["shipped"]["f1"] for v in per_seed.values()])), 4)
    print("mean F1", mean)
    data = json.loads(args.out.read_text()) if args.out.is_file() else {}
    data.setdefault("pooled_seeds", {})[args.recipe] = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"), "commit": _commit(),
        "command": f"nice -n 5 python -m benchmarks.classifier_pool --seeds {args.seeds} --train {args.train} "
                   f"--recipe {args.recipe}",
        "params": {k: list(v) if isinstance(v, tuple) else v for k, v in RECIPES[args.recipe].items()},
        "seeds": seeds, "train": train, "mean_f1": mean, "per_seed": per_seed}
    args.out.write_text(json.dumps(data, indent=1) + "\n")


if __name__ == "__main__":
    main()
