"""Evaluation of the workload classifier (`trainwatch model evaluate`).

- Simulated data, leave-one-source-out: each fold holds out whole `source_family` groups (one family at a time
  when there are few, else GroupKFold over families), trains on the rest, and scores the held-out histories
  twice: as sent (full DCGM where the node had it) and as an nvidia-smi-only provider would have sent them.
- Real data, never trained on: the project's H200 captures (data/gpu_capture_h200: train, LoRA, serving, batch
  inference, FP64 HPC, idle with their ground truth; data/gpu_capture_h200_b, the same run again and held out:
  nothing is tuned on it), each its own set, as sent with its profiling fields and stripped to nvidia-smi
  level, judged run by run through `predict` exactly as `trainwatch classify` does (`capture_eval`); the
  MIGProfiler A100 runs, scored by a model trained on all simulated data; the
  same simulated data seen only through the fields the traces carry (what a sim-trained model would say without
  the guard); and checks inside MIGProfiler that hold out one A100 variant at a time (a refit classifier, and
  whether any run-level signal - GRACT level, GRACT spread, FB occupancy - transfers across the two sources).

Every figure comes with n, coverage (share of confident calls), the uncertain share, Brier score and a
reliability table. "Positive" means a confident `training` band: an uncertain verdict is *not* a catch, so
recall and F1 are charged for uncertainty; the same figures over p >= 0.5 are given beside them.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.base import clone
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from detectors.classifier import GbmWorkloadClassifier
from pipeline.gpu_capture import CAPTURE_DIR, CAPTURES, capture_dataset, capture_entries, truth
from pipeline.model_train import GBM, TIER, Dataset, build_model

RELIABILITY_BINS = 10


def _safe_div(a: float, b: float) -> float | None:
    return round(a / b, 4) if b else None


def binary_metrics(y: np.ndarray, positive: np.ndarray) -> dict[str, Any]:
    tp = int((positive & (y == 1)).sum())
    fp = int((positive & (y == 0)).sum())
    fn = int((~positive & (y == 1)).sum())
    tn = int((~positive & (y == 0)).sum())
    prec = _safe_div(tp, tp + fp)
    rec = _safe_div(tp, tp + fn)
    f1 = _safe_div(2 * tp, 2 * tp + fp + fn)
    return {"precision": prec, "recall": rec, "f1": f1, "fpr": _safe_div(fp, fp + tn),
            "tp": tp, "fp": fp, "fn": fn, "tn": tn}


def reliability(p: np.ndarray, y: np.ndarray, bins: int = RELIABILITY_BINS) -> list[dict[str, Any]]:
    edges = np.linspace(0, 1, bins + 1)
    idx = np.clip(np.digitize(p, edges[1:-1]), 0, bins - 1)
    out = []
    for b in range(bins):
        m = idx == b
        if m.any():
            out.append({"bin": f"{edges[b]:.1f}-{edges[b + 1]:.1f}", "n": int(m.sum()),
                        "mean_p": round(float(p[m].mean()), 4), "observed": round(float(y[m].mean()), 4)})
    return out


def stakes(y: np.ndarray, band: np.ndarray) -> dict[str, Any]:
    """The figures issue 14 sets targets on (real traces: training called not_training <= 5 %, confident-training
    precision >= 0.95 with FPR <= 2 %, the rest uncertain); y 1 = training."""
    return {
        "training_called_not_training": _safe_div(int(((y == 1) & (band == "not_training")).sum()),
                                                  int((y == 1).sum())),
        "confident_training_precision": _safe_div(int(((y == 1) & (band == "training")).sum()),
                                                  int((band == "training").sum())),
        "fpr": _safe_div(int(((y == 0) & (band == "training")).sum()), int((y == 0).sum())),
        "uncertain_share": round(float((band == "uncertain").mean()), 4),
    }


def score_block(y: np.ndarray, p: np.ndarray, band: np.ndarray, archetypes: np.ndarray) -> dict[str, Any]:
    """Every figure for one set of verdicts."""
    n = len(y)
    if n == 0:
        return {"n": 0}
    confident = band != "uncertain"
    res: dict[str, Any] = {
        "n": n,
        "positives": int(y.sum()),
        "coverage": round(float(confident.mean()), 4),
        "uncertain_share": round(float((~confident).mean()), 4),
        "confident": binary_metrics(y, band == "training"),
        "p_ge_0_5": binary_metrics(y, p >= 0.5),
        "on_covered": binary_metrics(y[confident], band[confident] == "training") if confident.any() else None,
        "brier": round(float(np.mean((p - y) ** 2)), 4),
        "auc": round(float(roc_auc_score(y, p)), 4) if 0 < y.sum() < n else None,
        "confusion": {
            truth: {b: int(((y == tv) & (band == b)).sum()) for b in ("training", "uncertain", "not_training")}
            for truth, tv in (("training", 1), ("not_training", 0))
        },
        "reliability": reliability(p, y),
        "stakes": stakes(y, band),
    }
    per: dict[str, Any] = {}
    for a in sorted(set(archetypes.tolist())):
        m = archetypes == a
        per[a] = {
            "n": int(m.sum()),
            "is_training": bool(y[m].mean() >= 0.5),
            "called_training": round(float((band[m] == "training").mean()), 4),
            "uncertain": round(float((band[m] == "uncertain").mean()), 4),
            "called_not_training": round(float((band[m] == "not_training").mean()), 4),
            "mean_p": round(float(p[m].mean()), 4),
        }
    res["per_archetype"] = per
    return res


def _smi_view(model: GbmWorkloadClassifier, X: np.ndarray) -> np.ndarray:
    Xs = X.copy()
    Xs[:, model.featurizer_.dcgm_columns_] = np.nan
    return Xs


def _fold_plan(groups: np.ndarray, max_folds: int) -> list[list[str]]:
    fams = sorted(set(groups.tolist()))
    if len(fams) <= max_folds:
        return [[f] for f in fams]
    # More families than folds: deal them round robin into max_folds held-out sets (still whole families).
    plan: list[list[str]] = [[] for _ in range(max_folds)]
    for i, f in enumerate(fams):
        plan[i % max_folds].append(f)
    return plan


def loso_simulated(ds: Dataset, params: dict[str, Any] | None = None, max_folds: int = 8) -> dict[str, Any]:
    """Leave-one-source-out over source families. Returns figures per tier, overall and per archetype. Twins
    (`Dataset.twin`) are trained on with their family, never scored."""
    n = len(ds.y)
    p_full, b_full, t_full = np.full(n, np.nan), np.full(n, "uncertain", dtype=object), np.full(n, "", dtype=object)
    p_smi, b_smi = np.full(n, np.nan), np.full(n, "uncertain", dtype=object)
    folds = []
    for held in _fold_plan(ds.groups, max_folds):
        train = ds.subset(~np.isin(ds.groups, held))  # the other families' coarse twins train too
        test = np.isin(ds.groups, held) & ds.scored
        if len(set(train.y.tolist())) < 2:
            continue
        model = build_model(params).fit(train.histories, train.y, train.groups, train.archetypes)
        X = model.featurizer_.transform([ds.histories[i] for i in np.flatnonzero(test)])
        p, b, t = model.score_matrix(X)
        p_full[test], b_full[test], t_full[test] = p, b, t
        ps, bs, _ = model.score_matrix(_smi_view(model, X))
        p_smi[test], b_smi[test] = ps, bs
        folds.append({"held_out": held, "n": int(test.sum())})
    done = ~np.isnan(p_full)
    full_rows = done & (t_full == "full")
    out = {
        "folds": folds,
        "as_sent": score_block(ds.y[done], p_full[done], b_full[done].astype(str), ds.archetypes[done]),
        "full_dcgm": score_block(ds.y[full_rows], p_full[full_rows], b_full[full_rows].astype(str),
                                 ds.archetypes[full_rows]),
        "smi_only": score_block(ds.y[done], p_smi[done], b_smi[done].astype(str), ds.archetypes[done]),
    }
    seed_of = np.array([w.split(":", 1)[0] if ":" in w else "" for w in ds.workloads.astype(str)])
    if len(set(seed_of.tolist())) > 1:  # a pool of seeds (model_train.simulated_pool): the figure per seed too
        out["full_dcgm_per_seed"] = {s: binary_metrics(ds.y[r], b_full[r] == "training") for s in sorted(set(
            seed_of.tolist())) if (r := full_rows & (seed_of == s)).any()}
    return out


#: Families held out whole to test the abstention: the realism variants (pipeline/simulator/workload.py VARIANTS)
#: and one archetype each side that nothing else resembles closely.
HELDOUT_FAMILIES = ("finetune_lora:input_bound", "pretrain:stalled", "serving:busy_flat", "serving:low_load",
                    "hpc_fp64:training_like", "batch_inference:memory_bound", "mining", "finetune_lora")


def _outcomes(y: np.ndarray, a: list[dict[str, Any]]) -> dict[str, Any]:
    band = np.array([d["band"] for d in a])
    ood = np.array([not d["in_distribution"] for d in a])
    right = np.where(y == 1, band == "training", band == "not_training")
    wrong = np.where(y == 1, band == "not_training", band == "training")
    return {"n": len(a), "confidently_right": round(float(right.mean()), 4),
            "confidently_wrong": round(float(wrong.mean()), 4),
            "uncertain": round(float((band == "uncertain").mean()), 4), "flagged_ood": round(float(ood.mean()), 4)}


def heldout_families(train: Dataset, test: Dataset, families: tuple[str, ...] = HELDOUT_FAMILIES,
                     params: dict[str, Any] | None = None) -> dict[str, Any]:
    """Each family (archetype or archetype:variant) held out whole: fit on `train` without it (its base archetype
    stays when a variant is held out), score `test`'s histories of it, as sent and nvidia-smi only. Beside them
    the same model on `test`'s other histories (seen kinds of work), whose covered F1 must hold: the abstention
    must flag what is new without flagging what is known."""
    out: dict[str, Any] = {}
    for fam in families:
        tr = train.subset(train.archetypes != fam)
        te_m = (test.archetypes == fam) & test.scored
        if not te_m.any() or len(set(tr.y.tolist())) < 2:
            continue
        model = build_model(params).fit(tr.histories, tr.y, tr.groups, tr.archetypes)
        f = model.featurizer_
        X = f.transform([test.histories[i] for i in np.flatnonzero(te_m)])
        Xs = _smi_view(model, X)
        known = ~te_m & ~np.isin(test.archetypes, families) & test.scored
        Xk = f.transform([test.histories[i] for i in np.flatnonzero(known)])
        ak = model.assess(Xk)
        bk = np.array([d["band"] for d in ak])
        pk = np.array([d["p"] for d in ak])
        tk = np.array([d["tier"] for d in ak])
        yk = test.y[known]
        full = tk == "full"
        guard_off = np.array([d["band"] if d["in_distribution"] or "out_of_distribution" not in d["reasons"]
                              else str(model.tiers_[d["tier"]].band(np.array([d["p"]]))[0]) for d in ak])
        out[fam] = {
            "is_training": bool(test.y[te_m].mean() >= 0.5),
            "held_out_as_sent": _outcomes(test.y[te_m], model.assess(X)),
            "held_out_smi_only": _outcomes(test.y[te_m], model.assess(Xs)),
            "known_full_dcgm": {**binary_metrics(yk[full], bk[full] == "training"),
                                "flagged_ood": round(float(np.mean([not d["in_distribution"] for d, f_ in
                                                                    zip(ak, full, strict=True) if f_])), 4),
                                "f1_without_guard": binary_metrics(yk[full], guard_off[full] == "training")["f1"],
                                "brier": round(float(np.mean((pk[full] - yk[full]) ** 2)), 4)},
        }
    return out


def score_dataset(model: GbmWorkloadClassifier, ds: Dataset) -> dict[str, Any]:
    X = model.featurizer_.transform(ds.histories)
    p, b, t = model.score_matrix(X)
    res = score_block(ds.y, p, b, ds.archetypes)
    res["tiers_used"] = {str(k): int(v) for k, v in zip(*np.unique(t, return_counts=True), strict=True)}
    return res


def verdict_block(model: Any, ds: Dataset) -> dict[str, Any]:
    """Score whole runs through the classifier's `predict` (the path `trainwatch classify` takes: parts, missing
    fields filled from the reference rows, the guard), with every run's verdict listed."""
    verdicts = [model.predict(h) for h in ds.histories]
    p = np.array([v.p_training for v in verdicts])
    band = np.array([v.band for v in verdicts]).astype(str)
    res = score_block(ds.y, p, band, ds.archetypes)
    res["runs"] = [{"workload": str(w), "archetype": str(a), "is_training": bool(y), "windows": len(h),
                    "p_training": v.p_training, "p_low": v.p_low, "p_high": v.p_high, "band": v.band,
                    "tier": v.model_id.rsplit("/", 1)[-1], "reasons": list(v.reasons),
                    "out_features": list(v.out_features), "missing": list(v.missing)}
                   for w, a, y, h, v in zip(ds.workloads, ds.archetypes, ds.y, ds.histories, verdicts, strict=True)]
    return res


