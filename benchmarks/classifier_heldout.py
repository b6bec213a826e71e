"""Families held out whole, re-measured on the code as it is (issue 14: "flags what the model has not seen
without losing the covered F1").

For each family of `pipeline.model_eval.HELDOUT_FAMILIES` (archetype or archetype:variant): the shipped recipe
(`build_model()`: version 5's estimator and settings) fitted on the training seed's eval scenario without the
family, scored on the evaluation seed's histories of it (as sent and nvidia-smi only: how often the
out-of-distribution guard flags it, confidently right / wrong, uncertain), and on the evaluation seed's other
histories (known kinds, full DCGM): the share the guard flags; F1 with `uncertain` as a miss, with the guard and
with it switched off (a flagged history gets the band its P gives), as `pipeline.model_eval.heldout_families`
reports it; and the covered F1 (F1 over the confident verdicts only, which are in distribution by construction)
with its coverage, with and without the guard.

The histories are the ones `HistoryBuilder` builds now (the detect stage's own, settled windows), so this is version
5's recipe refitted per family on today's histories, not the shipped artifact (which has seen every family).
Results go, with commit and date, under `heldout_families` of the results file (written after every family, so a
run cut short keeps what it measured; `complete` says whether all were done).

    nice -n 10 .venv/bin/python -m benchmarks.classifier_heldout [--families a,b] [--recipe NAME] [--out FILE]

`--loso` instead runs `pipeline.model_eval.loso_simulated` with the recipe (the table "seed 11, each source family
held out whole" of the model card: as sent, full DCGM, nvidia-smi only), under `loso_<recipe>`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import pickle
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np

import pipeline
from pipeline.model_eval import HELDOUT_FAMILIES, _outcomes, _smi_view, binary_metrics, loso_simulated
from pipeline.model_train import TRAIN_SCENARIO, Dataset, build_model, simulated_dataset

RESULTS = Path(__file__).resolve().parent / "results" / "classifier_lofo.json"


def _commit() -> str:
    """The commit of the code actually imported (it may be a worktree of a committed tree)."""
    root = Path(pipeline.__file__).resolve().parent.parent
    head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
    dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, check=True).stdout.strip()
    return head.stdout.strip() + ("+dirty" if dirty else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", default=",".join(HELDOUT_FAMILIES), help="comma-separated families")
    ap.add_argument("--scale", type=float, default=3.0)
    ap.add_argument("--train-seed", type=int, default=7)
    ap.add_argument("--test-seed", type=int, default=11)
    ap.add_argument("--cache", type=Path, default=None, help="keep the simulated datasets here (pickle) for reruns")
    ap.add_argument("--out", type=Path, default=RESULTS, help="results JSON (its other keys are kept)")
    ap.add_argument("--recipe", default="base", help="a recipe of benchmarks/classifier_levers.py (base: the shipped "
                    "one, written under heldout_families; another under heldout_families_<recipe>)")
    ap.add_argument("--loso", action="store_true", help="instead: leave-one-family-out on the test seed "
                    "(pipeline.model_eval.loso_simulated: as sent, full DCGM, nvidia-smi only), under loso_<recipe>")
    args = ap.parse_args()
    from benchmarks.classifier_levers import RECIPES  # (it imports this module)

    params = RECIPES[args.recipe]
    key = "heldout_families" if args.recipe == "base" else f"heldout_families_{args.recipe}"
    fams = tuple(f for f in args.families.split(",") if f)
    t0 = time.perf_counter()
    if args.loso:
        _loso(args, params, t0)
        return
    train, test = (_dataset(seed, args.scale, args.cache) for seed in (args.train_seed, args.test_seed))
    block: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"), "commit": _commit(),
        "what": "the shipped recipe (build_model(), shipped settings, kind support on the kinds present) refitted "
                "per held-out family on the eval "
                f"scenario seed {args.train_seed} without it, scored on seed {args.test_seed} (scale {args.scale}); "
                "histories from HistoryBuilder driving the detect stage (settled windows); not the shipped artifact",
        "command": "nice -n 10 python -m benchmarks.classifier_heldout"
                   + ("" if args.recipe == "base" else f" --recipe {args.recipe}"),
        "recipe": args.recipe, "params": {k: list(v) if isinstance(v, tuple) else v for k, v in params.items()},
        "simulate_s": round(time.perf_counter() - t0, 1),
        "families": {}, "complete": False,
    }
    for fam in fams:
        t1 = time.perf_counter()
        res = heldout_family(train, test, fam, fams, params)
        block["families"][fam] = {**res, "elapsed_s": round(time.perf_counter() - t1, 1)}
        _write(args.out, key, block)
        print(f"{fam}: {json.dumps(block['families'][fam])}", flush=True)
    block["complete"] = True
    block["elapsed_s"] = round(time.perf_counter() - t0, 1)
    _write(args.out, key, block)


def _loso(args: argparse.Namespace, params: dict[str, Any], t0: float) -> None:
    """`loso_simulated` with the recipe on the test seed's histories: every source family held out in turn."""
    res = loso_simulated(_dataset(args.test_seed, args.scale, args.cache), params)
    block = {"date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"), "commit": _commit(),
             "command": f"nice -n 10 python -m benchmarks.classifier_heldout --loso --recipe {args.recipe}",
             "recipe": args.recipe, "params": {k: list(v) if isinstance(v, tuple) else v for k, v in params.items()},
             "seed": args.test_seed, "scale": args.scale,
             **{k: {"confident": res[k]["confident"], "stakes": res[k]["stakes"], "confusion": res[k]["confusion"]}
                for k in ("as_sent", "full_dcgm", "smi_only")},
             "elapsed_s": round(time.perf_counter() - t0, 1)}
    _write(args.out, f"loso_{args.recipe}", block)
    print(json.dumps({k: block[k]["confident"] for k in ("as_sent", "full_dcgm", "smi_only")}), flush=True)


