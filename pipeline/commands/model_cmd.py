"""`trainwatch model train|evaluate`: fit the workload classifier on simulated data and measure it honestly."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import typer

from detectors.model_artifact import load_artifact
from pipeline.gpu_capture import CAPTURES
from pipeline.model_eval import (
    capture_eval,
    format_table,
    heldout_families,
    loso_simulated,
    migprofiler_cross_hardware,
    migprofiler_signal_transfer,
    migprofiler_sim_real_fields,
    score_dataset,
)
from pipeline.model_train import (
    DEFAULT_PARAMS,
    MIGPROFILER_DIR,
    TRAIN_SCENARIO,
    TRAIN_SEEDS,
    dataset_summary,
    migprofiler_dataset,
    simulated_dataset,
    simulated_pool,
    train_and_save,
    train_model,
)
from schemas.serde import dumps

model_app = typer.Typer(help="The workload classifier: train and evaluate.", no_args_is_help=True)


def _seeds(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise typer.BadParameter(f"seeds are whole numbers separated by commas, not {text!r}") from None


@model_app.command("train")
def train(
    out: Path | None = typer.Option(None, "--out", help="artifact directory (default: the packaged one)"),
    seeds: str = typer.Option(",".join(map(str, TRAIN_SEEDS)), help="simulator seeds of the eval scenario, pooled"),
    scenario_scale: float = typer.Option(TRAIN_SCENARIO["scale"], "--scenario-scale",
                                         help="scale of the eval scenario"),
) -> None:
    """Simulate the `eval` scenario at each seed, train on all of it and save a versioned artifact."""
    t0 = time.perf_counter()
    params = {"scale": scenario_scale}
    path, model, ds = train_and_save(out, seeds=_seeds(seeds), scenario_params=params)
    typer.echo(f"trained on {len(ds.y)} histories ({int(ds.y.sum())} training) in {time.perf_counter() - t0:.1f} s")
    for tier, t in model.explain_tiers().items():
        typer.echo(f"  tier {tier:5} bands: not_training <= {t['t_low']:.3f} < uncertain < {t['t_high']:.3f} <= "
                   f"training  (out-of-fold Brier {t['oof_brier']:.3f}, n={t['n_train']})")
    typer.echo(f"artifact: {path}")


def run_evaluation(scenario_scale: float, seeds: tuple[int, ...], mig_dir: Path, model_dir: Path | None,
                   heldout: bool = False, real_only: bool = False) -> dict[str, Any]:
    """All evaluation figures as one JSON-able dict. Leave-one-family-out over the pooled seeds (each fold fitted on
    every seed's other families, as the shipped model is trained on the pool). `real_only`: no simulation, the real
    sets scored with the packaged (or `model_dir`) artifact."""
    results: dict[str, Any] = {}
    ds = None
    twins = TRAIN_SCENARIO["coarse_twins"]  # the folds train as the shipped model does; twins are never scored
    if not real_only:
        ds = simulated_pool("eval", seeds, scale=scenario_scale, coarse_twins=twins)[0]
        results = {"scenario": "eval", "seeds": list(seeds), "scenario_scale": scenario_scale,
                   "data": dataset_summary(ds), "simulated": loso_simulated(ds)}
    if heldout and ds is not None:  # families held out whole: fitted on the training seed without them, scored
        train = simulated_dataset("eval", 7, scale=scenario_scale, coarse_twins=twins)
        results["heldout_families"] = heldout_families(train, ds)
    # The real runs are never trained on: score them with a model fitted on all simulated data.
    model = train_model(ds) if model_dir is None and ds is not None else load_artifact(model_dir)[0]
    for key, folder in CAPTURES.items():  # the first capture and the held-out second one, each its own set
        results[key] = capture_eval(model, folder)
    mig = migprofiler_dataset(mig_dir)
    if mig is None:
        results["migprofiler"] = {"skipped": f"{mig_dir}/sessions_index.csv not found"}
        return results
    hw = np.array(["80g" if "80g" in a else "40g" for a in mig.archetypes])
    results["migprofiler"] = {
        "sim_trained": score_dataset(model, mig),
        "sim_trained_A100_80GB": score_dataset(model, mig.subset(hw == "80g")),
        "sim_trained_A100_40GB": score_dataset(model, mig.subset(hw == "40g")),
    }
    if ds is not None:
        results["migprofiler"].update({
            "sim_trained_real_fields_no_guard": migprofiler_sim_real_fields(model, ds, mig, DEFAULT_PARAMS),
            "cross_hardware": migprofiler_cross_hardware(mig),
            "signal_transfer": migprofiler_signal_transfer(model, mig),
        })
    return results


@model_app.command("evaluate")
def evaluate(
    json_out: bool = typer.Option(False, "--json", help="print the results JSON instead of the table"),
    scenario_scale: float = typer.Option(3.0, "--scenario-scale", help="scale of the simulated eval scenario"),
    seeds: str = typer.Option(",".join(map(str, TRAIN_SEEDS)),
                              help="simulator seeds, pooled (leave-one-family-out: every seed's family held out)"),
    out: Path = typer.Option(Path("var/model_eval.json"), "--out", help="where the results JSON is written"),
    mig_dir: Path = typer.Option(MIGPROFILER_DIR, "--migprofiler", help="MIGProfiler data folder"),
    model_dir: Path | None = typer.Option(None, "--model", help="score real runs with this artifact, not a refit"),
    heldout: bool = typer.Option(False, "--heldout", help="also hold simulated families out whole (slow)"),
    real_only: bool = typer.Option(False, "--real-only", help="only the real sets (H200 captures A, B; MIGProfiler), "
                                   "scored with the packaged artifact or --model: no simulation"),
    labels_from_store: bool = typer.Option(False, "--labels-from-store",
                                           help="instead: precision per detector and classifier band from analysts' "
                                           "labels in the store, and the labelled runs' windows as JSONL"),
    export: Path = typer.Option(Path("var/labelled_windows.jsonl"), "--export",
                                help="with --labels-from-store: where the labelled windows go"),
    store_dsn: str | None = typer.Option(None, "--store", help="with --labels-from-store: DSN (default: settings)"),
    database: str | None = typer.Option(None, "--database", help="with --labels-from-store: database"),
) -> None:
    """Leave-one-source-out on simulated data (full DCGM and nvidia-smi only) and the real MIGProfiler runs."""
    if labels_from_store:
        _evaluate_labels(json_out, export, store_dsn, database)
        return
    t0 = time.perf_counter()
    results = run_evaluation(scenario_scale, _seeds(seeds), mig_dir, model_dir, heldout, real_only)
    results["elapsed_s"] = round(time.perf_counter() - t0, 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(dumps(results) + b"\n")
    if json_out:
        typer.echo(dumps(results).decode())
        return
    typer.echo(format_table(results))
    skipped = (results.get("migprofiler") or {}).get("skipped")
    if skipped:
        typer.echo(f"MIGProfiler: skipped ({skipped})")
    typer.echo(f"results: {out}  ({results['elapsed_s']} s)")


def _evaluate_labels(json_out: bool, export: Path, store_dsn: str | None, database: str | None) -> None:
    from pipeline.label_eval import current_labels, export_windows, format_report, precision_report
    from pipeline.settings import load_settings
    from pipeline.store import Store

    settings = load_settings()
    with Store.connect(store_dsn or settings.clickhouse_dsn, database or settings.database) as store:
        labels = current_labels(store)
        rep = precision_report(labels)
        rep["export"] = {"path": str(export), "windows": export_windows(store, labels, export)}
    if json_out:
        typer.echo(dumps(rep).decode())
        return
    typer.echo(format_report(rep))
    typer.echo(f"labelled windows: {rep['export']['windows']} -> {export}")


def register(app: typer.Typer) -> None:
    app.add_typer(model_app, name="model")
