"""`trainwatch classify FILE [--json]`: one verdict per workload from the telemetry files users have.

Reads, auto-detected (pipeline/trace_formats.py): native JSONL, `nvidia-smi --query-gpu` CSV logs, `dcgmi dmon`
output and dcgm-exporter Prometheus text. Several workloads per file, in any order: samples are grouped per
workload (`--workload-by`, else the file's workload ids, else one run named `--run-id`) and each workload goes
through the ingest stage's windowing on its own, in time order. Rejected lines are listed with their line number
and reason (`--errors FILE` writes them all) and make the exit status 1 unless `--allow-errors`.
The verdict covers the whole run (every window, classifier `predict` over all of them).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import typer

from detectors.model_artifact import load_artifact
from pipeline.ingest.aggregate import WindowConfig
from pipeline.model_train import HistoryBuilder, histories_from_messages
from pipeline.settings import load_settings
from pipeline.trace_formats import FORMATS, TraceError, parse_trace, parse_ts
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
        v = model.predict(hb.entries[wid])  # the whole run: the classifier judges it in parts and combines them
        bases = {w.basis for w in wins}
        flop = float(sum(w.flop for w in wins))
        flop_low = float(sum(w.flop_low for w in wins))
        flop_high = float(sum(w.flop_high for w in wins))
        unknown = sorted({a for w in wins for a in w.unknown_accelerators})
        # An unknown (or unnamed) part: the windows carry basis unknown_accelerator and the band on the catalog's
        # peaks (detectors.compute.unknown_accelerator_peaks), the same figures the store and cases get.
        basis = bases.pop() if len(bases) == 1 else "mixed"
        rows.append({
            "workload_id": wid,
            "account_id": next((w.account_id for w in wins if w.account_id), None),
            "p_training": v.p_training,
            "band": v.band,
            "flop": flop,
            "flop_low": flop_low,
            "flop_high": flop_high,
            "basis": basis,
            "unknown_accelerators": unknown,
            "device_count": max(w.device_count for w in wins),
            "duration_s": float(wins[-1].window_end - wins[0].window_start),
            "windows": len(wins),
            "top_features": [[n, c] for n, c in v.top_features],
            "model_id": v.model_id,
            "model_version": v.model_version,
            "reasons": list(v.reasons),
            "out_features": list(v.out_features),
            "missing": list(v.missing),
            "p_low": v.p_low,
            "p_high": v.p_high,
            "in_distribution": v.in_distribution,
        })
    return rows


def classify(
    file: Path = typer.Argument(..., exists=True, dir_okay=False,
                                help="telemetry: native JSONL, nvidia-smi CSV, dcgmi dmon output or Prometheus text"),
    json_out: bool = typer.Option(False, "--json", help="one JSON object per workload per line"),
    model_dir: Path | None = typer.Option(None, "--model", help="artifact directory (default: settings / packaged)"),
    fmt: str | None = typer.Option(None, "--format", help=f"skip detection: one of {', '.join(FORMATS)}"),
    workload_by: str | None = typer.Option(None, "--workload-by",
                                           help="column / key / label that names the workload, or 'file'"),
    run_id: str | None = typer.Option(None, "--run-id", help="workload id when the file names none (default: stem)"),
    columns: str | None = typer.Option(None, "--columns", help="comma-separated header of a CSV printed noheader"),
    accelerator: str | None = typer.Option(None, "--accelerator", help="model name when the file has none"),
    interval_s: float | None = typer.Option(None, "--interval", help="sampling interval (dcgmi dmon -d, in s)"),
    start: str | None = typer.Option(None, "--start", help="time of the first dcgmi dmon row (epoch s or ISO)"),
    errors_file: Path | None = typer.Option(None, "--errors", help="write every rejected line and its reason here"),
    allow_errors: bool = typer.Option(False, "--allow-errors", help="exit 0 even when lines were rejected"),
) -> None:
    """Classify every workload in a telemetry file: P(training), band, compute, scale, top features."""
    settings = load_settings()
    model, _meta = load_artifact(model_dir or settings.model_path)
    now = time.time()  # entry point: the one clock read (bounds future timestamps)
    try:
        cols = [c.strip() for c in columns.split(",")] if columns else None
        trace = parse_trace(file.read_text(errors="replace"), fmt=fmt, run_id=run_id or file.stem,
                            workload_by=workload_by, columns=cols, accelerator=accelerator, interval_s=interval_s,
                            start=parse_ts(start) if start else None, now=now)
    except (TraceError, ValueError) as exc:
        typer.echo(f"error: {file}: {exc}", err=True)
        raise typer.Exit(2) from exc
    for n in trace.notes:
        typer.echo(f"note: {n}", err=True)
    window = WindowConfig(window_s=settings.window_s)
    hb = HistoryBuilder(window, keep_windows=True)
    dead = 0
    by_wl: dict[str, list[bytes]] = {}
    for smp in trace.samples:
        by_wl.setdefault(str(smp["workload_id"]), []).append(dumps(smp))
    for lines in by_wl.values():  # each workload on its own clock: one's watermark never drops another's samples
        one, d = histories_from_messages(lines, now, window, keep_windows=True)
        dead += d
        for wid, ents in one.entries.items():
            hb.entries[wid].extend(ents)
        hb.windows.update(one.windows)
    rows = verdict_rows(hb, model)
    bad = len(trace.errors) + dead
    if trace.errors:
        for line, reason in trace.errors[:10]:
            typer.echo(f"line {line}: {reason}", err=True)
        if len(trace.errors) > 10:
            typer.echo(f"... {len(trace.errors) - 10} more (--errors FILE lists them all)", err=True)
    if errors_file is not None:
        errors_file.write_text("".join(f"{ln}\t{r}\n" for ln, r in trace.errors))
    if bad:
        typer.echo(f"{bad} line(s) failed validation and were skipped ({trace.format}, {trace.lines} lines)", err=True)
    _print(rows, json_out)
    if bad and not allow_errors:
        raise typer.Exit(1)


def _print(rows: list[dict[str, Any]], json_out: bool) -> None:
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
