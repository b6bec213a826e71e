"""Ground truth: true FLOP per workload and the cases each shipped policy must open (ARCHITECTURE.md "Case
semantics"), computed from exactly the samples written (valid, de-duplicated; malformed and dropped ones are not
part of the truth).

Readings of the contract where it leaves a choice (also in docs/simulator.md):
- used(t) at a window end t sums the samples with ts < t; a window [e - W, e) belongs to its end e.
- reserved_until known at t = the largest reserved_until of the account's reservation events with ts <= t.
- Owner aggregation sums the runs that never get a case of their own under that policy; the case's account (and
  run) is the one of the crossing sample, or for a projected crossing the one with most FLOP in that window.
- Special measures: knowledge_at = the account's first allocation event or valid telemetry sample at or after
  its CIP record's updated_at.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np

from pipeline.simulator.accounts import is_foreign, owner_is_foreign, qualifying_owners, under_special_measures
from pipeline.simulator.engine import TruthBlock
from pipeline.simulator.scenario import Scenario
from schemas.policy import Policy, load_policy, shipped_policies


def due_at(knowledge_at: float, policy: Policy) -> float:
    days = policy.reporting.window_days
    if policy.reporting.day_kind == "calendar":
        return knowledge_at + days * 86_400.0
    d = datetime.fromtimestamp(knowledge_at, UTC)
    whole, frac = int(days), days - int(days)
    while whole > 0:
        d += timedelta(days=1)
        if d.weekday() < 5:
            whole -= 1
    return d.timestamp() + frac * 86_400.0


@dataclass
class TruthAccumulator:
    sc: Scenario
    wl_flop: np.ndarray = field(init=False)
    wl_samples: np.ndarray = field(init=False)
    wl_first: np.ndarray = field(init=False)
    _ts: list[np.ndarray] = field(default_factory=list)
    _run: list[np.ndarray] = field(default_factory=list)
    _flop: list[np.ndarray] = field(default_factory=list)
    _win: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = len(self.sc.workloads)
        self.wl_flop = np.zeros(n)
        self.wl_samples = np.zeros(n, dtype=np.int64)
        self.wl_first = np.full(n, np.inf)
        run_ids = sorted({w.run_id for w in self.sc.workloads})
        self.run_ids = run_ids
        ri = {r: i for i, r in enumerate(run_ids)}
        self.run_of_wl = np.array([ri[w.run_id] for w in self.sc.workloads], dtype=np.int64)
        self.training_wl = np.array([w.is_training for w in self.sc.workloads], dtype=bool)
        self.run_account = np.zeros(len(run_ids), dtype=np.int64)
        self.run_training = np.zeros(len(run_ids), dtype=bool)
        for w in self.sc.workloads:
            self.run_account[ri[w.run_id]] = w.account
            self.run_training[ri[w.run_id]] = w.is_training

    def add(self, tb: TruthBlock) -> None:
        n = len(self.sc.workloads)
        self.wl_flop += np.bincount(tb.wl, weights=tb.flop, minlength=n)
        self.wl_samples += np.bincount(tb.wl, minlength=n)
        if tb.ts.size:
            np.minimum.at(self.wl_first, tb.wl, tb.ts)
        run = self.run_of_wl[tb.wl]
        tr = self.training_wl[tb.wl]
        self._ts.append(tb.ts[tr])
        self._run.append(run[tr])
        self._flop.append(tb.flop[tr])
        key = run * 10_000_000_000 + np.floor(tb.ts / self.sc.window_s).astype(np.int64)
        uk, inv = np.unique(key, return_inverse=True)
        self._win.append((uk, np.bincount(inv, weights=tb.flop, minlength=uk.size)))

    # ---- case computation -------------------------------------------------------------------------------
    def _finish(self) -> None:
        ts = np.concatenate(self._ts) if self._ts else np.empty(0)
        run = np.concatenate(self._run) if self._run else np.empty(0, dtype=np.int64)
        flop = np.concatenate(self._flop) if self._flop else np.empty(0)
        order = np.lexsort((ts, run))  # by run, then event time (stable)
        self.s_ts, self.s_run, self.s_flop = ts[order], run[order], flop[order]
        self.s_bounds = np.searchsorted(self.s_run, np.arange(len(self.run_ids) + 1))
        if self._win:
            uk = np.concatenate([u for u, _ in self._win])
            sums = np.concatenate([s for _, s in self._win])
            k, inv = np.unique(uk, return_inverse=True)
            wsum = np.bincount(inv, weights=sums, minlength=k.size)
        else:
            k, wsum = np.empty(0, dtype=np.int64), np.empty(0)
        self.w_run = k // 10_000_000_000
        self.w_end = (k % 10_000_000_000 + 1).astype(np.float64) * self.sc.window_s
        self.w_sum = wsum
        self.w_bounds = np.searchsorted(self.w_run, np.arange(len(self.run_ids) + 1))
        # Reservation timeline per account: (ts, running max of reserved_until).
        self.resv: dict[int, tuple[list[float], list[float]]] = {}
        acc_index = {a.account_id: a.index for a in self.sc.accounts}
        for e in self.sc.allocations:
            if e.reserved_until is None:
                continue
            tss, rus = self.resv.setdefault(acc_index[e.account_id], ([], []))
            tss.append(e.ts)
            rus.append(max(e.reserved_until, rus[-1] if rus else -np.inf))
        self.first_alloc: dict[int, list[float]] = {}
        for e in self.sc.allocations:
            self.first_alloc.setdefault(acc_index[e.account_id], []).append(e.ts)

    def _reserved_until(self, account: int, t: np.ndarray) -> np.ndarray:
        """Latest reservation end known at each t (NaN: no reservation)."""
        if account not in self.resv:
            return np.full(t.shape, np.nan)
        tss, rus = self.resv[account]
        pos = np.searchsorted(np.asarray(tss), t, side="right") - 1
        return np.where(pos >= 0, np.asarray(rus)[np.maximum(pos, 0)], np.nan)

    def _run_windows(self, r: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = self.w_bounds[r], self.w_bounds[r + 1]
        return self.w_end[a:b], self.w_sum[a:b]

    def _projected(self, r: int) -> tuple[np.ndarray, np.ndarray]:
        """(window ends, used + rate x remaining reserved time) for one run."""
        ends, sums = self._run_windows(r)
        used = np.cumsum(sums)
        ru = self._reserved_until(int(self.run_account[r]), ends)
        extra = np.where(np.isnan(ru), 0.0, sums / self.sc.window_s * np.maximum(0.0, np.nan_to_num(ru) - ends))
        return ends, used + extra

    def _run_knowledge(self, r: int, T: float, projected: bool) -> tuple[float, str] | None:
        a, b = self.s_bounds[r], self.s_bounds[r + 1]
        cum = np.cumsum(self.s_flop[a:b])
        t_used = float(self.s_ts[a + int(np.argmax(cum >= T))]) if cum.size and cum[-1] >= T else np.inf
        t_proj = np.inf
        if projected:
            ends, proj = self._projected(r)
            hit = np.flatnonzero(proj >= T)
            t_proj = float(ends[hit[0]]) if hit.size else np.inf
        if not np.isfinite(min(t_used, t_proj)):
            return None
        return (t_used, "compute_used") if t_used <= t_proj else (t_proj, "compute_projected")

    def _owner_knowledge(self, runs: list[int], T: float, projected: bool) -> tuple[float, str, int] | None:
        """(time, reason, run that made the sum cross) for the summed runs of one owner."""
        parts = [(self.s_ts[self.s_bounds[r]:self.s_bounds[r + 1]], self.s_flop[self.s_bounds[r]:self.s_bounds[r + 1]],
                  np.full(self.s_bounds[r + 1] - self.s_bounds[r], r)) for r in runs]
        ts = np.concatenate([p[0] for p in parts])
        fl = np.concatenate([p[1] for p in parts])
        rr = np.concatenate([p[2] for p in parts])
        order = np.argsort(ts, kind="stable")
        cum = np.cumsum(fl[order])
        best: tuple[float, str, int] | None = None
        if cum.size and cum[-1] >= T:
            i = order[int(np.argmax(cum >= T))]
            best = (float(ts[i]), "compute_used", int(rr[i]))
        if projected:
            ends = np.concatenate([self._run_windows(r)[0] for r in runs])
            sums = np.concatenate([self._run_windows(r)[1] for r in runs])
            rws = np.concatenate([np.full(self._run_windows(r)[0].size, r) for r in runs])
            ru = np.concatenate([self._reserved_until(int(self.run_account[r]), self._run_windows(r)[0])
                                 for r in runs])
            o = np.lexsort((rws, ends))
            ends, sums, rws, ru = ends[o], sums[o], rws[o], ru[o]
            used = np.cumsum(sums)
            uniq, first = np.unique(ends, return_index=True)
            last = np.append(first[1:], ends.size) - 1
            for e, f0, l0 in zip(uniq, first, last, strict=True):
                if best is not None and e >= best[0]:
                    break
                seg = slice(f0, l0 + 1)
                # One reservation per account: its rate is the account's window FLOP over the summed runs.
                accts = self.run_account[rws[seg]]
                extra = 0.0
                for acct in np.unique(accts):
                    m = accts == acct
                    r_u = ru[seg][m][0]
                    if not np.isnan(r_u):
                        extra += sums[seg][m].sum() / self.sc.window_s * max(0.0, r_u - e)
                if used[l0] + extra >= T:
                    top = int(rws[seg][np.argmax(sums[seg])])
                    best = (float(e), "compute_projected", top)
                    break
        return best

    def cases(self) -> tuple[dict[str, list[dict[str, Any]]], dict[str, list[dict[str, Any]]]]:
        self._finish()
        expected: dict[str, list[dict[str, Any]]] = {}
        monitored: dict[str, list[dict[str, Any]]] = {}
        for name in shipped_policies():
            pol = load_policy(name)
            T, proj = pol.thresholds.training_ops, pol.thresholds.count_projected
            foreign = [is_foreign(a.cip, pol) for a in self.sc.accounts]
            cases: list[dict[str, Any]] = []
            mon: list[dict[str, Any]] = []
            own_case: set[int] = set()
            for r in np.flatnonzero(self.run_training):
                k = self._run_knowledge(int(r), T, proj)
                if k is None:
                    continue
                acct = int(self.run_account[r])
                rec = {"account_id": self.sc.accounts[acct].account_id, "beneficial_owner_id": None,
                       "run_id": self.run_ids[r], "reason": k[1], "knowledge_at": k[0], "due_at": due_at(k[0], pol)}
                if foreign[acct]:
                    cases.append(rec)
                    own_case.add(int(r))
                else:
                    mon.append(rec)
            if pol.foreign_person.check_beneficial_owners:
                cases += self._owner_cases(pol, own_case)
            cases += self._special_cases(pol)
            cases.sort(key=lambda c: (c["knowledge_at"], c["account_id"], c["reason"]))
            mon.sort(key=lambda c: (c["knowledge_at"], c["account_id"]))
            expected[name], monitored[name] = cases, mon
        return expected, monitored

    def _owner_cases(self, pol: Policy, own_case: set[int]) -> list[dict[str, Any]]:
        by_owner: dict[str, list[int]] = {}
        for a in self.sc.accounts:
            for o in qualifying_owners(a.cip, pol):
                if owner_is_foreign(o, pol):
                    by_owner.setdefault(o.owner_id, []).append(a.index)
        out = []
        for oid, accts in sorted(by_owner.items()):
            if len(set(accts)) < 2:
                continue
            runs = [int(r) for r in np.flatnonzero(self.run_training & np.isin(self.run_account, accts))
                    if int(r) not in own_case]
            if not runs:
                continue
            k = self._owner_knowledge(runs, pol.thresholds.training_ops, pol.thresholds.count_projected)
            if k is None:
                continue
            acct = int(self.run_account[k[2]])
            out.append({"account_id": self.sc.accounts[acct].account_id, "beneficial_owner_id": oid,
                        "run_id": self.run_ids[k[2]], "reason": "owner_aggregate", "knowledge_at": k[0],
                        "due_at": due_at(k[0], pol)})
        return out

    def _special_cases(self, pol: Policy) -> list[dict[str, Any]]:
        out = []
        first_tel = np.full(len(self.sc.accounts), np.inf)
        for w in self.sc.workloads:
            first_tel[w.account] = min(first_tel[w.account], self.wl_first[w.index])
        for a in self.sc.accounts:
            if not under_special_measures(a.cip, pol):
                continue
            after = [t for t in self.first_alloc.get(a.index, []) if t >= a.cip.updated_at]
            cand = min([*after, *([first_tel[a.index]] if first_tel[a.index] >= a.cip.updated_at else [])],
                       default=np.inf)
            if np.isfinite(cand):
                out.append({"account_id": a.account_id, "beneficial_owner_id": None, "run_id": None,
                            "reason": "special_measures", "knowledge_at": float(cand),
                            "due_at": due_at(float(cand), pol)})
        return out

    def max_projected(self, r: int) -> float:
        """The largest used + projected FLOP of a run at any window end (0 without samples)."""
        _, p = self._projected(r)
        return float(p.max()) if p.size else 0.0


