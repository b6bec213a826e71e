"""A per-account baseline of use and a change test that says what changed and from when (change in scope).

Per account, the workload-windows of one window end are folded into one bucket: device scale (devices in use),
P(training) (device-weighted mean of the runs' classifier verdicts) and compute rate (FLOP/s). The baseline is an
exponentially weighted mean of buckets (log scale, log rate, linear P). Once it covers `min_baseline_s` of use,
a bucket that is training-like (P >= p_low) and moves away from it (scale x-fold, P from below one half into
the training band, or rate x-fold from a baseline that was not training-like) starts a candidate change;
`dwell` such buckets in a row confirm it, and the change is dated to the first of them. A confirmed change
re-baselines to the new level, so one development alarms once (and when it was confirmed while its P(training)
was still undecided, that P firming up within `min_baseline_s` is adopted, not alarmed again). Candidate buckets
are kept out of the baseline, so it stays the "before" of the report. While a dwell is open, a bucket whose devices
still pass the scale test but whose P dips under p_low is held (neither folded nor ending the dwell; at most `dwell`
per dwell): a young run's P flickers across p_low, and folding those dips would absorb the grown devices unalarmed.
Reservations are compared with the baseline's scale: reserved devices x-fold the devices in use is a change too.

Event time only; state is plain data (to_dict / from_dict) kept in AccountState.activity. `step()` is the pure
transition the engine's update step applies: (state, one observation) -> (next state, the changes it confirmed).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

#: Levels of use kept for a reservation read late (ScopeBaseline.levels): the first and the newest moves.
LEVELS_K = 32
#: A move of the baseline's log scale that is kept as a new level (5 %: the reservation test is x-fold).
LEVEL_STEP = 0.05
RATE_FLOOR = 1e12  # FLOP/s: below this a rate is "idle", so x-fold from nothing is not a change


@dataclass(frozen=True, slots=True)
class ScopeParams:
    min_baseline_s: float = 1800.0  # use the baseline must cover before it judges (30 min)
    dwell: int = 3  # consecutive buckets over the bar to confirm a change
    alpha: float = 0.05  # EWMA weight of one bucket
    scale_factor: float = 4.0
    min_devices_added: int = 4  # 1 -> 4 devices is not a change of scope; 2 -> 16 is
    rate_factor: float = 10.0
    p_high: float = 0.8  # the training band (the policy's p_training_high)
    p_low: float = 0.2  # below this the new level is clearly not training: no alarm


@dataclass(frozen=True, slots=True)
class Change:
    """One confirmed change: what moved (dimension, before, after, factor) and from when."""

    kind: str  # use | reservation
    at: float  # event time the change began
    confirmed_at: float  # event time at which the change was known (the window end that closed its last bucket)
    changes: list[dict[str, Any]]
    before: dict[str, float]
    after: dict[str, float]

    def summary(self) -> str:
        parts = []
        for c in self.changes:
            if c["what"] == "p_training":
                parts.append(f"from inference-like to training-like (P(training) {c['before']:.2f} -> "
                             f"{c['after']:.2f})")
            else:
                parts.append(f"{c['what']} {c['factor']:.1f}x ({c['before']:.3g} -> {c['after']:.3g})")
        return "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _bucket_of(wins: dict[str, list[float]], window_s: float) -> tuple[float, float, float]:
    """(devices, P(training) device-weighted, FLOP/s) of one account-window."""
    devices = sum(w[0] for w in wins.values())
    flop = sum(w[1] for w in wins.values())
    weights = [max(w[0], 1.0) for w in wins.values()]
    p = sum(wt * w[2] for wt, w in zip(weights, wins.values(), strict=True)) / sum(weights)
    return devices, p, flop / window_s


@dataclass(frozen=True, slots=True)
class WindowUse:
    """One workload-window of the account: its end, devices, FLOP and the run's P(training)."""

    end: float
    window_s: float
    workload_id: str
    devices: float
    flop: float
    p_training: float

    def key(self) -> str:
        return f"w|{self.workload_id}|{self.end!r}"


