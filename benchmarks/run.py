"""Run the benchmarks and write `benchmarks/results/latest.json` and `latest.md` (`quick.*` with --quick).

`python -m benchmarks.run [--quick] [--only NAME ...]`. Each module `benchmarks/bench_<name>.py` exposes
`run(quick: bool) -> dict` returning {"figures": {key: value}, "targets": [{"key", "baseline"?, "min" | "max",
"target_text"}], "params": {...}, "notes": [...]}; this harness adds machine, date and versions, computes
every ratio against its baseline measured in the same run, and renders the Markdown table the README shows.
Benchmarks are not tests: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import importlib.util
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import orjson

from schemas.serde import dumps

RESULTS = Path(__file__).parent / "results"
ORDER = ("ingest", "latency", "memory", "scaling", "store", "simulator", "verdict")
PACKAGES = ("confluent-kafka", "faust-streaming", "aiokafka", "numpy", "orjson", "clickhouse-connect", "chdb",
            "pydantic", "scikit-learn")


def _ensure_broker() -> None:
    # Benchmarks that need Kafka use the project's local broker; start it if it is not running (no-op otherwise).
    script = Path(__file__).resolve().parents[1] / "deploy" / "local" / "kafka.sh"
    env = {**os.environ, "PYTHON": sys.executable}
    subprocess.run(["bash", str(script), "start"], check=True, env=env, timeout=300)


def _machine() -> dict:
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
    }


def _versions() -> dict:
    out = {}
    for p in PACKAGES:
        try:
            out[p] = md.version(p)
        except md.PackageNotFoundError:
            out[p] = None
    return out


def render_markdown(results: dict) -> str:
    lines = [
        f"Measured {results['date']} on {results['machine']['platform']}, {results['machine']['cpus']} CPUs, "
        f"mode {'quick' if results['quick'] else 'full'}.",
        "",
        "| figure | value | baseline (same run) | ratio | target | met |",
        "|---|---|---|---|---|---|",
    ]
    flat = results["figures"]
    for spec in results["targets"].values():
        key = spec["key"]
        value = flat.get(key)
        base_key = spec.get("baseline")
        base = flat.get(base_key) if base_key else None
        ratio = spec.get("ratio")
        target = spec.get("target_text", "")
        met = {True: "yes", False: "**no**", None: "n/a"}[spec.get("met")]
        lines.append(
            f"| `{key}` | {_fmt(value)} | {f'`{base_key}` = {_fmt(base)}' if base_key else '—'} | "
            f"{_fmt(ratio) if ratio is not None else '—'} | {target} | {met} |"
        )
    for note in results.get("notes", []):
        lines.append(f"\n- {note}")
    return "\n".join(lines) + "\n"


def _update_readme(table: str) -> None:
    readme = Path(__file__).resolve().parents[1] / "README.md"
    text = readme.read_text()
    start, end = "<!-- bench:start -->\n", "<!-- bench:end -->"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        readme.write_text(head + start + table + rest[rest.index(end):])


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:,.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    return "—" if v is None else str(v)


def _judge(figures: dict, spec: dict) -> dict:
    """Fill in ratio and met for one target: either a ratio to a baseline, or an absolute bound."""
    value = figures.get(spec["key"])
    out = dict(spec)
    if value is None:
        out["met"] = None
        return out
    if spec.get("baseline"):
        base = figures.get(spec["baseline"])
        out["ratio"] = value / base if base else None
        x = out["ratio"]
    else:
        x = value
    if x is None:
        out["met"] = None
    elif "min" in spec:
        out["met"] = x >= spec["min"]
    elif "max" in spec:
        out["met"] = x <= spec["max"]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small inputs, under 3 minutes")
    ap.add_argument("--only", nargs="*", default=None, help=f"subset of {', '.join(ORDER)}")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    names = args.only or list(ORDER)
    _ensure_broker()
    results: dict = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "quick": args.quick,
        "machine": _machine(),
        "versions": _versions(),
        "params": {},
        "figures": {},
        "targets": {},
        "notes": [],
        "errors": {},
    }
    for name in names:
        if importlib.util.find_spec(f"benchmarks.bench_{name}") is None:
            results["errors"][name] = "not available"
            continue
        t0 = time.perf_counter()
        print(f"== {name}", flush=True)
        # Each benchmark runs in its own process: its RSS figures are its own, and chDB's one-path-per-process
        # rule cannot make one benchmark break the next.
        cmd = [sys.executable, "-m", f"benchmarks.bench_{name}", "--json", *(["--quick"] if args.quick else [])]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
        if proc.returncode != 0:  # one failing benchmark must not hide the others' figures
            results["errors"][name] = proc.stderr.strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
            print(f"   failed: {results['errors'][name]}", flush=True)
            continue
        r = orjson.loads(proc.stdout.strip().splitlines()[-1])
        results["params"][name] = r.get("params", {}) | {"seconds": round(time.perf_counter() - t0, 1)}
        results["figures"].update(r["figures"])
        results["notes"].extend(r.get("notes", []))
        for spec in r.get("targets", []):
            results["targets"][spec["key"] + (f" / {spec['baseline']}" if spec.get("baseline") else "")] = spec
        for k, v in r["figures"].items():
            print(f"   {k} = {_fmt(v)}", flush=True)
    results["targets"] = {k: _judge(results["figures"], s) for k, s in results["targets"].items()}
    args.out.mkdir(parents=True, exist_ok=True)
    # A quick run is a smoke check of the scripts: it never replaces the full figures or the README's table.
    stem = "quick" if args.quick else "latest"
    (args.out / f"{stem}.json").write_bytes(dumps(results, sort_keys=True))
    (args.out / f"{stem}.md").write_text(render_markdown(results))
    if not args.only and not args.quick:  # only a full run of every benchmark may replace the README's table
        _update_readme(render_markdown(results))
    print(render_markdown(results))
    return 1 if results["errors"] and not results["figures"] else 0


if __name__ == "__main__":
    sys.exit(main())