#: The capture's variants: the tier a provider would send, and which DCGM reading of the tensor pipe
#: (pipeline/gpu_capture.py: `any` counts the FP64 DFMA pipe as tensor activity, `hmma` does not).
CAPTURE_SETS = {"full": {"tier": "full", "tensor": "any"}, "smi_only": {"tier": "smi", "tensor": "any"},
                "full_hmma_tensor": {"tier": "full", "tensor": "hmma"}}


def capture_eval(model: Any, folder: Path = CAPTURE_DIR) -> dict[str, Any]:
    """The real H200 capture, one verdict per workload run, per variant (CAPTURE_SETS)."""
    out: dict[str, Any] = {}
    for name, kw in CAPTURE_SETS.items():
        ds = capture_dataset(folder, **kw)  # type: ignore[arg-type]
        if ds is None:
            print(f"GPU capture not found: {folder}/samples.jsonl does not exist; its figures are skipped",
                  file=sys.stderr)  # a real set is never skipped silently
            return {"skipped": f"{folder}/samples.jsonl not found"}
        out[name] = verdict_block(model, ds)
    return out


#: The capture variants the compute estimate is checked on: profiling fields (tensor_active basis), the same with
#: the run's precision reported (bf16: the point at the BF16 peak, no FP8 high end), and nvidia-smi only
#: (utilisation / power basis). The runs with a model-FLOP truth that the estimate targets: train and LoRA.
COMPUTE_SETS = {"full": {"tier": "full"}, "full_precision_bf16": {"tier": "full", "precision": "bf16"},
                "smi_only": {"tier": "smi"}}
