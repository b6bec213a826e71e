"""`trainwatch replay DIR` and `trainwatch demo`: the whole pipeline in process over a scenario folder."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
import typer
from tqdm import tqdm

from pipeline.classifier_loader import load_classifier
from pipeline.runner import InProcessPipeline, RunResult
from pipeline.settings import Settings, load_settings
from pipeline.sources import read_folder
from pipeline.store import Store
from schemas.case import REPORTABLE_STATUSES, Case
from schemas.errors import TrainwatchError
from schemas.policy import load_policy
from schemas.serde import dumps

DEMO_DATABASE = "trainwatch_demo"


def replay_folder(folder: Path, store: Store, policy_name: str, settings: Settings, *,
                  progress: bool = True, shadows: Sequence[str] = ()) -> RunResult:
    if not (folder / "telemetry.jsonl").exists():
        raise TrainwatchError(f"{folder}: not a scenario folder (no telemetry.jsonl)")
    from pipeline.ingest.aggregate import WindowConfig

    window = WindowConfig.from_settings(settings)
    policy = load_policy(policy_name)
    pipe = InProcessPipeline(store, policy, load_classifier(settings.model_path, policy), window=window,
                             batch_size=settings.ingest.batch_size)
    if shadows:  # extra profiles beside the live one: would-be cases only (pipeline/policy_ops.py)
        from pipeline.detect.stage import DetectStage
        from pipeline.policy_ops import ShadowCaseService, ShadowTee

        extra = []
        for name in shadows:
            sp = load_policy(name)
            stage = DetectStage(sp, load_classifier(settings.model_path, sp), window.window_s,
                                window.allowed_lateness_s)
            extra.append((stage, ShadowCaseService(store, sp)))
        pipe.detect = ShadowTee(pipe.detect, extra, pipe.clock)  # type: ignore[assignment]
    manifest = folder / "manifest.json"
    total = orjson.loads(manifest.read_bytes()).get("counts", {}).get("lines") if manifest.exists() else None
    with tqdm(total=total, unit="msg", disable=not progress, desc="replay", leave=False) as bar:
        return pipe.run(read_folder(folder), progress=bar.update)


def _distinct(detections: Sequence[Any]) -> int:
    """Detections by id: a re-decided detection is emitted again under its id and counts once."""
    return len({d.detection_id for d in detections})


def _utc(t: float | None) -> str:
    return "—" if t is None else time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(t))


def _match(cases: list[Case], expected: list[dict[str, Any]], window_s: float) -> dict[str, Any]:
    """Compare reportable cases with the ground truth's expected cases: by subject (owner or account) and reason
    family, knowledge time within one window."""
    def subject(c: dict | Case) -> str:
        g = c.get if isinstance(c, dict) else lambda k: getattr(c, k)
        return g("beneficial_owner_id") or g("account_id")

    found = [c for c in cases if c.status in REPORTABLE_STATUSES]
    by_subject: dict[str, list[Case]] = {}
    for c in found:
        by_subject.setdefault(subject(c), []).append(c)
    matched, missed, late = [], [], []
    for e in expected:
        hits = by_subject.get(subject(e), [])
        if not hits:
            missed.append(e)
            continue
        best = min(hits, key=lambda c: abs((c.knowledge_at or 0) - e["knowledge_at"]))
        matched.append((e, best))
        if abs((best.knowledge_at or 0) - e["knowledge_at"]) > window_s:
            late.append((e, best))
    expected_subjects = {subject(e) for e in expected}
    extra = [c for c in found if subject(c) not in expected_subjects]
    return {"matched": matched, "missed": missed, "extra": extra, "off_by_more_than_a_window": late}


def register(app: typer.Typer) -> None:
    @app.command("replay")
    def replay(
        folder: Path = typer.Argument(..., help="scenario folder written by `trainwatch simulate`"),
        policy: str = typer.Option(None, "--policy", help="profile name or TOML path (default: settings)"),
        store: str = typer.Option(None, "--store", help="ClickHouse DSN (default: settings)"),
        database: str = typer.Option(None, "--database", help="database (default: settings)"),
        json_out: bool = typer.Option(False, "--json", help="print counters and cases as JSON"),
        shadow: list[str] = typer.Option(None, "--shadow", help="also run this policy profile as a shadow "
                                         "(repeatable): its would-be cases are stored with status `shadow`, never on "
                                         "the feed, no clock; compare with `trainwatch policy diff`"),
    ) -> None:
        """Run the whole pipeline in process over a scenario folder into the store."""
        settings = load_settings()
        with Store.connect(store or settings.clickhouse_dsn, database or settings.database) as st:
            res = replay_folder(folder, st, policy or settings.policy, settings, progress=not json_out,
                                shadows=shadow or ())
            cases = st.list_cases()
        if json_out:
            typer.echo(dumps({"counters": dict(res.counters), "cases": [c.model_dump(mode="json") for c in cases]}))
            return
        typer.echo(f"replayed {folder}: " + ", ".join(f"{k}={v}" for k, v in sorted(res.counters.items())))
        typer.echo(f"{_distinct(res.detections)} detections, {len(cases)} cases in {st.database}")

    @app.command("demo")
    def demo(
        json_out: bool = typer.Option(False, "--json", help='print {"cases": [...], "ground_truth": path}'),
        seed: int = typer.Option(0, "--seed"),
        out: Path = typer.Option(None, "--out", help="scenario folder (default: <data_dir>/demo)"),
    ) -> None:
        """Simulate the `demo` scenario, replay it into an embedded chDB store, summarise the cases."""
        from pipeline.simulator import simulate

        settings = load_settings()
        folder = out or settings.data_dir / "demo"
        t0 = time.perf_counter()
        simulate("demo", folder, seed=seed)
        t_sim = time.perf_counter() - t0
        with Store.connect(settings.clickhouse_dsn, DEMO_DATABASE) as st:
            st.drop_database()  # a demo starts from an empty store each time
        with Store.connect(settings.clickhouse_dsn, DEMO_DATABASE) as st:
            res = replay_folder(folder, st, "demo", settings, progress=not json_out)
            cases = st.list_cases()
        t_all = time.perf_counter() - t0
        gt_path = folder / "ground_truth.json"
        if json_out:
            typer.echo(dumps({"cases": [c.model_dump(mode="json") for c in cases], "ground_truth": str(gt_path)}))
            return
        gt = orjson.loads(gt_path.read_bytes())
        m = _match(cases, gt["expected_cases"]["demo"], settings.window_s)
        _print_summary(cases, res, m, folder, t_sim, t_all)


def _used_flop(case: Case) -> float | None:
    """The largest compute figure any of the case's detections recorded (runs: used FLOP; owners: the sum)."""
    figures = [d.get("evidence", {}).get(k) for d in case.evidence.get("detections", {}).values()
               for k in ("used_flop", "owner_used_flop", "aggregate_flop")]
    nums = [f for f in figures if isinstance(f, (int, float))]
    return max(nums) if nums else None


