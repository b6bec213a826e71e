"""Change in scope, measured: run a simulator scenario through ingest and detect (no store), and judge the
`change_in_scope` baseline alarms against the ground truth.

Labels: a folder whose ground truth has `scope_changes` (the `scope` scenario, docs/simulator.md) is judged on
them: per account a kind, `change` (true: a deliberate change at `t_change`; false: a control that never changes).
An older folder has no such key; then the label is inferred from each account's workloads, as before:
- scope_change: the account's first training workload starts at t_c while a non-training workload of the account
  began at least `min_baseline_s` before t_c and was running within the engine's idle TTL of t_c (a baseline
  existed to change from). `demo`'s acct-scope: serving on 2 L40S, then 16 B200 pretraining.
- no_training: the account never trains (a control).
- other: training from the account's first use (no "before" to change from); reported, not scored.
Alarms are the baseline's detections: `use_changed` and, with explicit labels, `reservation_outgrew_use` (a
label may be a reservation that grows; inferred labels count `use_changed` only, so `demo`'s reservation warning
15 min before its training is not a false alarm). Per change account: the first alarm dated at or after
t_c - one window is the hit; delay = its confirmation time (evidence `confirmed_at`, when the detector knew)
minus t_c, dating error = its event_time (when it says the change began) minus t_c; earlier alarms are false
alarms, later ones are counted as `after_hit`. Every alarm on a control is a false alarm. False alarms are per
account-day of steady use: a control's whole span of workloads, a change account's span before t_c.
"""

from __future__ import annotations

import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import replace
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
ALARM_REASONS = ("use_changed", "reservation_outgrew_use")
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
    out += stage.flush()  # CIP records / allocations the stage holds ahead of the windows (event-time order)
    out += stage.on_time()
    return out


def truth_by_account(truth: dict[str, Any], params: ScopeParams) -> dict[str, dict[str, Any]]:
    """Per account with workloads: kind, group (change | control | other), t_change, first use, observed days."""
    wls: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for w in truth["workloads"]:
        wls[w["account_id"]].append(w)
    labels = {x["account_id"]: x for x in truth.get("scope_changes") or ()}
    out: dict[str, dict[str, Any]] = {}
    for aid, ws in sorted(wls.items()):
        first = min(w["start"] for w in ws)
        rec: dict[str, Any] = {"kind": "no_training", "group": "control", "t_change": None,
                               "days": (max(w["end"] for w in ws) - first) / DAY, "first_use": first,
                               "archetypes": [w["archetype"] for w in sorted(ws, key=lambda w: w["start"])]}
        if truth.get("scope_changes") is not None:
            lab = labels.get(aid)
            if lab is None:
                rec.update(kind="unlabelled", group="other")
            else:
                rec.update(kind=lab["kind"], group="change" if lab["change"] else "control",
                           t_change=lab["t_change"])
            out[aid] = rec
            continue
        training = sorted(w["start"] for w in ws if w["is_training"])
        if training:
            t_c = training[0]
            before = [w for w in ws if not w["is_training"] and w["start"] <= t_c - params.min_baseline_s
                      and w["end"] >= t_c - IDLE_TTL_S]
            rec.update(kind="scope_change" if before else "other", group="change" if before else "other",
                       t_change=t_c)
        out[aid] = rec
    return out


