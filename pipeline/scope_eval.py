"""Change in scope, measured: run the simulator's scenario through ingest and detect (no store), and judge the
`change_in_scope` baseline detections against the ground truth's workloads.

Ground truth has no scope label; it is read from each account's workloads (docs/simulator.md):
- scope change: the account's first training workload starts at t_c while a non-training workload of the account
  began at least `min_baseline_s` before t_c and was running within the engine's idle TTL of t_c (a baseline
  existed to change from). `demo`'s acct-scope: serving on 2 L40S, then 16 B200 pretraining.
- no training: the account never trains; every `use_changed` detection there is a false alarm.
- other: training from the account's first use (no "before" to change from); reported, not scored.
Per scope-change account: delay = confirmation time (evidence `confirmed_at`, when the detector knew) minus t_c,
and the dating error = the detection's event_time (when it says the change began) minus t_c. A `use_changed`
before t_c - one window is a false alarm too. False alarms are per account-day of observed use.
"""

from __future__ import annotations

import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import orjson

from detectors.engine import IDLE_TTL_S
from detectors.scope_baseline import ScopeParams
from pipeline.classifier_loader import load_classifier
from pipeline.detect.stage import DetectStage
from pipeline.ingest.aggregate import WindowConfig
from pipeline.ingest.stage import IngestCore, SourceMessage
from pipeline.simulator import simulate
from pipeline.sources import read_folder
from schemas.allocation import AllocationEvent
from schemas.cip import CipRecord
from schemas.detection import Detection
from schemas.errors import InvalidMessage
from schemas.policy import load_policy
from schemas.serde import decode

DETECTOR = "change_in_scope"
DAY = 86_400.0
BATCH = 5000


def detect_folder(folder: Path, policy_name: str = "demo", model: str | None = None) -> list[Detection]:
    """Every detection of the ingest + detect stages over a simulator folder, in delivery order (no store)."""
    policy = load_policy(policy_name)
    cfg = WindowConfig()
    ingest = IngestCore(cfg, "native")
    stage = DetectStage(policy, load_classifier(model, policy), cfg.window_s, cfg.allowed_lateness_s)
    out: list[Detection] = []
    pending: list[SourceMessage] = []
    now = 4e9  # processing time far after any simulated period (bounds only a telemetry clock's skew)

    def flush() -> None:
        if pending:
            ingest.process("telemetry", 0, list(pending), now=now)
            pending.clear()
            for w in ingest.ready():
                out.extend(stage.on_window(w))

    for rec in read_folder(folder):
        if rec.stream == "telemetry":
            pending.append(SourceMessage(rec.offset, rec.value))
            if len(pending) >= BATCH:
                flush()
            continue
        flush()
        try:
            if rec.stream == "cip":
                out += stage.on_cip(decode(CipRecord, rec.value))
            elif rec.stream == "allocations":
                out += stage.on_allocation(decode(AllocationEvent, rec.value))
        except InvalidMessage:
            continue  # the pipeline dead-letters these; they carry no scope
    flush()
    for w in ingest.drain():
        out += stage.on_window(w)
    out += stage.on_time()
    return out


def truth_by_account(truth: dict[str, Any], params: ScopeParams) -> dict[str, dict[str, Any]]:
    """Per account with workloads: kind (scope_change | no_training | other), t_change, observed days."""
    wls: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for w in truth["workloads"]:
        wls[w["account_id"]].append(w)
    out: dict[str, dict[str, Any]] = {}
    for aid, ws in sorted(wls.items()):
        span = (max(w["end"] for w in ws) - min(w["start"] for w in ws)) / DAY
        training = sorted(w["start"] for w in ws if w["is_training"])
        rec: dict[str, Any] = {"kind": "no_training", "t_change": None, "days": span,
                               "first_use": min(w["start"] for w in ws),
                               "archetypes": [w["archetype"] for w in sorted(ws, key=lambda w: w["start"])]}
        if training:
            t_c = training[0]
            before = [w for w in ws if not w["is_training"] and w["start"] <= t_c - params.min_baseline_s
                      and w["end"] >= t_c - IDLE_TTL_S]
            rec["kind"] = "scope_change" if before else "other"
            rec["t_change"] = t_c
        out[aid] = rec
    return out


