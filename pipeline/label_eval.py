"""Precision from analysts' labels (issue 16): `trainwatch model evaluate --labels-from-store`.

Closing a case records a label (true_positive / false_positive + reason code, `case_labels`). This reads the labels
of cases that are closed now (a case reopened since is no verdict), reports precision = TP / (TP + FP) per detector
and per classifier band the case's findings carried, and exports the labelled runs' windows as JSONL for
retraining (one line per stored partial window, with its case's label). Precision only: a flag nobody raised has
no label, so recall cannot come from here (the simulator's ground truth measures it).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from pipeline.store import Store
from schemas.case import CaseLabel
from schemas.serde import dumps

CLOSED = ("reported", "dismissed")


def current_labels(store: Store, policy_id: str | None = None) -> list[CaseLabel]:
    """Labels of cases closed now (latest label per case)."""
    labels = store.list_labels(policy_id)
    if not labels:
        return []
    rows = store.query("SELECT case_id, status FROM cases FINAL WHERE case_id IN {ids:Array(String)}",
                       {"ids": [lb.case_id for lb in labels]})
    closed = {r["case_id"] for r in rows if r["status"] in CLOSED}
    return [lb for lb in labels if lb.case_id in closed]


def _block(labels: Iterable[CaseLabel], keys: Callable[[CaseLabel], Iterable[str]]) -> dict[str, dict[str, Any]]:
    counts: dict[str, dict[str, int]] = defaultdict(lambda: {"true_positive": 0, "false_positive": 0})
    for lb in labels:
        for k in keys(lb):
            counts[k][lb.label] += 1
    out = {}
    for k, c in sorted(counts.items()):
        n = c["true_positive"] + c["false_positive"]
        out[k] = {"labelled": n, "true_positive": c["true_positive"], "false_positive": c["false_positive"],
                  "precision": round(c["true_positive"] / n, 4) if n else None}
    return out


def precision_report(labels: Sequence[CaseLabel]) -> dict[str, Any]:
    """Precision overall, per detector, per classifier band (a case with no classifier verdict: band `none`), and
    the false positives' reason codes."""
    return {
        "labelled_cases": len(labels),
        "overall": _block(labels, lambda lb: ["all"]).get("all"),
        "per_detector": _block(labels, lambda lb: lb.detectors or ["none"]),
        "per_band": _block(labels, lambda lb: lb.bands or ["none"]),
        "false_positive_reasons": dict(sorted(
            _count(lb.reason_code for lb in labels if lb.label == "false_positive").items())),
    }


def _count(items: Iterable[str]) -> dict[str, int]:
    out: dict[str, int] = defaultdict(int)
    for i in items:
        out[i] += 1
    return dict(out)


def export_windows(store: Store, labels: Sequence[CaseLabel], path: Path) -> int:
    """Write the labelled runs' stored windows as JSONL (one partial window a line with its case's label)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with path.open("wb") as fh:
        for lb in labels:
            wanted = set(lb.workload_ids)
            if not wanted:
                continue
            for w in store.list_windows(lb.account_id):
                if w.workload_id in wanted:
                    fh.write(dumps({"case_id": lb.case_id, "label": lb.label, "reason_code": lb.reason_code,
                                    "run_id": lb.run_id, "bands": lb.bands, "window": w.model_dump(mode="json")})
                             + b"\n")
                    n += 1
    return n


def format_report(rep: dict[str, Any]) -> str:
    lines = [f"labelled closed cases: {rep['labelled_cases']}"]
    for title, key in (("detector", "per_detector"), ("classifier band", "per_band")):
        lines.append(f"{title:<22}{'labelled':>9}{'TP':>6}{'FP':>6}{'precision':>11}")
        for name, b in rep[key].items():
            p = "-" if b["precision"] is None else f"{b['precision']:.3f}"
            lines.append(f"{name:<22}{b['labelled']:>9}{b['true_positive']:>6}{b['false_positive']:>6}{p:>11}")
    if rep["overall"]:
        lines.append(f"overall precision {rep['overall']['precision']:.3f} "
                     f"({rep['overall']['true_positive']}/{rep['overall']['labelled']})")
    if rep["false_positive_reasons"]:
        lines.append("false positives by reason: " +
                     ", ".join(f"{k}={v}" for k, v in rep["false_positive_reasons"].items()))
    return "\n".join(lines)
