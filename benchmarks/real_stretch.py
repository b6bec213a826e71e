"""The real H200 captures' runs continued to a judgeable length: what the classifier says of real work that lasts.

    python -m benchmarks.real_stretch [--model DIR] [--quick] [--sim-seed 3] [--sim-scale 1.5]
        [--out benchmarks/results/real_stretch.json]

Each capture run lasts 36-85 s: one or two windows, so every verdict on them is a young run's and `short_history`
hides what the model would say of the same work going on for an hour. `pipeline.gpu_capture.stretch_run` plays
each run's steady part forwards and backwards for 20 or 45 minutes, sampled every 1, 10 or 60 s, on 1, 4 or 8
GPUs (each from its own point of the run), with the accelerator named or absent, as sent (GPM profiling fields)
and nvidia-smi only. Each stretched run is judged whole, as `trainwatch classify` does.

Per capture and view: the share of training runs (train, LoRA) called confidently `not_training` (issue 14's worst
error; target <= 5 %), the precision of confident `training` (>= 0.95) and the share of non-training runs (serving,
batch inference, FP64 HPC, idle) called `training` (FPR, <= 2 %), the uncertain share; per run, its bands and P.
Stretching adds no information the run did not have; it removes the young-run shield. The same model is also
scored without the busier-than-training rule (detectors/classifier.py `BUSIER`), under `without_load_check`: what
6.3 said before the rule. Its cost where the truth is known (`simulated_cost`): the eval scenario at a seed no model
is trained on, the not_training calls the rule withdraws per kind of work (training calls cannot move). Ratios, not
timings; ~20 min on the shared 2-core host.
"""

from __future__ import annotations

import argparse
import itertools
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from detectors.model_artifact import load_artifact
from pipeline.gpu_capture import CAPTURES, capture_runs, stretch_run, truth
from pipeline.model_eval import _safe_div, stakes
from pipeline.model_train import histories_from_messages
from pipeline.settings import load_settings
from schemas.serde import dumps

OUT = Path(__file__).resolve().parent / "results" / "real_stretch.json"
VIEWS = {"smi_only": "smi", "full": "full"}
#: (minutes, interval s): 1 s sampling only on the shorter length (the samples, not the answer, grow with it).
LENGTHS = ((20, 1.0), (20, 10.0), (20, 60.0), (45, 10.0), (45, 60.0))
DEVICES = (1, 4, 8)
ACCELERATORS = ("NVIDIA H200", None)


def judge(model: Any, samples: list[dict[str, Any]], workload: str) -> Any:
    hb, dead = histories_from_messages((dumps(s) for s in samples), samples[-1]["ts"] + 3600.0)
    if dead:
        raise ValueError(f"{dead} stretched samples dead-lettered")
    return model.predict(hb.entries[workload])