COMPUTE_TRUTH_RUNS = ("h200-train", "h200-lora")


def compute_vs_truth(folder: Path = CAPTURE_DIR) -> dict[str, Any]:
    """The compute estimate the windows carry (detectors/compute.py through the ingest stage: FLOP point, low, high
    and basis, summed over a run's windows) against the manifest's model FLOP, per capture variant and run, as
    ratios estimate / truth. A model-FLOP truth counts the model's matmul work (3 x forward per token for training,
    2 x for LoRA's frozen base: no recomputation, no optimizer); the estimate counts tensor-pipe time at peak."""
    if not (folder / "samples.jsonl").is_file():
        return {"skipped": f"{folder}/samples.jsonl not found"}
    t = truth(folder)
    out: dict[str, Any] = {}
    for name, kw in COMPUTE_SETS.items():
        _, windows = capture_entries(folder, tier=kw["tier"], precision=kw.get("precision"),  # type: ignore[arg-type]
                                     keep_windows=True)
        runs: dict[str, Any] = {}
        for w, tr in sorted(t.items()):
            ws = [v for (wid, _), v in windows.items() if wid == w]
            point, low, high = (sum(getattr(v, a) for v in ws) for a in ("flop", "flop_low", "flop_high"))
            bases = sorted({v.basis for v in ws})
            r: dict[str, Any] = {"label": tr["label"], "truth_flop": tr["model_flop"], "flop": point,
                                 "flop_low": low, "flop_high": high, "basis": bases[0] if len(bases) == 1 else bases,
                                 "windows": len(ws), "device_seconds": round(sum(v.device_seconds for v in ws), 2)}
            if tr["model_flop"] > 0:
                r.update({"ratio": round(point / tr["model_flop"], 3),
                          "band_ratio": [round(low / tr["model_flop"], 3), round(high / tr["model_flop"], 3)],
                          "truth_inside_band": bool(low <= tr["model_flop"] <= high)})
            runs[w] = r
        out[name] = runs
    return out


