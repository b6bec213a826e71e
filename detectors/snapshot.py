"""The detect engine's state split by account, for a store that keeps one entry per account (the faust app's
`engine` table): `split` / `from_split` round-trip it; `split_dirty` returns only the accounts the engine marked as
changed since the last call (every path that changes an account's part marks it; tests check the sum of the parts
against `split`). Kept out of the engine: it is a concern of the runtime that persists the state.

An account's part holds its re-decide journal too (`journal`: DetectEngine.journal_to_dict, the snapshot of its
oldest step and the inputs since), so an engine restored after a restart re-decides a correction of a window applied
before it as the engine that never stopped would (tests/test_journal_restore.py).
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import asdict
from typing import Any

from detectors.base import Detector
from detectors.classifier_base import WorkloadClassifier
from detectors.engine import DetectEngine
from schemas.policy import Policy


def _empty_part() -> dict[str, Any]:
    """One account's entry of `DetectEngine.split()` before it is filled."""
    return {"account": None, "cip": None, "runs": {}, "stitched": {}, "workload_run": {}, "workload_end": {},
            "stopped": {}, "workload_fp": {}, "emitted": [], "named_owners": [], "journal": None}


def split(engine: DetectEngine) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The state as (shared part, {account id: that account's part}); `from_split` reverses it. An account's
    part holds its account state, CIP, runs with their stitching, and the detection ids emitted for it (kept
    after the account state expires: detections are never emitted twice)."""
    d = engine.to_dict()
    st = d["stitcher"]
    acct_of_run = {rid: r["account_id"] for rid, r in st["runs"].items()}
    parts: defaultdict[str, dict[str, Any]] = defaultdict(_empty_part)
    part = parts.__getitem__

    for aid, a in d["accounts"].items():
        part(aid)["account"] = a
    for aid, c in d["cips"].items():
        part(aid)["cip"] = c
    for rid, r in d["runs"].items():
        part(r["account_id"])["runs"][rid] = r
    for rid, r in st["runs"].items():
        part(r["account_id"])["stitched"][rid] = r
    # Workload entries whose run is unknown (a stop before the first window; a run that expired) stay shared.
    rest: dict[str, dict[str, Any]] = {"workload_run": {}, "workload_end": {}, "stopped": {}, "workload_fp": {}}
    for key in rest:
        for wid, v in st[key].items():
            aid = acct_of_run.get(st["workload_run"].get(wid, ""))
            (part(aid)[key] if aid is not None else rest[key])[wid] = v
    for did, aid in d["emitted"].items():
        part(aid)["emitted"].append(did)
    for aid, owners in d["named_owners"].items():
        part(aid)["named_owners"] = owners
    for aid in engine._journal:
        journal = engine.journal_to_dict(aid)
        if journal is not None:
            part(aid)["journal"] = journal
    shared = {"window_s": d["window_s"], "watermark": d["watermark"], "errors": d["errors"],
              "owners": d["owners"], "stitcher": {"window_s": st["window_s"], "gap_s": st["gap_s"], **rest}}
    return shared, dict(parts)


def split_shared(engine: DetectEngine) -> dict[str, Any]:
    """The shared part of `split()` alone (built from the live state, without serialising the accounts)."""
    st = engine.stitcher
    known = st.runs
    rest = {key: {w: v for w, v in getattr(st, key).items() if st.workload_run.get(w) not in known}
            for key in ("workload_run", "workload_end", "stopped", "workload_fp")}
    return {"window_s": engine.window_s, "watermark": engine.watermark, "errors": dict(engine.errors),
            "owners": engine.owner_agg.to_dict(), "stitcher": {"window_s": st.window_s, "gap_s": st.gap_s, **rest}}


def split_dirty(engine: DetectEngine) -> tuple[dict[str, Any] | None, dict[str, dict[str, Any]], list[str]]:
    """What changed since the last call, as `split()` would write it: (the shared part, or None when it is as
    last returned; {account id: its part} for the accounts marked since; the marked accounts that no longer
    have a part). Applying these to the previous entries gives exactly `split()`; only the marked accounts are
    serialised. Marks are cleared. Invariant relied on: a workload's run (`workload_run`) lists it."""
    dirty, engine._dirty = engine._dirty, set()
    shared: dict[str, Any] | None = split_shared(engine)
    text = json.dumps(shared, sort_keys=True)
    if text == engine._shared_sent:
        shared = None
    engine._shared_sent = text
    if engine._emitted_by is None:
        engine._emitted_by = {}
        for did, aid in engine.emitted.items():
            engine._emitted_by.setdefault(aid, []).append(did)
    st = engine.stitcher
    parts: defaultdict[str, dict[str, Any]] = defaultdict(_empty_part)
    part = parts.__getitem__

    for aid in dirty:
        if aid in engine.accounts:
            part(aid)["account"] = engine.accounts[aid].to_dict()
        if aid in engine.cips:
            part(aid)["cip"] = engine.cips[aid].model_dump(mode="json")
    for rid, r in engine.runs.items():  # a pass over the live runs, serialising only the dirty accounts' runs
        if r.account_id in dirty:
            part(r.account_id)["runs"][rid] = r.to_dict()
    for rid, rec in st.runs.items():
        if rec.account_id in dirty:
            p = part(rec.account_id)
            p["stitched"][rid] = asdict(rec)
            for w in rec.workloads:
                if st.workload_run.get(w) != rid:
                    continue
                for key in ("workload_run", "workload_end", "stopped", "workload_fp"):
                    entries = getattr(st, key)
                    if w in entries:
                        p[key][w] = entries[w]
    for aid in dirty:
        if aid in engine._emitted_by:
            part(aid)["emitted"] = sorted(engine._emitted_by[aid])
        if aid in engine.named_owners:
            part(aid)["named_owners"] = list(engine.named_owners[aid])
        journal = engine.journal_to_dict(aid)
        if journal is not None:
            part(aid)["journal"] = journal
    return shared, dict(parts), sorted(dirty - set(parts))


def mark_all_dirty(engine: DetectEngine) -> None:
    """The next `split_dirty` returns every part and the shared one (e.g. nothing of this state is written)."""
    engine._dirty |= (set(engine.accounts) | set(engine.cips) | {r.account_id for r in engine.runs.values()}
                    | {r.account_id for r in engine.stitcher.runs.values()} | set(engine.emitted.values())
                    | set(engine.named_owners) | set(engine._journal))
    engine._shared_sent = None


def from_split(shared: Mapping[str, Any], parts: Mapping[str, Mapping[str, Any]], policy: Policy,
               classifier: WorkloadClassifier | None = None,
               detectors: Iterable[Detector] | None = None) -> DetectEngine:
    sh = shared.get("stitcher", {})
    st: dict[str, Any] = {**sh, "runs": {}, **{k: dict(sh.get(k, {})) for k in
                                                ("workload_run", "workload_end", "stopped", "workload_fp")}}
    d: dict[str, Any] = {"window_s": shared.get("window_s", 60.0), "watermark": shared.get("watermark", 0.0),
                         "errors": shared.get("errors", {}), "owners": shared.get("owners", {}),
                         "stitcher": st, "runs": {}, "accounts": {}, "cips": {}, "emitted": {},
                         "named_owners": {}}
    for aid, p in parts.items():
        if p.get("account") is not None:
            d["accounts"][aid] = p["account"]
        if p.get("cip") is not None:
            d["cips"][aid] = p["cip"]
        d["runs"].update(p.get("runs", {}))
        st["runs"].update(p.get("stitched", {}))
        for key in ("workload_run", "workload_end", "stopped", "workload_fp"):
            st[key].update(p.get(key, {}))
        d["emitted"].update(dict.fromkeys(p.get("emitted", []), aid))
        if p.get("named_owners"):
            d["named_owners"][aid] = list(p["named_owners"])
    engine = DetectEngine.from_dict(d, policy, classifier, detectors)
    for aid, p in parts.items():
        if p.get("journal"):
            engine.load_journal(aid, p["journal"])
    return engine
