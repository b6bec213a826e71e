"""Change in scope (15 CFR 7.308): an account's use moves from below the threshold to above it.

Two developments count: a reservation that grows from below to past the threshold potential, and a run that
crosses while the account's earlier use was below (inference, small or non-training work). The detection says
what changed and when; it explains a case rather than opening one (outcome 'info'), except that a grown
reservation of a foreign account opens needs_review when the policy says `reservation_opens_case`.

Beside those threshold rules, a per-account baseline of use (detectors/scope_baseline.py: device scale,
P(training), compute rate) reports a change of use before any threshold is near: reason `use_changed` (what
moved, x-fold, dated to when it began) and `reservation_outgrew_use`. Both are always 'info'. The baseline is
the one piece of state this detector keeps, in AccountState.activity["scope_baseline"]. The engine's update step
calls `update(state, event)` before any detector reads the event: it applies the pure transition
(scope_baseline.step) and keeps the changes that event confirmed, tagged with the event. `detect` only reads.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, ClassVar

from detectors.base import DetectContext, Detector
from detectors.fields import field_of as _g
from detectors.fields import finite_or_zero as _num
from detectors.scope_baseline import Change, Observation, Reserved, ScopeParams, WindowUse, step
from schemas.allocation import AllocationEvent
from schemas.detection import Detection
from schemas.ids import content_id

BASELINE_KEY = "scope_baseline"
CONFIRMED_KEY = "confirmed"  # in the baseline's dict: {"event": key, "changes": [Change dicts]}
_RESERVATION_KINDS = ("reserved", "reservation_changed", "reservation_released")


class ChangeInScope(Detector):
    id = "change_in_scope"
    version = 2
    severity = "medium"
    maturity = "experimental"
    description = "An account's use grows from below the training threshold to above it, or leaves its baseline."
    example_params: ClassVar[dict[str, Any]] = {"min_baseline_s": 1800.0, "dwell": 3}
    reads_run_crossing = True  # scope_grew: a run crossing after use below the threshold

    def __init__(self, **params: Any) -> None:
        self.params = ScopeParams(**params)

    def update(self, state: DetectContext, event: Any) -> None:
        """The engine's update step: fold `event` into the account's baseline and keep what it confirmed."""
        acct = state.account
        obs = self._observation(state, event)
        if acct is None or obs is None:
            return
        new, changes = step(acct.activity.get(BASELINE_KEY), obs, self._params(state))
        new[CONFIRMED_KEY] = {"event": obs.key(), "changes": [c.to_dict() for c in changes]}
        acct.activity[BASELINE_KEY] = new

    def detect(self, state: DetectContext, event: Any) -> list[Detection]:
        acct = state.account
        if acct is None:
            return []
        return self._baseline(state, event) + self._threshold(state, event)

    # -- the baseline of use ----------------------------------------------------------------------------------

    def _params(self, state: DetectContext) -> ScopeParams:
        u = state.policy.uncertainty
        return replace(self.params, p_high=u.p_training_high, p_low=u.p_training_low)

    @staticmethod
    def _observation(state: DetectContext, event: Any) -> Observation | None:
        """What `event` says about the account's use (None: nothing for the baseline)."""
        acct = state.account
        if acct is None:
            return None
        if isinstance(event, AllocationEvent):
            if event.kind not in _RESERVATION_KINDS:
                return None
            return Reserved(event.ts, sum(_num(r.get("count")) for r in acct.reservations.values()), event.event_id)
        if state.run is None or _g(event, "window_end") is None:
            return None
        verdict = state.verdict
        p = verdict.p_training if verdict is not None else _num((state.run.verdict or {}).get("p_training", 0.5))
        devices = _num(_g(event, "device_count")) or float(len(_g(event, "devices") or ()))
        return WindowUse(end=_num(_g(event, "window_end")), window_s=state.window_s,
                         workload_id=str(_g(event, "workload_id")), devices=devices, flop=_num(_g(event, "flop")),
                         p_training=p)

    def _baseline(self, state: DetectContext, event: Any) -> list[Detection]:
        """The changes the update step confirmed for this very event (pure: reads the account, writes nothing)."""
        assert state.account is not None
        obs = self._observation(state, event)
        confirmed = (state.account.activity.get(BASELINE_KEY) or {}).get(CONFIRMED_KEY) or {}
        if obs is None or confirmed.get("event") != obs.key():
            return []
        return [self._change_detection(state, Change(**c)) for c in confirmed["changes"]]

    def _change_detection(self, state: DetectContext, c: Change) -> Detection:
        run = state.run if c.kind == "use" else None
        reason = "use_changed" if c.kind == "use" else "reservation_outgrew_use"
        evidence = {"what": c.summary(), "changes": c.changes, "from": c.at, "confirmed_at": c.confirmed_at,
                    "before": {"baseline": c.before}, "after": c.after,
                    "reservations": dict(state.account.reservations) if state.account else {}}
        det = self.detection(state, outcome="info", reason=reason, event_time=c.at, evidence=evidence,
                             run_id=run.run_id if run else None,
                             workload_ids=list(state.run_workloads) if run else None,
                             summary=f"account {state.account_id}: use changed from {c.at:.0f}: {c.summary()}")
        # One account may change more than once (and a reservation has no run): the start time keeps ids apart.
        return det.model_copy(update={"detection_id": content_id("det", det.detection_id, c.kind, c.at)})

    # -- threshold crossings ----------------------------------------------------------------------------------

    def _threshold(self, state: DetectContext, event: Any) -> list[Detection]:
        acct = state.account
        assert acct is not None
        th = state.policy.thresholds.training_ops
        if isinstance(event, AllocationEvent):
            if not (0.0 < acct.potential_prev < th <= acct.potential):
                return []
            opens = state.policy.thresholds.reservation_opens_case and state.determination.is_foreign
            evidence = {"what": "reservation grew past the threshold potential",
                        "before": {"max_possible_flop": acct.potential_prev},
                        "after": {"max_possible_flop": acct.potential, "at": acct.potential_at},
                        "reservations": dict(acct.reservations), "threshold_ops": th}
            return [self.detection(state, outcome="needs_review" if opens else "info", reason="reservation_grew",
                                   event_time=event.ts, evidence=evidence,
                                   summary=f"account {state.account_id}: reservation potential "
                                           f"{acct.potential_prev:.3g} -> {acct.potential:.3g} FLOP (threshold "
                                           f"{th:.3g})")]
        run = state.run
        if run is None or not run.crossed or (run.verdict or {}).get("band", "uncertain") == "not_training":
            return []
        prior = [p for rid, p in acct.activity.get("runs", {}).items()
                 if rid != run.run_id and not p.get("crossed") and p.get("first", 0.0) < run.crossed["at"]]
        own_before = {b: n for b, n in run.bands_seen.items() if b != "training"}
        if not prior and not own_before:
            return []
        evidence = {"what": "use moved from below the threshold to a run over it",
                    "before": {"runs": prior, "this_run_bands_before": own_before,
                               "first_activity_at": acct.first_event},
                    "after": {"run_id": run.run_id, "crossing": dict(run.crossed), "used_flop": run.used,
                              "band": (run.verdict or {}).get("band")},
                    "threshold_ops": th}
        return [self.detection(state, outcome="info", reason="scope_grew", event_time=run.crossed["at"],
                               evidence=evidence, run_id=run.run_id, workload_ids=list(state.run_workloads),
                               summary=f"account {state.account_id}: from {len(prior)} earlier run(s) below the "
                                       f"threshold to run {run.run_id} crossing it")]