def migprofiler_cross_hardware(mig: Dataset, params: dict[str, Any] | None = None) -> dict[str, Any]:
    """Inside the real data, hold out one A100 variant at a time (each has training and inference runs)."""
    hw = np.array(["80g" if "80g" in a else "40g" for a in mig.archetypes])
    out: dict[str, Any] = {}
    small = {**(params or {}), f"{GBM}min_samples_leaf": 10, f"{TIER}cv_folds": 3}
    for held in ("80g", "40g"):
        tr, te = mig.subset(hw != held), mig.subset(hw == held)
        # groups inside the training half: the four (label, hardware) files would each be one class; use runs.
        model = build_model(small).fit(tr.histories, tr.y, np.arange(len(tr.y)))
        out[f"held_out_A100_{held}"] = score_dataset(model, te)
    return out


def migprofiler_sim_real_fields(model: GbmWorkloadClassifier, sim: Dataset, mig: Dataset,
                                params: dict[str, Any] | None = None) -> dict[str, Any]:
    """Simulated data seen only through the columns the real traces fill (GRACT, FB used, scale, duration), fitted
    and calibrated like a tier and scored on the real runs without the no-utilisation/power guard: what the
    simulator teaches about such traces."""
    f = model.featurizer_
    Xm = f.transform(mig.histories)
    keep = (~np.isnan(Xm)).any(axis=0)
    Xs = f.transform(sim.histories)
    gract = f.feature_names_out_.index("mean_gr_engine__mean")
    rows = ~np.isnan(Xs[:, gract])  # histories whose provider sent GRACT (the full-tier rows)
    tm = clone(build_model(params).estimator).fit(Xs[rows][:, keep], sim.y[rows], sim.groups[rows])
    p = tm.predict_proba(Xm[:, keep])
    res = score_block(mig.y, p, tm.band(p).astype(str), mig.archetypes)
    res["columns"] = [c for c, k in zip(f.feature_names_out_, keep, strict=True) if k]
    res["bands"] = {"t_low": round(float(tm.t_low_), 4), "t_high": round(float(tm.t_high_), 4)}
    return res