def set_stakes(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """`model_eval.stakes` of one set's stretched runs, with how many training variants were called training."""
    y = np.array([r["is_training"] for r in rows], dtype=int)
    band = np.array([r["band"] for r in rows])
    return {"n": len(rows), **stakes(y, band),
            "training_called_training": _safe_div(int(((y == 1) & (band == "training")).sum()), int(y.sum()))}


def run(model_dir: Path | None = None, quick: bool = False, load_check: bool = True) -> dict[str, Any]:
    model, meta = load_artifact(model_dir or load_settings().model_path)
    if not load_check:  # the same model without the busier-than-training rule (its effect, in the same run)
        model._withdraw_busier = lambda *a, **k: None
    grid = list(itertools.product(LENGTHS[1:2] if quick else LENGTHS, DEVICES[1:2] if quick else DEVICES,
                                  ACCELERATORS))
    out: dict[str, Any] = {"date": datetime.now(UTC).strftime("%Y-%m-%d"),
                           "model_version": meta.model_version, "grid": {
                               "lengths_min_interval_s": [list(x) for x in LENGTHS], "devices": list(DEVICES),
                               "accelerators": [a or "absent" for a in ACCELERATORS]}, "sets": {}}
    for (cname, folder), (view, tier) in itertools.product(CAPTURES.items(), VIEWS.items()):
        runs, tr = capture_runs(folder, tier=tier), truth(folder)
        rows: list[dict[str, Any]] = []
        for wid, samples in sorted(runs.items()):
            for (minutes, interval), devices, accel in grid:
                v = judge(model, stretch_run(samples, minutes, interval_s=interval, devices=devices,
                                             accelerator=accel, seed=devices), wid)
                rows.append({"workload": wid, "is_training": tr[wid]["is_training"], "minutes": minutes,
                             "interval_s": interval, "devices": devices, "accelerator": accel or "absent",
                             "p": round(v.p_training, 4), "band": v.band, "reasons": list(v.reasons)})
        per_run = {}
        for wid in sorted(runs):
            mine = [r for r in rows if r["workload"] == wid]
            ps = [r["p"] for r in mine]
            per_run[wid] = {"is_training": tr[wid]["is_training"], "bands": dict(Counter(r["band"] for r in mine)),
                            "reasons": dict(Counter(x for r in mine for x in r["reasons"])),
                            "p_median": round(float(np.median(ps)), 4), "p_min": min(ps), "p_max": max(ps)}
        out["sets"][f"{cname}/{view}"] = {"stakes": set_stakes(rows), "per_run": per_run}
    smi_sets = [s["stakes"] for k, s in out["sets"].items() if k.endswith("smi_only")]
    out["figures"] = {f"real_stretch.{k.replace('/', '.')}.{m}": v for k, s in out["sets"].items()
                      for m, v in s["stakes"].items() if m != "n"}
    out["figures"]["real_stretch.smi_worst_training_called_not_training"] = max(
        (s["training_called_not_training"] or 0.0) for s in smi_sets)
    return out


def simulated_cost(model_dir: Path | None = None, seed: int = 3, scale: float = 1.5) -> dict[str, Any]:
    """What the rule costs where the truth is known: the eval scenario at a seed no model is trained on, every
    history judged with and without it. Only not_training calls can move, so recall, precision and F1 of the
    training calls cannot; the figure is the not_training calls withdrawn, per kind of work."""
    from pipeline.model_train import HISTORIES_PER_WORKLOAD, TRAIN_SCENARIO, dataset_from_entries, simulated_entries

    model, _ = load_artifact(model_dir or load_settings().model_path)
    entries, tr, digest = simulated_entries("eval", seed, scale=scale,
                                            **{k: v for k, v in TRAIN_SCENARIO.items() if k != "scale"})
    ds = dataset_from_entries(entries, tr, digest, seed, HISTORIES_PER_WORKLOAD)
    X = model.featurizer_.transform(ds.histories)
    with_rule = [d["band"] for d in model.assess(X)]
    model._withdraw_busier = lambda *a, **k: None
    without = [d["band"] for d in model.assess(X)]
    out: dict[str, Any] = {"seed": seed, "scale": scale, "histories": len(ds.y), "per_kind": {}}
    for kind in sorted(set(ds.archetypes.tolist())):
        idx = np.flatnonzero(ds.archetypes == kind)
        before = sum(without[i] == "not_training" for i in idx)
        after = sum(with_rule[i] == "not_training" for i in idx)
        if before:
            out["per_kind"][kind] = {"n": len(idx), "not_training_before": int(before),
                                     "withdrawn": int(before - after)}
    before = sum(b == "not_training" for b in without)
    out["not_training_calls"] = int(before)
    out["withdrawn"] = int(before - sum(b == "not_training" for b in with_rule))
    out["training_calls_unchanged"] = [b == "training" for b in with_rule] == [b == "training" for b in without]
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, default=None, help="artifact directory (default: the packaged one)")
    ap.add_argument("--quick", action="store_true", help="one length, one device count")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--sim-seed", type=int, default=3, help="eval scenario seed for the simulated cost")
    ap.add_argument("--sim-scale", type=float, default=1.5)
    args = ap.parse_args(argv)
    result = run(args.model, args.quick)
    result["simulated_cost"] = simulated_cost(args.model, args.sim_seed, args.sim_scale)
    result["without_load_check"] = {k: v for k, v in run(args.model, args.quick, load_check=False).items()
                                    if k in ("sets", "figures")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(dumps(result) + b"\n")
    for k, v in result["figures"].items():
        print(f"{k} = {v} (without the load check: {result['without_load_check']['figures'][k]})")
    sc = result["simulated_cost"]
    print(f"simulated (eval seed {sc['seed']}, scale {sc['scale']}): {sc['withdrawn']} of {sc['not_training_calls']} "
          f"not_training calls withdrawn; per kind {sc['per_kind']}")
    for name, s in result["sets"].items():
        for wid, r in s["per_run"].items():
            print(f"{name} {wid}: {r['bands']} P median {r['p_median']} ({r['p_min']}-{r['p_max']})")


if __name__ == "__main__":
    main()
