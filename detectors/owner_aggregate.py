"""Owner aggregation (case semantics rule 4): one foreign beneficial owner's runs summed across its accounts.

The engine describes each run of an account with foreign owners as a *contribution* per owner: the run's latest
cumulative figures (replacing, never adding to, what the owner had for that run, so a replay is harmless), plus
what the detection needs about the account (its foreign-person determination and CIP notes). `OwnerAggregator`
applies contributions and retractions (the CIP no longer names the owner) to per-owner state and emits the
owner-aggregate detection when the sum first crosses. In process the engine calls it directly; on Kafka the
contributions travel on a topic keyed by owner to an agent that holds the owners (pipeline/detect/faust_app.py),
so accounts of one owner on different partitions are summed all the same.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable, Mapping
from typing import Any

from detectors.base import DetectContext, Detector, inquiry_text
from detectors.foreign_person import ForeignDetermination
from detectors.state import REDECIDE_S, RUN_IDS_K, AccountState, OwnerState
from schemas.detection import Detection
from schemas.policy import Policy

#: the figures of a run an owner's log keeps per window end (enough to find the crossing again: owner_crossing)
_FIGURES = ("used", "used_low", "used_high", "rate", "t", "reserved_until", "own_case", "band", "basis")


def owner_crossing(owner: OwnerState, *, threshold: float, count_projected: bool, t: float,
                   account_id: str) -> dict[str, Any] | None:
    """Sum the owner's training (or uncertain) runs that have no case of their own; the crossing, or None.

    Projection per run: rate x remaining reservation of that run's account, as for a single run (rule 3).
    """
    runs = {k: r for k, r in owner.runs.items() if not r.get("own_case") and r.get("band") != "not_training"}
    if len(owner.accounts) < 2 or not runs:
        return None
    used = sum(r["used"] for r in runs.values())
    projected = used + sum(r["rate"] * max(0.0, r["reserved_until"] - r["t"]) for r in runs.values()
                           if r.get("reserved_until") is not None)
    if used >= threshold:
        reason = "used"
    elif count_projected and projected >= threshold:
        reason = "projected"
    else:
        return None
    return {"at": t, "basis": reason, "account_id": account_id, "used": used,
            "used_low": sum(r["used_low"] for r in runs.values()),
            "used_high": sum(r["used_high"] for r in runs.values()),
            "projected": projected, "runs": {k: dict(r) for k, r in runs.items()},
            "all_training": all(r.get("band") == "training" for r in runs.values())}


def combined_run(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The owner's runs described as one (evidence key `run`): footprints add up (the runs may overlap in time),
    the span is first start to last end, the id lists are bounded."""
    descs = [r.get("run") or {} for r in runs.values()]
    accel: dict[str, int] = {}
    for d in descs:
        for m, n in (d.get("accelerators") or {}).items():
            accel[m] = accel.get(m, 0) + n
    starts = [d["start"] for d in descs if d.get("start") is not None]
    ends = [d["end"] for d in descs if d.get("end") is not None]
    return {"run_id": None, "run_ids": sorted(runs), "accelerators": accel,
            "device_count": sum(d.get("device_count") or 0 for d in descs) or None,
            "node_count": sum(d.get("node_count") or 0 for d in descs) or None,
            "start": min(starts) if starts else None, "end": max(ends) if ends else None,
            "job_ids": sorted({j for d in descs for j in d.get("job_ids") or []})[:RUN_IDS_K],
            "workload_ids": sorted({w for d in descs for w in d.get("workload_ids") or []})[:RUN_IDS_K]}