def _dataset(seed: int, scale: float, cache: Path | None) -> Dataset:
    """The eval scenario's histories; with `cache`, pickled there once (simulating is most of the run's time)."""
    path = cache / f"eval-{seed}-{scale}-twins.pkl" if cache else None
    if path and path.is_file():
        return pickle.loads(path.read_bytes())  # written by this script into a folder the caller chose
    ds = simulated_dataset("eval", seed, scale=scale, coarse_twins=TRAIN_SCENARIO["coarse_twins"])
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(pickle.dumps(ds))
    return ds


def heldout_family(train: Dataset, test: Dataset, fam: str, fams: tuple[str, ...],
                   params: dict[str, Any] | None = None) -> dict[str, Any]:
    """`fam` held out of `train` (its base archetype stays when a variant is held out); scored on `test`'s histories
    of it and on `test`'s known kinds (none of `fams`), full DCGM, as pipeline.model_eval.heldout_families does,
    plus the covered F1 with and without the guard."""
    tr = train.subset(train.archetypes != fam)
    te_m = (test.archetypes == fam) & test.scored
    model = build_model(params).fit(tr.histories, tr.y, tr.groups, tr.archetypes)
    f = model.featurizer_
    X = f.transform([test.histories[i] for i in np.flatnonzero(te_m)])
    known = ~te_m & ~np.isin(test.archetypes, fams) & test.scored
    ak = model.assess(f.transform([test.histories[i] for i in np.flatnonzero(known)]))
    full = np.array([d["tier"] for d in ak]) == "full"
    yk = test.y[known][full]
    ak = [d for d, f_ in zip(ak, full, strict=True) if f_]
    guarded = np.array([d["band"] for d in ak])
    # the guard switched off: a history flagged out of distribution gets the band its P gives in its tier
    no_guard = np.array([d["band"] if d["in_distribution"] or "out_of_distribution" not in d["reasons"]
                         else str(model.tiers_[d["tier"]].band(np.array([d["p"]]))[0]) for d in ak])
    p = np.array([d["p"] for d in ak])

    def covered(bands: np.ndarray) -> dict[str, Any]:
        m = bands != "uncertain"
        return {"coverage": round(float(m.mean()), 4), **binary_metrics(yk[m], bands[m] == "training")}

    return {
        "is_training": bool(test.y[te_m].mean() >= 0.5),
        "held_out_as_sent": _outcomes(test.y[te_m], model.assess(X)),
        "held_out_smi_only": _outcomes(test.y[te_m], model.assess(_smi_view(model, X))),
        "known_full_dcgm": {**binary_metrics(yk, guarded == "training"),
                            "flagged_ood": round(float(np.mean([not d["in_distribution"] for d in ak])), 4),
                            "f1_without_guard": binary_metrics(yk, no_guard == "training")["f1"],
                            "brier": round(float(np.mean((p - yk) ** 2)), 4),
                            "covered_with_guard": covered(guarded), "covered_without_guard": covered(no_guard)},
    }


def _write(path: Path, key: str, block: dict[str, Any]) -> None:
    data = json.loads(path.read_text()) if path.is_file() else {}
    data[key] = block
    path.write_text(json.dumps(data, indent=1) + "\n")


if __name__ == "__main__":
    main()
