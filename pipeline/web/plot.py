"""The case plot: cumulative estimated compute of the case's workloads over event time, from the windows table,
with the policy threshold, the low/high band, the projected line where a reservation counts, and markers at
knowledge_at and due_at.

matplotlib's Agg backend (no display); SVG for pages (text kept as text, fixed hash salt so the same case draws
the same bytes) and PNG for the PDF.
"""

from __future__ import annotations

import io
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import matplotlib
import matplotlib.dates as mdates
from matplotlib.figure import Figure

from pipeline.store import Store

# rc_context is process-global: one drawing at a time (the server renders in a thread pool).
_LOCK = threading.Lock()
_SVG_RC = {"svg.fonttype": "none", "svg.hashsalt": "trainwatch", "font.size": 9}


@dataclass
class ComputeSeries:
    """Cumulative FLOP at each window end (estimate, low, high) and what to mark on it."""

    t: list[float] = field(default_factory=list)
    flop: list[float] = field(default_factory=list)
    low: list[float] = field(default_factory=list)
    high: list[float] = field(default_factory=list)
    threshold: float | None = None
    knowledge_at: float | None = None
    due_at: float | None = None
    #: (from time, from FLOP, to time, to FLOP) where a reservation made the projection count
    projected: tuple[float, float, float, float] | None = None
    scope: str = "run"  # "run": the case's workloads; "account": no run, every workload of the account

    def as_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("t", "flop", "low", "high", "threshold", "knowledge_at", "due_at",
                                              "projected", "scope")}


def case_workloads(case: dict[str, Any]) -> list[str]:
    """Workload ids of a case: every detection's workloads and its run description's."""
    out: set[str] = set()
    for d in (case.get("evidence") or {}).get("detections", {}).values():
        out.update(d.get("workload_ids") or [])
        run = (d.get("evidence") or {}).get("run")
        if isinstance(run, dict):
            out.update(run.get("workload_ids") or [])
    return sorted(out)


def compute_series(store: Store, case: dict[str, Any], report: dict[str, Any]) -> ComputeSeries:
    """The series of a case (a Case model_dump) and its draft report (for threshold and projection)."""
    workloads = case_workloads(case)
    if workloads:
        where, params, scope = "workload_id IN {w:Array(String)}", {"w": workloads}, "run"
    else:
        where, params, scope = "account_id = {a:String}", {"a": case["account_id"]}, "account"
    # Every distinct window row adds (corrections are additive, docs/ingest.md); FINAL collapses replays.
    rows = store.query(
        f"SELECT window_end AS t, sum(flop) AS f, sum(flop_low) AS lo, sum(flop_high) AS hi FROM windows FINAL "
        f"WHERE {where} GROUP BY window_end ORDER BY window_end",
        params,
    )
    s = ComputeSeries(threshold=report["compute"]["threshold_flop"], knowledge_at=case.get("knowledge_at"),
                      due_at=case.get("due_at"), scope=scope)
    f = lo = hi = 0.0
    for r in rows:
        f, lo, hi = f + r["f"], lo + r["lo"], hi + r["hi"]
        s.t.append(float(r["t"]))
        s.flop.append(f)
        s.low.append(lo)
        s.high.append(hi)
    comp = report["compute"]
    if comp.get("projected_flop") and comp.get("reserved_until") and s.t:
        # The projection starts where the pipeline made it: at knowledge time, from the compute used by then.
        t0 = s.knowledge_at if s.knowledge_at is not None else s.t[-1]
        used0 = max((v for t, v in zip(s.t, s.flop, strict=True) if t <= t0), default=0.0)
        s.projected = (t0, used0, float(comp["reserved_until"]), float(comp["projected_flop"]))
    return s


def _dt(t: float) -> datetime:
    return datetime.fromtimestamp(t, UTC)


def _figure(s: ComputeSeries) -> Any:
    # Figure directly, not pyplot: no global figure registry, no GUI backend.
    fig = Figure(figsize=(9.0, 3.6), dpi=100)
    ax = fig.subplots()
    if s.t:
        x = [_dt(t) for t in s.t]
        ax.fill_between(x, s.low, s.high, step="post", color="#9ecae1", alpha=0.5, label="low-high band")
        ax.step(x, s.flop, where="post", color="#08519c", lw=1.8, label="cumulative estimate")
    else:
        ax.text(0.5, 0.5, "no windows stored for this case", transform=ax.transAxes, ha="center", va="center")
    ends = list(s.t)
    if s.projected:
        t0, f0, t1, f1 = s.projected
        ax.plot([_dt(t0), _dt(t1)], [f0, f1], ls="--", color="#e6550d", lw=1.4, label="projected to reservation end")
        ends.append(t1)
    if s.threshold:
        ax.axhline(s.threshold, color="#a50f15", lw=1.2, ls=":", label=f"threshold {s.threshold:.3g} FLOP")
    if s.knowledge_at is not None:
        ax.axvline(_dt(s.knowledge_at), color="#31a354", lw=1.2, label="knowledge_at")
        ends.append(s.knowledge_at)
    if s.due_at is not None:
        if ends and s.due_at <= max(ends) + 0.25 * (max(ends) - min(ends) + 1):
            ax.axvline(_dt(s.due_at), color="#756bb1", lw=1.2, label="due_at")
        else:
            # Due dates are days after the evidence (hours long): mark it at the right edge instead of squashing
            # the whole run into a sliver of the axis.
            label = f"due_at {_dt(s.due_at):%Y-%m-%d %H:%MZ} \u2192"
            ax.annotate(label, xy=(1.0, 0.04), xycoords="axes fraction", ha="right", va="bottom", color="#756bb1",
                        fontsize=8, bbox={"boxstyle": "round", "fc": "white", "ec": "#756bb1"})
            ax.plot([], [], color="#756bb1", marker=">", ls="", label="due_at (off the right edge)")
    tops = [v for v in [*s.high, *s.flop, s.threshold or 0.0, s.projected[3] if s.projected else 0.0] if v > 0]
    if s.threshold and tops and max(tops) > 20 * s.threshold:
        # Far past the threshold (projections, long runs): a log axis keeps the threshold line readable.
        ax.set_yscale("log")
        ax.set_ylim(bottom=s.threshold / 100)
    ax.set_xlabel("event time (UTC)")
    ax.set_ylabel("FLOP (cumulative)")
    ax.set_title("compute of the " + ("case's workloads" if s.scope == "run" else "account (no run)"), fontsize=10)
    ax.xaxis.set_major_formatter(mdates.DateFormatter("%m-%d %H:%M"))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.autofmt_xdate()
    fig.tight_layout()
    return fig


def render(s: ComputeSeries, fmt: str = "svg") -> bytes:
    """The plot as SVG or PNG bytes."""
    with _LOCK, matplotlib.rc_context(_SVG_RC):
        fig = _figure(s)
        buf = io.BytesIO()
        fig.savefig(buf, format=fmt, metadata={"Date": None} if fmt == "svg" else None)
        return buf.getvalue()