def score(dets: list[Detection], truth: dict[str, Any], window_s: float, params: ScopeParams | None = None,
          policy_name: str = "demo") -> dict[str, Any]:
    """Figures per kind and overall (see the module docstring), with the thresholds the detector used."""
    u = load_policy(policy_name).uncertainty
    params = replace(params or ScopeParams(), p_high=u.p_training_high, p_low=u.p_training_low)
    explicit = truth.get("scope_changes") is not None
    reasons = ALARM_REASONS if explicit else ("use_changed",)
    accts = truth_by_account(truth, params)
    by_acct: dict[str, list[Detection]] = defaultdict(list)
    # Each detection id once, its latest version: the engine re-emits a detection it re-decided on a corrected
    # window under the same id (detectors/engine.py), which supersedes the earlier one, as in the store.
    for d in {d.detection_id: d for d in dets}.values():
        if d.detector_id == DETECTOR:
            by_acct[d.account_id].append(d)
    per: dict[str, Any] = {}
    kinds: dict[str, dict[str, Any]] = {}
    for aid, t in accts.items():
        mine = sorted(by_acct.get(aid, []), key=lambda d: d.event_time)
        alarms = [d for d in mine if d.reason in reasons]
        row: dict[str, Any] = {**t, "reasons": sorted({d.reason for d in mine}),
                               "use_changed": [{"event_time": d.event_time, "confirmed_at": d.evidence["confirmed_at"],
                                                "reason": d.reason, "what": d.evidence["what"]} for d in alarms]}
        k = kinds.setdefault(t["kind"], {"group": t["group"], "accounts": 0, "false_alarms": 0, "fa_days": 0.0,
                                         "delays": [], "dating": [], "missed": [], "after_hit": 0, "alarmed": 0})
        k["accounts"] += 1
        if t["group"] == "control":
            row["false_alarms"] = len(alarms)
            k["false_alarms"] += len(alarms)
            k["alarmed"] += bool(alarms)
            k["fa_days"] += t["days"]
        elif t["group"] == "change":
            t_c = t["t_change"]
            early = [d for d in alarms if d.event_time < t_c - window_s]
            late = [d for d in alarms if d.event_time >= t_c - window_s]
            row["false_alarms"] = len(early)
            k["false_alarms"] += len(early)
            k["alarmed"] += bool(early)
            k["fa_days"] += max(0.0, t_c - t["first_use"]) / DAY  # before the change, the account was steady
            if late:
                hit = late[0]
                row["delay_s"] = hit.evidence["confirmed_at"] - t_c
                row["dating_error_s"] = hit.event_time - t_c
                row["what"] = hit.evidence["what"]
                k["delays"].append(row["delay_s"])
                k["dating"].append(row["dating_error_s"])
                k["after_hit"] += len(late) - 1
            else:
                row["delay_s"] = None
                k["missed"].append(aid)
        per[aid] = row
    by_kind = {name: _kind_figures(k) for name, k in sorted(kinds.items(), key=lambda kv: (kv[1]["group"], kv[0]))}
    change = [k for k in kinds.values() if k["group"] == "change"]
    delays = [x for k in change for x in k["delays"]]
    dating = [x for k in change for x in k["dating"]]
    scored = [k for k in kinds.values() if k["group"] in ("change", "control")]
    fa = sum(k["false_alarms"] for k in scored)
    fa_days = sum(k["fa_days"] for k in scored)
    return {
        "labels": "explicit" if explicit else "inferred",
        "window_s": window_s,
        "params": {"min_baseline_s": params.min_baseline_s, "dwell": params.dwell, "alpha": params.alpha,
                   "scale_factor": params.scale_factor, "min_devices_added": params.min_devices_added,
                   "rate_factor": params.rate_factor, "p_high": params.p_high, "p_low": params.p_low,
                   "policy": policy_name},
        "alarm_reasons": list(reasons),
        "accounts": dict(Counter(t["group"] if explicit else t["kind"] for t in accts.values())),
        "by_kind": by_kind,
        "scope_change": {"n": sum(k["accounts"] for k in change), "detected": len(delays),
                         "delay_s": {"median": _median(delays), "max": max(delays) if delays else None},
                         "dating_error_s": {"median": _median(dating),
                                            "max_abs": max((abs(x) for x in dating), default=None)}},
        "false_alarms": {"n": fa, "account_days": round(fa_days, 3),
                         "per_account_day": round(fa / fa_days, 3) if fa_days else None},
        "per_account": per,
    }


def _kind_figures(k: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"group": k["group"], "accounts": k["accounts"], "false_alarms": k["false_alarms"],
                           "accounts_with_false_alarms": k["alarmed"], "account_days": round(k["fa_days"], 3),
                           "false_alarms_per_account_day": round(k["false_alarms"] / k["fa_days"], 3)
                           if k["fa_days"] else None}
    if k["group"] == "change":
        d, e = k["delays"], k["dating"]
        out.update(detected=len(d), missed=k["missed"], after_hit=k["after_hit"],
                   delay_s={"median": _median(d), "max": max(d) if d else None},
                   dating_error_s={"median": _median(e), "max_abs": max((abs(x) for x in e), default=None)})
    return out