def score(dets: list[Detection], truth: dict[str, Any], window_s: float,
          params: ScopeParams | None = None) -> dict[str, Any]:
    params = params or ScopeParams()
    accts = truth_by_account(truth, params)
    by_acct: dict[str, list[Detection]] = defaultdict(list)
    for d in dets:
        if d.detector_id == DETECTOR:
            by_acct[d.account_id].append(d)
    per: dict[str, Any] = {}
    delays: list[float] = []
    dating: list[float] = []
    false_alarms = 0
    fa_days = 0.0
    for aid, t in accts.items():
        mine = sorted(by_acct.get(aid, []), key=lambda d: d.event_time)
        use = [d for d in mine if d.reason == "use_changed"]
        row: dict[str, Any] = {**t, "reasons": sorted({d.reason for d in mine}),
                               "use_changed": [{"event_time": d.event_time, "confirmed_at": d.evidence["confirmed_at"],
                                                "what": d.evidence["what"]} for d in use]}
        if t["kind"] == "no_training":
            row["false_alarms"] = len(use)
            false_alarms += len(use)
            fa_days += t["days"]
        elif t["kind"] == "scope_change":
            t_c = t["t_change"]
            early = [d for d in use if d.event_time < t_c - window_s]
            hit = next((d for d in use if d.event_time >= t_c - window_s), None)
            row["false_alarms"] = len(early)
            false_alarms += len(early)
            fa_days += max(0.0, t_c - t["first_use"]) / DAY  # before the change, the account was steady
            if hit is not None:
                row["delay_s"] = hit.evidence["confirmed_at"] - t_c
                row["dating_error_s"] = hit.event_time - t_c
                row["what"] = hit.evidence["what"]
                delays.append(row["delay_s"])
                dating.append(row["dating_error_s"])
            else:
                row["delay_s"] = None
        per[aid] = row
    changes = [a for a, t in accts.items() if t["kind"] == "scope_change"]
    return {
        "window_s": window_s,
        "params": {"min_baseline_s": params.min_baseline_s, "dwell": params.dwell,
                   "scale_factor": params.scale_factor, "rate_factor": params.rate_factor},
        "accounts": {k: sum(1 for t in accts.values() if t["kind"] == k) for k in ("scope_change", "no_training",
                                                                                    "other")},
        "scope_change": {"n": len(changes), "detected": len(delays),
                         "delay_s": {"median": _median(delays), "max": max(delays) if delays else None},
                         "dating_error_s": {"median": _median(dating),
                                            "max_abs": max((abs(x) for x in dating), default=None)}},
        "false_alarms": {"n": false_alarms, "account_days": round(fa_days, 3),
                         "per_account_day": round(false_alarms / fa_days, 3) if fa_days else None},
        "per_account": per,
    }


def _median(xs: list[float]) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def evaluate(scenario: str = "demo", *, scale: float = 1.0, seed: int = 0, model: str | None = None,
             folder: Path | None = None) -> dict[str, Any]:
    """Simulate (unless `folder` holds the scenario already), detect, and score. Figures as one JSON-able dict."""
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="scope-eval-") as tmp:
        if folder is None:
            params = {"scale": scale} if scenario != "demo" else {}
            folder = simulate(scenario, Path(tmp) / scenario, seed=seed, **params)
        truth = orjson.loads((folder / "ground_truth.json").read_bytes())
        dets = detect_folder(folder, model=model)
    res = score(dets, truth, float(truth.get("window_s", 60.0)))
    res.update({"scenario": scenario, "seed": seed, "scale": scale, "elapsed_s": round(time.perf_counter() - t0, 1)})
    return res