def combined_basis(runs: dict[str, dict[str, Any]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in runs.values():
        for b, n in (r.get("basis") or {}).items():
            out[b] = out.get(b, 0) + n
    return out


class OwnerAggregate(Detector):
    id = "owner_aggregate"
    version = 1
    severity = "high"
    maturity = "test"
    description = "A foreign beneficial owner's runs across several accounts together reach the training threshold."
    owner_level = True  # run by OwnerAggregator when an owner's sum crosses, never on one account's input

    def detect(self, state: DetectContext, event: Any) -> list[Detection]:
        owner = state.owner
        if owner is None or not owner.crossed or owner.crossed.get("account_id") != state.account_id:
            return []
        c = owner.crossed
        outcome = "reportable" if c["all_training"] else "needs_review"
        evidence: dict[str, Any] = {
            "threshold_ops": state.policy.thresholds.training_ops, "beneficial_owner_id": owner.owner_id,
            "accounts": list(owner.accounts), "used_flop": c["used"], "used_flop_low": c["used_low"],
            "used_flop_high": c["used_high"], "projected_flop": c["projected"], "crossing": c["basis"],
            "basis": combined_basis(c["runs"]), "run": combined_run(c["runs"]),
            # each run's own first workloads only: the detection lists the owner's (up to WORKLOAD_IDS_K), and one
            # message must stay bounded however many accounts an owner splits its runs over
            "runs": {k: {**r, "workloads": list(r.get("workloads") or [])[:RUN_IDS_K]} for k, r in c["runs"].items()},
        }
        if c.get("redecided_from"):  # a contribution out of event-time order moved the crossing made before
            evidence["redecided_from"] = c["redecided_from"]
        if outcome == "needs_review":
            evidence["suggested_inquiry"] = inquiry_text(state.account_id, None, c["used"], c["projected"])
        workloads = sorted({w for r in c["runs"].values() for w in r.get("workloads", [])})
        # a run lists its first WORKLOAD_IDS_K workloads and counts them all (a contribution before the count: its list)
        total = sum(r.get("workload_count", len(r.get("workloads", []))) for r in c["runs"].values())
        summary = (f"beneficial owner {owner.owner_id}: {len(c['runs'])} runs over {len(owner.accounts)} accounts "
                   f"{'used' if c['basis'] == 'used' else 'are projected to use'} "
                   f">= {state.policy.thresholds.training_ops:.3g} FLOP -> {outcome}")
        return [self.detection(state, outcome=outcome, reason="owner_aggregate", event_time=c["at"], summary=summary,
                               evidence=evidence, beneficial_owner_id=owner.owner_id, workload_ids=workloads,
                               workloads_total=total)]


def contribution(owner_id: str, account_id: str, run_id: str, entry: dict[str, Any], *, t: float,
                 start: float | None, foreign_since: float | None, determination: dict[str, Any],
                 cip_notes: list[dict[str, Any]]) -> dict[str, Any]:
    """One run's latest cumulative figures (`entry`, as OwnerState.runs holds them) for one owner, as plain data."""
    return {"kind": "contribution", "owner_id": owner_id, "account_id": account_id, "run_id": run_id, "entry": entry,
            "t": t,
            "start": start, "foreign_since": foreign_since, "determination": determination,
            "cip_notes": cip_notes}


def retraction(owner_id: str, account_id: str) -> dict[str, Any]:
    """The account no longer counts for the owner (its CIP stopped naming it as a foreign owner)."""
    return {"kind": "retract", "owner_id": owner_id, "account_id": account_id}


def membership(owner_id: str, account_id: str) -> dict[str, Any]:
    """The account's CIP names the owner: an aggregator in event time waits for the account's partition."""
    return {"kind": "member", "owner_id": owner_id, "account_id": account_id}


def tick(owner_id: str) -> dict[str, Any]:
    """Processing time passed (sent by the faust app's timer): EventTimeOwners re-checks the owner's held messages."""
    return {"kind": "tick", "owner_id": owner_id}


def message_kind(c: Mapping[str, Any]) -> str:
    """contribution | retract | member | mark | tick: every message names its kind (schemas/owner.py)."""
    return str(c["kind"])


def stamped(messages: list[dict[str, Any]], partition: int, reached: dict[str, float],
            floor: float) -> list[dict[str, Any]]:
    """Owner messages as one source partition sends them to EventTimeOwners, in the order the engine made them:
    each with `wm`, how far its account had got in the partition's stream at that point (`reached`, account ->
    latest window end already sent, advanced here by each contribution's `t`; floored at `floor`, the partition's
    watermark minus the allowed lateness). Stamp each message when it is made, not with the time at the end of a
    batch: that claim would reach the owners agent before the batch's later messages of the account."""
    out: list[dict[str, Any]] = []
    for c in messages:
        aid = c["account_id"]
        if message_kind(c) == "contribution":
            reached[aid] = max(reached.get(aid, c["t"]), c["t"])
        out.append({**c, "partition": partition, "wm": max(reached.get(aid, floor), floor)})
    return out


def owner_level(detectors: Iterable[Detector]) -> list[Detector]:
    """The detectors an OwnerAggregator runs (`Detector.owner_level`); the engine runs the others."""
    return [d for d in detectors if d.owner_level]


class OwnerAggregator:
    """Per-owner sums of contributions; the owner-level detections when one first crosses. Pure, event time."""

    def __init__(self, policy: Policy, window_s: float = 60.0,
                 detector: Detector | Iterable[Detector] | None = None, errors: dict[str, int] | None = None) -> None:
        self.policy = policy
        self.window_s = window_s
        # The owner-level detectors to run (one, several, or none: owner sums are kept, no detection is made).
        self.detectors = [detector] if isinstance(detector, Detector) else list(detector or ())
        self.owners: dict[str, OwnerState] = {}
        self.errors = errors if errors is not None else {}

    def apply(self, c: Mapping[str, Any]) -> list[Detection]:
        """Apply one contribution or retraction; the detection when this owner's sum first crosses, and again when a
        contribution that arrives out of event-time order moves the crossing (`_redecide`)."""
        kind = message_kind(c)
        if kind not in ("contribution", "retract"):  # memberships, marks, ticks only matter to EventTimeOwners
            return []
        oid, aid = c["owner_id"], c["account_id"]
        if kind == "retract":
            owner = self.owners.get(oid)
            if owner is not None and aid in owner.accounts:
                owner.accounts.remove(aid)
                owner.runs = {k: r for k, r in owner.runs.items() if r["account_id"] != aid}
                owner.base = {k: r for k, r in owner.base.items() if r["account_id"] != aid}
                owner.log = [e for e in owner.log if e["account_id"] != aid]
            return []
        owner = self.owners.get(oid)
        if owner is None:
            owner = self.owners[oid] = OwnerState(oid)
        if aid not in owner.accounts:
            owner.accounts.append(aid)
            owner.accounts.sort()
        owner.account_ctx[aid] = {"determination": c["determination"], "cip_notes": list(c.get("cip_notes") or []),
                                  "foreign_since": c.get("foreign_since")}
        late = bool(owner.log) and float(c["t"]) < owner.log[-1]["t"]
        before = sum(r["used"] for r in owner.runs.values() if not r.get("own_case"))
        entry, rid = dict(c["entry"]), c["run_id"]
        if rid not in owner.runs or entry.get("t", 0.0) >= owner.runs[rid].get("t", 0.0):
            owner.runs[rid] = entry  # the run's latest figures (a re-sent older one does not replace them)
        self._log(owner, c)
        if late:
            return self._redecide(owner)
        if owner.crossed is not None:
            return []
        x = self._crossing(owner, owner.runs, before, c)
        return self._detect(owner, x) if x is not None else []

    def _crossing(self, owner: OwnerState, runs: dict[str, dict[str, Any]], before: float,
                  c: Mapping[str, Any]) -> dict[str, Any] | None:
        """The crossing that contribution `c` makes with the owner's runs as `runs` (after it), or None. A crossing
        by use is interpolated within c's window from `before` (the sum before it); never before the account's
        customer became foreign."""
        th = self.policy.thresholds
        end, start = float(c["t"]), c.get("start")
        view = OwnerState(owner.owner_id, accounts=owner.accounts, runs=runs)
        x = owner_crossing(view, threshold=th.training_ops, count_projected=th.count_projected, t=end,
                           account_id=c["account_id"])
        if x is None:
            return None
        if x["basis"] == "used" and start is not None and x["used"] > before:
            frac = min(1.0, max(0.0, (th.training_ops - before) / (x["used"] - before)))
            x["at"] = start + frac * (end - start)
        foreign_since = owner.account_ctx.get(c["account_id"], {}).get("foreign_since", c.get("foreign_since"))
        if foreign_since is not None:
            x["at"] = max(x["at"], foreign_since)
        return x

    def _log(self, owner: OwnerState, c: Mapping[str, Any]) -> None:
        """Contribution `c` into the owner's log in event-time order (one entry per run and window end: a later one
        replaces, as re-decided figures do); entries older than REDECIDE_S behind the newest fold into `base`."""
        e = {"run_id": c["run_id"], "account_id": c["account_id"], "t": float(c["t"]), "start": c.get("start"),
             "entry": {k: c["entry"].get(k) for k in _FIGURES}}
        log = owner.log
        at = next((i for i, x in enumerate(log) if (x["run_id"], x["t"]) == (e["run_id"], e["t"])), None)
        if at is not None:
            log[at] = e
        else:
            log.insert(bisect_right([x["t"] for x in log], e["t"]), e)
        cut = log[-1]["t"] - REDECIDE_S
        while log and log[0]["t"] < cut:
            old = log.pop(0)
            owner.base[old["run_id"]] = {**old["entry"], "account_id": old["account_id"]}

    def _redecide(self, owner: OwnerState) -> list[Detection]:
        """The owner's log applied again in event-time order from its base: the first crossing it makes. A crossing
        found at another time (or through another account) than the one made replaces it and is detected again (the
        case book takes the new version's time); none found, or one made before the log's first window: the one made
        stands."""
        first = owner.log[0]
        if owner.crossed is not None and owner.crossed["at"] < (first["start"] if first["start"] is not None
                                                                else first["t"]):
            return []  # it crossed before what the log holds: nothing there can move it
        runs = {k: dict(r) for k, r in owner.base.items()}
        for e in owner.log:
            before = sum(r["used"] for r in runs.values() if not r.get("own_case"))
            runs[e["run_id"]] = {**owner.runs.get(e["run_id"], {}), **e["entry"], "account_id": e["account_id"]}
            x = self._crossing(owner, runs, before, e)
            if x is None:
                continue
            was = owner.crossed
            if was is not None and abs(x["at"] - was["at"]) < 1e-6 and x["account_id"] == was["account_id"]:
                return []
            x["runs"] = {k: {**owner.runs.get(k, {}), **r} for k, r in x["runs"].items()}
            if was is not None:
                x["redecided_from"] = {"at": was["at"], "account_id": was["account_id"]}
            return self._detect(owner, x)
        return []

    def _detect(self, owner: OwnerState, x: dict[str, Any]) -> list[Detection]:
        """Record crossing `x` and run the owner-level detectors on it."""
        owner.crossed = x
        if not self.detectors:
            return []
        aid = x["account_id"]
        ctx_d = owner.account_ctx.get(aid, {})
        ctx = DetectContext(self.policy, self.window_s, aid, ForeignDetermination(**ctx_d["determination"]),
                            account=AccountState(aid, cip_notes=list(ctx_d.get("cip_notes") or [])), owner=owner,
                            knowledge_floor=ctx_d.get("foreign_since"))
        out: list[Detection] = []
        for d in self.detectors:
            try:
                out += d.detect(ctx, None)
            except Exception:  # errors are data, as in the engine: count it, never stop the stream
                self.errors[d.id] = self.errors.get(d.id, 0) + 1
        return out

    def to_dict(self) -> dict[str, Any]:
        return {k: v.to_dict() for k, v in self.owners.items()}

    def load(self, d: Mapping[str, Any]) -> None:
        self.owners = {k: OwnerState.from_dict(v) for k, v in d.items()}


PENDING_MAX = 2000  # per owner: held contributions beyond this are applied oldest first, as they come (counted)
#: Processing seconds without input after which a source partition counts as caught up (the faust app then sends
#: it as `QUIET`): the end of a finite input, or a partition that carries no data. Above the window period.
OWNER_IDLE_S = 120.0
#: A partition mark's claim for a source partition with no input for OWNER_IDLE_S: it has reached every event time.
QUIET = 1e18
#: How far behind its partition's watermark an account's window may still arrive and be ordered (ingest emits a
#: partition's windows in window order; partials of other telemetry partitions may trail by a window or two).
OWNER_SKEW_S = 120.0
#: The owner id of a partition mark: it is addressed to every owner of the owners partition it is sent to.
ALL_OWNERS = "*"


def partition_mark(partition: int, wm: float) -> dict[str, Any]:
    """Source partition `partition` has sent every owner message it will make for windows ending before `wm` (minus
    the skew). Sent to every owners partition after the messages it covers."""
    return {"kind": "mark", "owner_id": ALL_OWNERS, "partition": partition, "wm": wm, "marks": {}}


class EventTimeOwners:
    """OwnerAggregator fed from several source partitions (the faust `owners` agent), in event time.

    The in-process runner applies owner messages in the order the one stream makes them (event time). On Kafka an
    owner's accounts sit on different source partitions that progress at different speeds, so messages are held and
    applied in event-time order up to a horizon: the slowest source partition's watermark, less `skew_s`. Each source
    partition sends a *partition mark* (`partition_mark`: its stage watermark) to every owners partition after the
    messages it covers, so on an owners partition a mark is never ahead of that source's messages. The horizon waits
    for every source partition (`sources`), not only for the accounts an owner is known to have: an account whose CIP
    record naming the owner has not been applied yet on its (slower) partition is waited on all the same.

    A message's place (`at`) is its `t` (a retraction's: its `wm`), never before what its account had already sent
    the owner: a later revision of an older window carries the run's newer cumulative figures and must not be
    overwritten by messages it followed. Ties keep arrival order.

    The bound (ARCHITECTURE.md): a message that arrives behind the horizon already passed (a window trailing its
    partition's watermark by more than `skew_s`, a CIP record applied late, figures re-sent after a restart) is
    applied at once; the aggregator's log then re-decides the crossing in event-time order (`OwnerAggregator`), within
    REDECIDE_S. With windows in order that does not happen, and the sum crosses at the window the in-process runner
    finds, or at another account's window of the same minute (knowledge_at within one window).

    Liveness: a source partition without input for `detect.owner_idle_s` sends `QUIET` (the faust app): it no longer
    holds anything back until its next real mark.
    """

    def __init__(self, agg: OwnerAggregator, sources: int = 1, skew_s: float = OWNER_SKEW_S,
                 pending_max: int = PENDING_MAX, idle_s: float = OWNER_IDLE_S) -> None:
        self.agg = agg
        self.sources = sources
        #: processing seconds without input after which the transport marks a source partition QUIET (Liveness)
        self.idle_s = idle_s
        self.skew_s = skew_s
        self.pending_max = pending_max
        #: owner id -> {"k": owners partition, "marks": {account: latest place sent}, "pending": [message]}
        self.clocks: dict[str, dict[str, Any]] = {}
        #: owners partition -> {source partition: its latest partition mark}
        self.parts: dict[str, dict[str, float]] = {}

    def receive(self, m: Mapping[str, Any], k: int = 0) -> list[Detection]:
        """One message as it arrived on owners partition `k`. A partition mark releases every owner of `k` loaded."""
        oid, kind = m["owner_id"], message_kind(m)
        if kind == "mark" and oid == ALL_OWNERS:
            self.parts.setdefault(str(k), {})[str(m["partition"])] = float(m["wm"])
            out: list[Detection] = []
            for clock in self.clocks.values():
                if clock["k"] == k:
                    out += self._release(clock)
            return out
        if kind in ("tick", "mark", "member"):  # marks per owner: an older protocol; memberships need no waiting
            clock = self.clocks.get(oid)
            return self._release(clock) if clock is not None else []
        if m.get("wm") is None:  # not stamped by a transport (no partition clock): applied as it comes
            return self.agg.apply(m)
        clock = self.clocks.setdefault(oid, {"k": k, "marks": {}, "pending": []})
        clock["k"] = k
        aid, wm = m["account_id"], float(m["wm"])
        t = float(m.get("t", wm))
        at = max(t, clock["marks"].get(aid, float("-inf")))
        clock["marks"][aid] = at
        clock["pending"].append({**m, "t": m.get("t", wm), "at": at})
        if kind == "retract":
            clock["marks"].pop(aid, None)
        return self._release(clock)

    def horizon(self, k: int) -> float:
        """Event time up to which owners partition `k` has every source partition's messages."""
        marks = self.parts.get(str(k), {})
        return min(marks.get(str(p), float("-inf")) for p in range(self.sources)) - self.skew_s

    def _release(self, clock: dict[str, Any]) -> list[Detection]:
        h = self.horizon(clock["k"])
        # Equal places keep arrival order (stable): on one partition that is the order the replay applies them in.
        pending = sorted(clock["pending"], key=lambda c: c["at"])
        n_ready = sum(1 for c in pending if c["at"] <= h)
        over = len(pending) - n_ready - self.pending_max
        if over > 0:  # a partition far behind: bound the state, fall back to arrival order for the oldest
            n_ready += over
            self.agg.errors["owner_pending_overflow"] = self.agg.errors.get("owner_pending_overflow", 0) + over
        clock["pending"] = pending[n_ready:]
        out: list[Detection] = []
        for c in pending[:n_ready]:
            out += self.agg.apply(c)
        return out

    def held(self, oid: str) -> bool:
        """Whether the owner has messages waiting for the horizon."""
        clock = self.clocks.get(oid)
        return bool(clock and clock["pending"])

    def owner_to_dict(self, oid: str) -> dict[str, Any] | None:
        owner, clock = self.agg.owners.get(oid), self.clocks.get(oid)
        if owner is None and clock is None:
            return None
        return {"owner": owner.to_dict() if owner is not None else None, "clock": clock}

    def load_owner(self, oid: str, d: Mapping[str, Any]) -> None:
        if d.get("owner") is not None:
            self.agg.owners[oid] = OwnerState.from_dict(d["owner"])
        if d.get("clock") is not None:
            self.clocks[oid] = d["clock"]

    def parts_to_dict(self, k: int) -> dict[str, float]:
        return dict(self.parts.get(str(k), {}))

    def load_parts(self, k: int, d: Mapping[str, float]) -> None:
        self.parts[str(k)] = {str(p): float(v) for p, v in d.items()}

    def clear(self) -> None:
        """Forget the owners loaded (the faust agent reloads those a batch touches); partition marks are kept."""
        self.agg.owners.clear()
        self.clocks.clear()
