"""Shadow policies (issue 16): extra policy profiles run beside the live one, recording what they would do.

A shadow runs its own DetectStage (the policy shapes the detectors) over the same inputs and its own CaseBook, and
writes each would-be case to the `cases` table with status `shadow`:

- **Id.** content_id("case", "shadow", policy id, policy version, the case id the book gives), so a shadow never
  lands on a live case, even a shadow of the live profile's own id at another version.
- **Never a clock, never on the feed.** due_at is None and the deadline monitor never sees status `shadow`; no case
  event is written (the feed audit republishes case events, so shadow events there would reach the feed) and
  ShadowCaseService returns no feed message. `evidence.shadow` keeps what the case would be: book case id, status,
  knowledge_at, due date. No identity (PII) is copied: the diff needs none.
- **Idempotent.** The book is preloaded from the stored shadow cases of this policy id and version, and fingerprints
  in `evidence.applied` make a replay a no-op, as for live cases. Shadow findings are not written to `detections`
  (their ids are keyed by policy id, which a shadow of the live profile shares).
- Suppressions do not apply to shadows.

In process: `trainwatch replay DIR --shadow POLICY` wraps the runner's DetectStage in ShadowTee (no change to the
runner). On Kafka: `trainwatch run --stage detect --shadow POLICY` runs the faust detect app under the shadow policy,
with its own app id (consumer group, changelogs, owners topic) and ShadowCaseService as its case service.
`trainwatch policy diff LIVE SHADOW` compares the two (diff_cases below).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.cases.core import CaseBook, CaseChanges
from pipeline.cases.feed import CaseFeedMessage
from pipeline.detect.stage import DetectOutput, DetectStage
from pipeline.settings import Settings
from pipeline.store import Store
from schemas.case import REPORTABLE_STATUSES, Case
from schemas.cip import CipRecord
from schemas.detection import Detection
from schemas.ids import content_id
from schemas.policy import Policy, load_policy

SHADOW = "shadow"


def shadow_case_id(policy: Policy, book_case_id: str) -> str:
    return content_id("case", SHADOW, policy.id, policy.version, book_case_id)


def shadow_app_id(base: str, policy: Policy) -> str:
    """The Kafka app id (consumer group, changelogs) of a shadow detect worker."""
    safe = "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in f"{policy.id}-{policy.version}")
    return f"{base}-shadow-{safe}"


def to_shadow(case: Case, policy: Policy) -> Case:
    info = {"policy_id": policy.id, "policy_version": policy.version, "book_case_id": case.case_id,
            "status": case.status, "knowledge_at": case.knowledge_at, "due_at": case.due_at,
            "cip_updated_at": case.identity.get("cip_updated_at")}
    return case.model_copy(update={"case_id": shadow_case_id(policy, case.case_id), "status": SHADOW, "due_at": None,
                                   "identity": {}, "evidence": {**case.evidence, SHADOW: info}})


def from_shadow(case: Case) -> Case:
    info = case.evidence[SHADOW]
    evidence = {k: v for k, v in case.evidence.items() if k != SHADOW}
    # The identity snapshot is not stored (PII the diff does not need); its date is, so that a replayed CIP record
    # is not taken for a newer one.
    identity = {"cip_updated_at": info["cip_updated_at"]} if info.get("cip_updated_at") is not None else {}
    return case.model_copy(update={"case_id": info["book_case_id"], "status": info["status"],
                                   "due_at": info["due_at"], "evidence": evidence, "identity": identity})


def stored_shadows(store: Store, policy_id: str, policy_version: str | None = None) -> list[Case]:
    return [c for c in store.list_cases(status=[SHADOW], policy_id=policy_id)
            if policy_version is None or c.evidence.get(SHADOW, {}).get("policy_version") == policy_version]


class ShadowCaseService:
    """CaseService's interface (process, update_identity, tick) for a shadow policy: would-be cases, no clock, no
    events, no feed (module docstring)."""

    def __init__(self, store: Store, policy: Policy):
        self.store = store
        self.policy = policy
        self.book = CaseBook(policy, (from_shadow(c) for c in stored_shadows(store, policy.id, policy.version)))

    def _write(self, changes: CaseChanges) -> list[CaseFeedMessage]:
        self.store.upsert_cases([to_shadow(c, self.policy) for c in changes.cases])
        return []

    def process(self, detections: Iterable[Detection], now: float,
                cips: Mapping[str, CipRecord] | None = None) -> list[CaseFeedMessage]:
        dets = list(detections)
        if not dets:
            return []
        known = dict(cips or {})
        for acct in {d.account_id for d in dets} - known.keys():
            if (rec := self.store.get_cip(acct)) is not None:
                known[acct] = rec
        return self._write(self.book.apply(dets, known, now))

    def update_identity(self, cip: CipRecord, now: float) -> list[CaseFeedMessage]:
        return self._write(self.book.refresh_identity(cip, now))  # revisions (a late U.S.-person record) too

    def tick(self, event_now: float, recorded_at: float) -> list[CaseFeedMessage]:
        return []  # no clock


@dataclass
class Shadow:
    stage: DetectStage
    cases: ShadowCaseService
    cips: dict[str, CipRecord]


#: DetectStage's public methods that only read its state: ShadowTee answers them from the live stage alone.
STAGE_READS = frozenset({"held_to_list", "to_dict"})
#: Public methods a tee cannot stand in for: they load one stage's own persisted state, and each policy's stage has
#: its own (restore the stages one by one, then tee them).
STAGE_REFUSED = frozenset({"load_held"})


def stage_inputs() -> frozenset[str]:
    """DetectStage's input methods, which ShadowTee hands to every shadow: every public method called on an instance
    (not a property, classmethod or staticmethod) that is not a read (STAGE_READS) or refused (STAGE_REFUSED). A
    method added to DetectStage is therefore teed unless someone says otherwise."""
    out = set()
    for name in dir(DetectStage):
        raw = inspect.getattr_static(DetectStage, name)
        if name.startswith("_") or isinstance(raw, property | classmethod | staticmethod) or not callable(raw):
            continue
        out.add(name)
    return frozenset(out - STAGE_READS - STAGE_REFUSED)


_STAGE_INPUTS = stage_inputs()


class ShadowTee:
    """Stands in for the runner's DetectStage: every input goes to each shadow's stage, whose output goes straight to
    that shadow's case service (as the runner's _carry does), and to the live stage, whose output is returned.

    Teed by construction: any public DetectStage method but the reads and the refused (stage_inputs) is an input and
    reaches the shadows; properties and attributes are read from the live stage; an attribute set on the tee (a
    setting, e.g. partition_wait_s) is set on every stage. Before, inputs were listed here one by one and anything
    else fell through to the live stage only: a method added to DetectStage (on_windows) silently starved the
    shadows (261f80d). tests/test_shadow_tee.py feeds every input through a tee and directly and compares."""

    _OWN = frozenset({"live", "shadows", "clock"})

    def __init__(self, live: DetectStage, shadows: Sequence[tuple[DetectStage, ShadowCaseService]], clock: Any):
        self.live = live
        self.shadows = [Shadow(stage, cases, {}) for stage, cases in shadows]
        self.clock = clock

    def __getattr__(self, name: str) -> Any:  # only for what the tee itself lacks
        if name in _STAGE_INPUTS:
            return functools.partial(self._tee, name)
        if name in STAGE_REFUSED:
            raise TypeError(f"ShadowTee.{name}: each policy's stage loads its own state; call it on each stage "
                            "(tee.live, tee.shadows[i].stage), not on the tee")
        if name.startswith("_") or name in self._OWN:  # not set yet (copy, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.live, name)  # watermark, held, applied_to, ... of the live stage

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self._OWN:
            object.__setattr__(self, name, value)
            return
        if not hasattr(self.live, name):
            raise AttributeError(f"ShadowTee: DetectStage has no attribute {name!r} to set")
        for stage in (self.live, *(sh.stage for sh in self.shadows)):
            setattr(stage, name, value)

    def _tee(self, method: str, *args: Any, **kwargs: Any) -> Any:
        # a one-shot iterable (the runner's generator of windows) is read once, for every stage
        args = tuple(list(a) if isinstance(a, Iterator) else a for a in args)
        kwargs = {k: list(v) if isinstance(v, Iterator) else v for k, v in kwargs.items()}
        for sh in self.shadows:
            out = getattr(sh.stage, method)(*args, **kwargs)
            if out is None:  # begin_batch
                continue
            if not isinstance(out, DetectOutput):
                raise TypeError(f"DetectStage.{method} returned {type(out).__name__}, not DetectOutput: if it only "
                                "reads the stage, add it to pipeline.policy_ops.STAGE_READS")
            for cip in out.cips:
                prev = sh.cips.get(cip.account_id)
                if prev is None or cip.updated_at >= prev.updated_at:
                    sh.cips[cip.account_id] = cip
            sh.cases.process(out.detections, self.clock(), sh.cips)
            for cip in out.cips:
                sh.cases.update_identity(cip, self.clock())
        return getattr(self.live, method)(*args, **kwargs)


# ---- policy diff -------------------------------------------------------------------------------------------------


def _key(case: Case) -> tuple[str, str, str]:
    subject = f"owner:{case.beneficial_owner_id}" if case.beneficial_owner_id else f"account:{case.account_id}"
    return subject, case.run_id or f"reason:{case.reason}", case.reason if case.run_id is None else "run"


def _would_be(case: Case) -> tuple[str, float | None]:
    if case.status == SHADOW:
        info = case.evidence.get(SHADOW, {})
        return info.get("status", "?"), info.get("knowledge_at")
    return case.status, case.knowledge_at


def diff_cases(live: Sequence[Case], shadow: Sequence[Case]) -> dict[str, Any]:
    """What the shadow would open that the live policy did not, what it would not open, and reportable cases both
    open with knowledge_at dated differently (shadow - live, seconds). Cases match on subject and run (or reason
    for run-less cases); reportable = REPORTABLE_STATUSES (a shadow by the status it would have)."""
    live_by = {_key(c): c for c in live}
    sh_by = {_key(c): c for c in shadow}
    rows: dict[str, list[dict[str, Any]]] = {"would_open": [], "would_not_open": [], "dated_differently": [],
                                             "same": []}
    for key in sorted(live_by.keys() | sh_by.keys()):
        lc, sc = live_by.get(key), sh_by.get(key)
        l_status, l_k = _would_be(lc) if lc else (None, None)
        s_status, s_k = _would_be(sc) if sc else (None, None)
        l_rep, s_rep = l_status in REPORTABLE_STATUSES, s_status in REPORTABLE_STATUSES
        base = lc or sc
        assert base is not None
        row = {"subject": key[0], "run": base.run_id, "reason": base.reason, "account_id": base.account_id,
               "live_case_id": lc.case_id if lc else None, "shadow_case_id": sc.case_id if sc else None,
               "live_status": l_status, "shadow_status": s_status, "live_knowledge_at": l_k,
               "shadow_knowledge_at": s_k, "knowledge_delta_s": None}
        if s_rep and not l_rep:
            rows["would_open"].append(row)
        elif l_rep and not s_rep:
            rows["would_not_open"].append(row)
        elif l_rep and s_rep and l_k != s_k:
            row["knowledge_delta_s"] = None if l_k is None or s_k is None else s_k - l_k
            rows["dated_differently"].append(row)
        else:
            rows["same"].append(row)
    rows_count = {k: len(v) for k, v in rows.items()}
    return {"counts": rows_count, **rows}


# ---- on Kafka: a shadow detect worker ------------------------------------------------------------------------------


def shadow_settings(settings: Settings, policy_name: str, base_app_id: str) -> tuple[Settings, str]:
    """The settings and app id of a shadow detect worker for `policy_name`: the shadow policy, its own app id (so
    its own consumer group, changelogs and owners topic) and its own detections topic (the live `cases` agent must
    never read a shadow's findings). Provision its topics with `trainwatch topics create --shadow POLICY`."""
    policy = load_policy(policy_name)
    app_id = shadow_app_id(base_app_id, policy)
    topics = settings.topics.model_copy(update={"detections": f"{settings.topics.detections}.{app_id}"})
    return settings.model_copy(update={"policy": policy_name, "topics": topics}), app_id


class ShadowStore:
    """The store as a shadow worker sees it: it writes only shadow cases — not its findings (their ids are keyed by
    policy id, which a shadow of the live profile shares), nor the windows, CIP records and dead letters the live
    worker writes from the same inputs — and no live case is visible to it, so the faust app's feed audit finds
    nothing to republish. Reads go to the real store, opened on first use (in the worker)."""

    def __init__(self, settings: Settings):
        self._settings = settings
        self._real: Store | None = None

    @property
    def real(self) -> Store:
        if self._real is None:
            self._real = Store.connect(self._settings.clickhouse_dsn, self._settings.database)
        return self._real

    def insert_detections(self, detections: Sequence[Detection]) -> int:
        return 0

    # The live worker reads the same inputs and writes these; a shadow writes only its shadow cases.
    def insert_windows(self, windows: Sequence[Any]) -> int:
        return 0

    def upsert_cip(self, records: Sequence[CipRecord]) -> int:
        return 0

    def insert_dead_letters(self, rows: Iterable[Any]) -> int:
        return 0

    def get_case(self, case_id: str) -> Case | None:
        return None

    def close(self) -> None:
        if self._real is not None:
            self._real.close()
            self._real = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


class _LazyShadowCases:
    """ShadowCaseService built on first use, inside the worker (the store is opened there, never at app build)."""

    def __init__(self, store: ShadowStore, policy: Policy):
        self._store, self._policy = store, policy
        self._svc: ShadowCaseService | None = None

    def __getattr__(self, name: str) -> Any:
        if self._svc is None:
            self._svc = ShadowCaseService(self._store.real, self._policy)
        return getattr(self._svc, name)


def run_shadow_detect(settings: Settings, *, app_id: str, partitions: int = 1, loglevel: str = "WARNING",
                      on_stop_signal: Callable[[str], None] | None = None) -> None:
    """The faust detect app under a shadow policy until SIGTERM/SIGINT: the same agents and windows as the live
    worker (its own group), with ShadowCaseService for cases and ShadowStore for the store: no feed, no clock."""
    from pipeline import topics
    from pipeline.detect.faust_app import make_app
    from pipeline.detect.worker import make_worker

    n = topics.require(settings, "detect", app_id)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    app, rt = make_app(settings, app_id=app_id, partitions=n or partitions)
    store = ShadowStore(settings)
    rt._store = store  # type: ignore[assignment]
    rt._cases = _LazyShadowCases(store, rt.policy)  # type: ignore[assignment]
    worker = make_worker(app, loglevel, on_stop_signal)
    try:
        worker.execute_from_commandline()
    finally:
        rt.close()
