"""`trainwatch classify FILE.jsonl [--json]`: one verdict per workload from native telemetry samples.

Accepts any sample interval (0.1 s to 60 s) and any subset of metric fields: the samples go through the same
aggregation as the ingest stage into windows, then through the classifier. Lines that fail validation are counted
and reported on stderr, never silently dropped.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import typer

from detectors.model_artifact import load_artifact
from detectors.state import HISTORY_K
from pipeline.ingest.aggregate import WindowConfig
from pipeline.model_train import HistoryBuilder, histories_from_messages
from pipeline.settings import load_settings
from schemas.serde import dumps


def verdict_rows(hb: HistoryBuilder, model: Any) -> list[dict[str, Any]]:
    """One row per workload: ids, the verdict over the history the engine would hold at the end, compute over every
    window, scale, duration."""
    by_wl: dict[str, list[Any]] = {}
    for (wid, _start), w in sorted(hb.windows.items()):
        by_wl.setdefault(wid, []).append(w)
    rows = []
    for wid in sorted(by_wl):
        wins = by_wl[wid]
        v = model.predict(hb.entries[wid][-HISTORY_K:])
        bases = {w.basis for w in wins}
        rows.append({
            "workload_id": wid,
            "account_id": next((w.account_id for w in wins if w.account_id), None),
            "p_training": v.p_training,
            "band": v.band,
            "flop": float(sum(w.flop for w in wins)),
            "flop_low": float(sum(w.flop_low for w in wins)),
            "flop_high": float(sum(w.flop_high for w in wins)),
            "basis": bases.pop() if len(bases) == 1 else "mixed",
            "device_count": max(w.device_count for w in wins),
            "duration_s": float(wins[-1].window_end - wins[0].window_start),
            "windows": len(wins),
            "top_features": [[n, c] for n, c in v.top_features],
            "model_id": v.model_id,
            "model_version": v.model_version,
        })
    return rows


def _lines(path: Path) -> list[bytes]:
    return [ln for ln in (x.strip() for x in path.read_bytes().splitlines()) if ln]


def classify(
    file: Path = typer.Argument(..., exists=True, dir_okay=False, help="JSONL of native TelemetrySample lines"),
    json_out: bool = typer.Option(False, "--json", help="one JSON object per workload per line"),
    model_dir: Path | None = typer.Option(None, "--model", help="artifact directory (default: settings / packaged)"),
) -> None:
    """Classify every workload in a telemetry file: P(training), band, compute, scale, top features."""
    settings = load_settings()
    model, _meta = load_artifact(model_dir or settings.model_path)
    # The ingest stage's own decoding, validation and windowing; `now` bounds future timestamps (entry point: the
    # one clock read).
    hb, bad = histories_from_messages(_lines(file), time.time(), WindowConfig(window_s=settings.window_s),
                                      keep_windows=True)
    if bad:
        typer.echo(f"{bad} line(s) failed validation and were skipped", err=True)
    rows = verdict_rows(hb, model)
    if json_out:
        for r in rows:
            typer.echo(dumps(r).decode())
        return
    typer.echo(f"{'workload':24} {'account':16} {'P(train)':>8} {'band':12} {'FLOP':>9} {'[low, high]':>21} "
               f"{'basis':17} {'dev':>5} {'dur_s':>8}  top features")
    for r in rows:
        top = ", ".join(f"{n}{c:+.2f}" for n, c in r["top_features"][:3])
        typer.echo(f"{r['workload_id'][:24]:24} {str(r['account_id'])[:16]:16} {r['p_training']:8.3f} {r['band']:12} "
                   f"{r['flop']:9.2e} [{r['flop_low']:9.2e}, {r['flop_high']:9.2e}] {r['basis']:17} "
                   f"{r['device_count']:>5} {r['duration_s']:8.0f}  {top}")


def register(app: typer.Typer) -> None:
    app.command("classify")(classify)