@dataclass(frozen=True, slots=True)
class Reserved:
    """Devices the account holds reserved after one reservation event."""

    t: float
    devices: float
    event_id: str

    def key(self) -> str:
        return f"r|{self.event_id}"


Observation = WindowUse | Reserved


def step(state: dict[str, Any] | None, obs: Observation, params: ScopeParams) -> tuple[dict[str, Any], list[Change]]:
    """The baseline after `obs` (a new dict; `state` is left as it was) and the changes `obs` confirmed."""
    base = ScopeBaseline.from_dict(state)
    if isinstance(obs, WindowUse):
        changes = base.observe_window(end=obs.end, window_s=obs.window_s, workload_id=obs.workload_id,
                                      devices=obs.devices, flop=obs.flop, p_training=obs.p_training, params=params)
    else:
        c = base.observe_reservation(t=obs.t, reserved_devices=obs.devices, params=params)
        changes = [c] if c else []
    return base.fields(), changes  # `base` is this call's own: from_dict copied every container it holds


@dataclass(slots=True)
class ScopeBaseline:
    covered_s: float = 0.0  # use folded into the baseline (seconds of windows)
    since: float | None = None  # start of the baseline's use
    log_scale: float = 0.0
    p_training: float = 0.0
    log_rate: float = 0.0
    pending: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # repr(end) -> wid -> [dev, flop, p]
    candidate: list[list[float]] = field(default_factory=list)  # [start, end, devices, p, rate] over the bar
    latest_end: float = 0.0
    reserved: float = 0.0  # devices reserved now
    changes: int = 0
    #: Until this event time the last change's P(training) is still firming up (it was confirmed between p_low and
    #: p_high, e.g. on devices while the new run's verdict was young): a later move in P alone is that run's verdict
    #: settling, adopted into the baseline, not a second development.
    p_firming_until: float = 0.0
    #: Dips under p_low held in the open dwell (grown devices, P flickering): bounded by `dwell`, so a run that stays
    #: under p_low still ends the dwell and is folded as before. 0 in state saved before this field existed.
    held: int = 0
    #: [window end, log scale] where the established baseline's scale first stood and then moved by LEVEL_STEP (the
    #: first and the newest LEVELS_K - 1), and when it became established: a reservation read after later windows
    #: (held back past the engine's journal) is compared with the use of its own time, as in order.
    levels: list[list[float]] = field(default_factory=list)
    established_at: float | None = None

    # -- plain data ------------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Plain data sharing no container with this object."""
        d = self.fields()
        d["pending"] = {k: {w: list(x) for w, x in v.items()} for k, v in self.pending.items()}
        d["candidate"], d["levels"] = [list(c) for c in self.candidate], [list(c) for c in self.levels]
        return d

    def fields(self) -> dict[str, Any]:
        """Plain data holding this object's containers (no copy). `step` returns this for the object it made: the
        deep copy `dataclasses.asdict` made on every window was O(workloads) per window (`pending` lists every
        workload of a window end), 19 of 24 s for a 1,500-workload run's 3 windows (benchmarks/large_run.py)."""
        return {f: getattr(self, f) for f in self.__dataclass_fields__}

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> ScopeBaseline:
        if not d:
            return cls()
        names = set(cls.__dataclass_fields__)
        # Copies of the nested containers: the caller's dict (engine state) is never changed through this object.
        kw = {k: v for k, v in d.items() if k in names}
        if "pending" in kw:
            kw["pending"] = {k: {w: list(x) for w, x in v.items()} for k, v in kw["pending"].items()}
        for k in ("candidate", "levels"):
            if k in kw:
                kw[k] = [list(c) for c in kw[k]]
        return cls(**kw)

    # -- views ----------------------------------------------------------------------------------------------

    @property
    def scale(self) -> float:
        return math.exp(self.log_scale)

    @property
    def rate(self) -> float:
        return math.exp(self.log_rate)

    def established(self, p: ScopeParams) -> bool:
        return self.covered_s >= p.min_baseline_s

    def level(self) -> dict[str, float]:
        return {"devices": self.scale, "p_training": self.p_training, "flop_per_s": self.rate,
                "covered_s": self.covered_s, "since": self.since if self.since is not None else 0.0}

    # -- inputs ---------------------------------------------------------------------------------------------

    def observe_window(self, *, end: float, window_s: float, workload_id: str, devices: float, flop: float,
                       p_training: float, params: ScopeParams) -> list[Change]:
        """One workload-window of the account (a re-delivered one replaces while its bucket is open); closed buckets
        are judged."""
        key = repr(float(end))
        if key not in self.pending and end < self.latest_end:
            # Its bucket was judged already (buckets close in window order): judging it again on this window alone
            # would fold that window end into the baseline twice. The engine re-decides a corrected window by
            # re-applying the account's inputs from before it (detectors/engine.py); older ones are dropped here.
            return []
        self.pending.setdefault(key, {})[workload_id] = [max(0.0, devices), max(0.0, flop),
                                                         min(1.0, max(0.0, p_training))]
        self.latest_end = max(self.latest_end, end)
        out: list[Change] = []
        # A bucket is closed once a later window end is seen (the ingest emits windows in watermark order).
        for k in sorted((k for k in self.pending if float(k) < self.latest_end), key=float):
            out += self._judge(float(k), window_s, self.pending.pop(k), params, known_at=self.latest_end)
            self._note_level(float(k), params)
        return out

    def _note_level(self, end: float, params: ScopeParams) -> None:
        """Keep the established level after the bucket ending at `end` was judged, when it moved (`levels`)."""
        if not self.established(params):
            return
        if self.established_at is None:
            self.established_at = end
        if not self.levels or abs(self.levels[-1][1] - self.log_scale) >= LEVEL_STEP:
            self.levels.append([end, self.log_scale])
            if len(self.levels) > LEVELS_K:
                del self.levels[1]

    def _scale_at(self, t: float) -> float | None:
        """The established baseline's scale at event time `t` (None: not established then), from `levels`: as the
        buckets judged before `t` left it (in order a bucket is judged once a later window end is seen)."""
        if self.established_at is None or t <= self.established_at or not self.levels:
            return None
        return math.exp(max((lv for lv in self.levels if lv[0] < t), key=lambda lv: lv[0],
                            default=self.levels[0])[1])

    def observe_reservation(self, *, t: float, reserved_devices: float, params: ScopeParams) -> Change | None:
        """Reserved devices now; a reservation x-fold the established use (and the previous reservation)."""
        before = self.reserved
        self.reserved = max(0.0, reserved_devices)
        # read after later windows (past the engine's journal): the use of its own time, as in order
        scale = self._scale_at(t) if t < self.latest_end else (self.scale if self.established(params) else None)
        if scale is None:
            return None
        ref = max(before, scale, 1.0)
        if self.reserved < params.scale_factor * ref or self.reserved - ref < params.min_devices_added:
            return None
        self.changes += 1
        change = {"what": "reserved_devices", "before": ref, "after": self.reserved, "factor": self.reserved / ref}
        return Change("reservation", t, t, [change], {**self.level(), "devices": scale},
                      {"reserved_devices": self.reserved})

    # -- the change test ------------------------------------------------------------------------------------

    def _fold(self, start: float, window_s: float, devices: float, p: float, rate: float, a: float) -> None:
        ls, lr = math.log(max(devices, 1.0)), math.log(max(rate, RATE_FLOOR))
        if self.covered_s == 0.0:
            self.log_scale, self.p_training, self.log_rate, self.since = ls, p, lr, start
        else:
            self.log_scale += a * (ls - self.log_scale)
            self.p_training += a * (p - self.p_training)
            self.log_rate += a * (lr - self.log_rate)
        self.covered_s += window_s

    def _judge(self, end: float, window_s: float, wins: dict[str, list[float]], params: ScopeParams, *,
               known_at: float) -> list[Change]:
        devices, p, rate = _bucket_of(wins, window_s)
        start = end - window_s
        if not self.established(params):
            # While the baseline is young, adapt fast (a plain mean) so it is the level of use, not of its start.
            self._fold(start, window_s, devices, p, rate, max(params.alpha, window_s / max(self.covered_s +
                                                                                           window_s, window_s)))
            return []
        moved = self._moved(devices, p, rate, params)
        if moved and end <= self.p_firming_until and all(m["what"] == "p_training" for m in moved):
            self.candidate, self.held = [], 0
            self._fold(start, window_s, devices, p, rate, params.alpha)
            self.p_training = p  # the firmed verdict is the new level's; nothing to alarm again
            return []
        if not moved and self.candidate and p < params.p_low and self._grown(devices, params) \
                and self.held < params.dwell:
            # A dip of the grown level under p_low inside the dwell (measured on scope seed 2's smi account: P 0.28,
            # 0.10, 0.37, 0.16, ...): held out of both the baseline and the dwell, so the flicker neither restarts
            # the dwell nor lifts the "before" level towards the new devices.
            self.held += 1
            return []
        if not moved:
            self.candidate, self.held = [], 0
            self._fold(start, window_s, devices, p, rate, params.alpha)
            return []
        self.candidate.append([start, end, devices, p, rate])
        if len(self.candidate) < params.dwell:
            return []
        cand, self.candidate, self.held = self.candidate, [], 0
        n = len(cand)
        # Scale and rate: the dwell's mean; P(training): its latest (a verdict firms up as the run's history grows).
        after = {"devices": sum(c[2] for c in cand) / n, "p_training": cand[-1][3],
                 "flop_per_s": sum(c[4] for c in cand) / n}
        what = self._moved(after["devices"], after["p_training"], after["flop_per_s"], params) or moved
        change = Change("use", cand[0][0], known_at, what, self.level(), after)  # known once its bucket closed
        # Re-baseline at the new level: the same development alarms once.
        self.log_scale = math.log(max(after["devices"], 1.0))
        self.p_training = after["p_training"]
        self.log_rate = math.log(max(after["flop_per_s"], RATE_FLOOR))
        self.since = cand[0][0]
        self.changes += 1
        undecided = params.p_low <= after["p_training"] < params.p_high
        self.p_firming_until = end + params.min_baseline_s if undecided else 0.0
        return [change]

    def _moved(self, devices: float, p: float, rate: float, params: ScopeParams) -> list[dict[str, Any]]:
        """The dimensions in which a training-like level left the baseline (empty: no change)."""
        if p < params.p_low:
            return []  # clearly not training: growth of inference is not a change of scope
        out: list[dict[str, Any]] = []
        scale = self.scale
        if self._grown(devices, params):
            out.append({"what": "devices", "before": scale, "after": devices, "factor": devices / scale})
        if self.p_training < 0.5 <= params.p_high <= p:
            out.append({"what": "p_training", "before": self.p_training, "after": p,
                        "factor": p / max(self.p_training, 1e-3)})
        base_rate = self.rate
        # Rate alone moves with duty cycles and checkpoints of training already under way: it counts only when
        # the baseline was not training-like (idle or inference becoming busy).
        if self.p_training < 0.5 and rate >= params.rate_factor * base_rate:
            out.append({"what": "flop_per_s", "before": base_rate, "after": rate, "factor": rate / base_rate})
        return out

    def _grown(self, devices: float, params: ScopeParams) -> bool:
        """Devices x-fold (and +min_devices_added) the baseline's scale."""
        scale = self.scale
        return devices >= params.scale_factor * scale and devices - scale >= params.min_devices_added