#: Run-level signals the MIGProfiler traces carry (featurizer columns: whole-run means of per-window features).
RUN_SIGNALS = {"fb_occupancy": "mean_fb_used__mean", "gract_level": "mean_gr_engine__mean",
               "gract_spread": "std_gr_engine__mean"}


def migprofiler_signal_transfer(model: GbmWorkloadClassifier, mig: Dataset, max_fpr: float = 0.05) -> dict[str, Any]:
    """Is there a signal in GRACT + FB that transfers between the two MIGProfiler sources? Per held-out A100
    variant: each run-level signal (and a logistic regression on all of them) gets its direction and threshold
    from the other variant (threshold = the score its inference runs exceed at most `max_fpr` of the time), then
    recall and FPR on the held-out variant, with the held-out AUC (direction fixed by the other variant)."""
    names = model.featurizer_.feature_names_out_
    Z = model.featurizer_.transform(mig.histories)[:, [names.index(c) for c in RUN_SIGNALS.values()]]
    hw = np.array(["80g" if "80g" in a else "40g" for a in mig.archetypes])
    out: dict[str, Any] = {}
    for held in ("80g", "40g"):
        tr, te = (hw != held) & ~np.isnan(Z).any(axis=1), (hw == held) & ~np.isnan(Z).any(axis=1)
        ytr, yte = mig.y[tr], mig.y[te]
        scores: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for j, name in enumerate(RUN_SIGNALS):
            sign = 1.0 if roc_auc_score(ytr, Z[tr, j]) >= 0.5 else -1.0
            scores[name] = (sign * Z[tr, j], sign * Z[te, j])
        mu, sd = Z[tr].mean(axis=0), Z[tr].std(axis=0) + 1e-12
        lr = LogisticRegression().fit((Z[tr] - mu) / sd, ytr)
        scores["logistic_all"] = (lr.decision_function((Z[tr] - mu) / sd), lr.decision_function((Z[te] - mu) / sd))
        block: dict[str, Any] = {"n": int(te.sum()), "positives": int(yte.sum())}
        for name, (s_tr, s_te) in scores.items():
            neg = np.sort(s_tr[ytr == 0])
            t = neg[min(len(neg) - 1, int(np.ceil((1.0 - max_fpr) * len(neg))) - 1)]
            block[name] = {"recall": round(float((s_te[yte == 1] > t).mean()), 4),
                           "fpr": round(float((s_te[yte == 0] > t).mean()), 4),
                           "auc": round(float(roc_auc_score(yte, s_te)), 4)}
        out[f"held_out_A100_{held}"] = block
    return out