def _print_summary(cases: list[Case], res: RunResult, m: dict, folder: Path, t_sim: float, t_all: float) -> None:
    echo = typer.echo
    c = res.counters
    echo("trainwatch demo — DEMO POLICY (thresholds scaled down 1e8x; not for compliance)")
    echo(f"simulated fleet in {t_sim:.1f}s -> {folder}; pipeline in process -> chDB database {DEMO_DATABASE}")
    echo(f"telemetry: {c.get('samples_in', 0):,} samples, {c.get('duplicates', 0)} duplicates suppressed, "
         f"{sum(v for k, v in c.items() if k.startswith('dlq.'))} dead-lettered "
         f"({', '.join(f'{k[4:]}={v}' for k, v in sorted(c.items()) if k.startswith('dlq.'))}); "
         f"{c.get('windows', 0):,} window aggregates; {_distinct(res.detections)} detections")
    echo("")
    echo(f"{'status':<13}{'reason':<18}{'subject':<28}{'knowledge at (event time)':<26}{'report due':<22}compute")
    for case in sorted(cases, key=lambda x: (x.status not in REPORTABLE_STATUSES, x.due_at or 9e18)):
        subj = f"owner {case.beneficial_owner_id} via {case.account_id}" if case.beneficial_owner_id \
            else case.account_id
        used = _used_flop(case)
        used_txt = f"{used:.2e} FLOP" if used is not None else ""
        echo(f"{case.status:<13}{case.reason:<18}{subj[:27]:<28}{_utc(case.knowledge_at):<26}"
             f"{_utc(case.due_at):<22}{used_txt}")
    echo("")
    n_exp = len(m["matched"]) + len(m["missed"])
    echo(f"ground truth: {len(m['matched'])}/{n_exp} expected reportable cases found, {len(m['missed'])} missed, "
         f"{len(m['extra'])} extra, {len(m['off_by_more_than_a_window'])} with knowledge time off by > 1 window")
    echo(f"done in {t_all:.1f}s. Explore: trainwatch cases list --database {DEMO_DATABASE}; "
         f"trainwatch report CASE_ID --database {DEMO_DATABASE}")