def _median(xs: list[float]) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def evaluate(scenario: str = "demo", *, scale: float = 1.0, seed: int = 0, model: str | None = None,
             folder: Path | None = None, policy_name: str = "demo") -> dict[str, Any]:
    """Simulate (unless `folder` holds a simulator folder already), detect, and score. Figures as one JSON-able
    dict; with `folder`, scenario, seed and scale are the folder's."""
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="scope-eval-") as tmp:
        if folder is None:
            params = {"scale": scale} if scenario != "demo" else {}
            folder = simulate(scenario, Path(tmp) / scenario, seed=seed, **params)
        else:
            manifest = orjson.loads((folder / "manifest.json").read_bytes())
            scenario, seed = manifest["scenario"], manifest["seed"]
            scale = float(manifest.get("parameters", {}).get("scale", scale))
        truth = orjson.loads((folder / "ground_truth.json").read_bytes())
        dets = detect_folder(folder, policy_name, model=model)
    res = score(dets, truth, float(truth.get("window_s", 60.0)), policy_name=policy_name)
    res.update({"scenario": scenario, "seed": seed, "scale": scale, "elapsed_s": round(time.perf_counter() - t0, 1)})
    return res


def trace_accounts(folder: Path, accounts: set[str], policy_name: str = "demo",
                   model: str | None = None) -> list[dict[str, Any]]:
    """Every bucket the scope baseline judged for `accounts` over a simulator folder, in judging order: window end,
    each workload's (devices, FLOP, P) as the baseline received them, the bucket's (devices, P, FLOP/s), the
    baseline's level and dwell before it, and the changes it gave. A diagnostic (why a change came late): it wraps
    ScopeBaseline._judge for the run of this call only."""
    from detectors import scope_baseline as sb

    truth = orjson.loads((folder / "ground_truth.json").read_bytes())
    owner = {w["workload_id"]: w["account_id"] for w in truth["workloads"]}
    judge = sb.ScopeBaseline._judge
    log: list[dict[str, Any]] = []

    def traced(self: Any, end: float, window_s: float, wins: dict[str, list[float]], params: ScopeParams, *,
               known_at: float) -> list[Any]:
        before = {"base_devices": self.scale, "base_p": self.p_training, "base_rate": self.rate,
                  "dwell": len(self.candidate)}
        changes = judge(self, end, window_s, wins, params, known_at=known_at)
        acct = {owner.get(w) for w in wins}
        if acct & accounts:
            dev, p, rate = sb._bucket_of(wins, window_s)
            log.append({"account": sorted(a for a in acct if a), "end": end, "known_at": known_at,
                        "workloads": {w: [round(v[0], 2), v[1], round(v[2], 4)] for w, v in wins.items()},
                        "bucket": {"devices": dev, "p_training": round(p, 4), "flop_per_s": rate}, **before,
                        "changes": [c.to_dict() for c in changes]})
        return changes

    sb.ScopeBaseline._judge = traced  # type: ignore[method-assign]
    try:
        detect_folder(folder, policy_name, model=model)
    finally:
        sb.ScopeBaseline._judge = judge  # type: ignore[method-assign]
    return log


def main() -> None:
    """`python -m pipeline.scope_eval trace --seed 2 --account A [--out FILE]`: the baseline's buckets of one
    account of the `scope` scenario (simulated into a temporary folder), as JSON."""
    import argparse
    import json

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("what", choices=["trace"])
    ap.add_argument("--scenario", default="scope")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--account", action="append", required=True)
    ap.add_argument("--around", type=int, default=None,
                    help="only the buckets within this many windows of a labelled change time")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="scope-trace-") as tmp:
        params = {"scale": args.scale} if args.scenario != "demo" else {}
        folder = simulate(args.scenario, Path(tmp) / args.scenario, seed=args.seed, **params)
        truth = orjson.loads((folder / "ground_truth.json").read_bytes())
        log = trace_accounts(folder, set(args.account))
    labels = [x for x in truth.get("scope_changes") or () if x["account_id"] in args.account]
    if args.around is not None:
        window_s = float(truth.get("window_s", 60.0))
        t_cs = [x["t_change"] for x in labels if x.get("t_change") is not None]
        log = [b for b in log if any(abs(b["end"] - t) <= args.around * window_s for t in t_cs)]
    text = json.dumps({"scenario": args.scenario, "seed": args.seed, "scale": args.scale, "labels": labels,
                       "buckets": log}, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    else:
        print(text)


if __name__ == "__main__":
    main()