def _capture_labels(results: dict[str, Any]) -> list[tuple[str, str]]:
    """(results key, table label) of the real captures present: "H200 capture", "H200 capture B" (held out)."""
    return [(k, "H200 capture" + (" B" if k.endswith("_b") else "")) for k in CAPTURES if k in results]


def summary_rows(results: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(label, block) pairs for the printed table."""
    rows: list[tuple[str, dict[str, Any]]] = []
    sim = results.get("simulated") or {}
    for key in ("as_sent", "full_dcgm", "smi_only"):
        if key in sim and sim[key].get("n"):
            rows.append((f"sim LOSO {key}", sim[key]))
    for cap_key, cap_label in _capture_labels(results):
        for key, block in (results.get(cap_key) or {}).items():
            if isinstance(block, dict) and block.get("n"):
                rows.append((f"{cap_label} {key}", block))
    mig = results.get("migprofiler") or {}
    for key, block in mig.items():
        if key == "signal_transfer":
            continue  # not verdicts: printed as its own table
        if isinstance(block, dict) and block.get("n"):
            rows.append((f"MIGProfiler {key}", block))
        elif isinstance(block, dict):
            for k2, b2 in block.items():
                if isinstance(b2, dict) and b2.get("n"):
                    rows.append((f"MIGProfiler {key} {k2}", b2))
    return rows


def format_table(results: dict[str, Any]) -> str:
    head = f"{'set':44} {'n':>6} {'prec':>6} {'recall':>6} {'F1':>6} {'FPR':>6} {'uncert':>6} {'cover':>6} " \
           f"{'Brier':>6} {'AUC':>6}"
    lines = [head, "-" * len(head)]

    def f(v: Any) -> str:
        return "   -  " if v is None else f"{v:6.3f}"

    for label, b in summary_rows(results):
        c = b["confident"]
        lines.append(f"{label:44} {b['n']:>6} {f(c['precision'])} {f(c['recall'])} {f(c['f1'])} {f(c['fpr'])} "
                     f"{f(b['uncertain_share'])} {f(b['coverage'])} {f(b['brier'])} {f(b.get('auc'))}")
    transfer = (results.get("migprofiler") or {}).get("signal_transfer") or {}
    if transfer:
        lines.append("")
        lines.append("MIGProfiler run-level signals, threshold at <= 5 % FPR on the other A100 variant: "
                     "recall / FPR / AUC on the held-out one")
        for held, block in transfer.items():
            cells = [f"{k} {v['recall']:.2f}/{v['fpr']:.2f}/{v['auc']:.2f}" for k, v in block.items()
                     if isinstance(v, dict)]
            lines.append(f"  {held:20} " + "  ".join(cells))
    lines.append("")
    lines.append("stakes: training called not_training / confident-training precision / FPR / uncertain")
    for label, b in summary_rows(results):
        st = b.get("stakes") or {}
        lines.append(f"  {label:44} {f(st.get('training_called_not_training'))} "
                     f"{f(st.get('confident_training_precision'))} {f(st.get('fpr'))} {f(st.get('uncertain_share'))}")
    for cap_key, cap_label in _capture_labels(results):
        for key, block in (results.get(cap_key) or {}).items():
            if isinstance(block, dict) and block.get("runs"):
                lines.append("")
                lines.append(f"{cap_label} {key}: per run P(training) [p_low, p_high] band (reasons)")
                for r in block["runs"]:
                    rng = "" if r["p_low"] is None else f" [{r['p_low']:.3f}, {r['p_high']:.3f}]"
                    lines.append(f"  {r['archetype']:6} {'train' if r['is_training'] else 'neg  '} "
                                 f"{r['p_training']:.3f}{rng} {r['band']:12} ({', '.join(r['reasons'])})")
    held = results.get("heldout_families") or {}
    if held:
        lines.append("")
        lines.append("families held out whole (as sent | smi only): confidently right / wrong / uncertain / OOD; "
                     "known kinds, full DCGM: F1 with guard (without), OOD share")
        for fam, r in held.items():
            a, m, k = r["held_out_as_sent"], r["held_out_smi_only"], r["known_full_dcgm"]
            lines.append(f"  {fam:30} {'train' if r['is_training'] else 'neg  '} n={a['n']:>4}  "
                         f"{a['confidently_right']:.2f}/{a['confidently_wrong']:.2f}/{a['uncertain']:.2f}/"
                         f"{a['flagged_ood']:.2f} | {m['confidently_right']:.2f}/{m['confidently_wrong']:.2f}/"
                         f"{m['uncertain']:.2f}/{m['flagged_ood']:.2f}   F1 {f(k['f1'])} ({f(k['f1_without_guard'])}) "
                         f"OOD {k['flagged_ood']:.3f}")
    sim = results.get("simulated") or {}
    for key in ("full_dcgm", "smi_only"):
        per = (sim.get(key) or {}).get("per_archetype") or {}
        if per:
            lines.append("")
            lines.append(f"per archetype ({key}): called training / uncertain / called not training")
            for a, r in per.items():
                tag = "train" if r["is_training"] else "neg  "
                lines.append(f"  {a:24} {tag} n={r['n']:>5}  {r['called_training']:.3f} / {r['uncertain']:.3f} / "
                             f"{r['called_not_training']:.3f}")
    return "\n".join(lines)


def group_counts(ds: Dataset) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = defaultdict(dict)
    for g, a in zip(ds.groups, ds.archetypes, strict=True):
        out[str(g)][str(a)] = out[str(g)].get(str(a), 0) + 1
    return dict(out)
