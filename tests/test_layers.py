"""Imports point one way: schemas <- detectors <- pipeline; detectors never touch Kafka, faust or ClickHouse.

Inside pipeline/ the pure cores (the stages a Kafka adapter, the replay and the tests all drive) import no broker,
stream or store client and no adapter module, directly or through anything they import: adapters -> cores only.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
IO_CLIENTS = {"confluent_kafka", "faust", "aiokafka", "clickhouse_connect", "chdb", "prometheus_client"}
FORBIDDEN = {
    "schemas": {"detectors", "pipeline", *IO_CLIENTS},
    "detectors": {"pipeline", "time", *IO_CLIENTS},
    "pipeline": {"tests", "benchmarks"},  # shipped code never leans on test helpers or benchmark scripts
}
#: The pure cores of pipeline/: each is driven by an adapter (Kafka, faust, the replay runner), never the reverse.
CORES = [
    "pipeline.ingest.stage", "pipeline.ingest.aggregate", "pipeline.ingest.window_stats", "pipeline.ingest.decoders",
    "pipeline.ingest.columns", "pipeline.ingest.validate", "pipeline.ingest.dlq", "pipeline.detect.stage",
    "pipeline.detect.merger", "pipeline.cases.core",
]
#: Modules that talk to Kafka, faust, the store or the network: a core reaching one of these is inverted.
ADAPTERS = {
    "pipeline.ingest.kafka_stage", "pipeline.ingest.metrics", "pipeline.ingest.status", "pipeline.detect.faust_app",
    "pipeline.detect.worker", "pipeline.detect.security", "pipeline.detect.feed_audit", "pipeline.cases.feed",
    "pipeline.cases.service", "pipeline.cases.actions", "pipeline.runner", "pipeline.store", "pipeline.dlq_sink",
    "pipeline.topics", "pipeline.stage_metrics", "pipeline.faults", "pipeline.cli", "pipeline.simulator.kafka_out",
}


def _imports(path: Path) -> set[str]:
    """Top-level package names a file imports (anywhere in it, lazy imports included)."""
    return {m.split(".")[0] for m in _modules(path)}


def _modules(path: Path, package: str = "") -> set[str]:
    """Full dotted names a file imports; relative imports are resolved against `package`."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(p for p in [*parts, base] if p)
            names.add(base)
            names |= {f"{base}.{a.name}" for a in node.names}  # `from pipeline import store` names a module
    return names


def _file(module: str) -> Path | None:
    p = ROOT / Path(*module.split("."))
    return next((f for f in (p.with_suffix(".py"), p / "__init__.py") if f.is_file()), None)


@cache
def _closure(module: str) -> frozenset[str]:
    """Every project module `module` reaches through its imports, and every outside name any of them imports."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        f = _file(m)
        if f is None:
            continue
        pkg = m if f.name == "__init__.py" else m.rpartition(".")[0]
        for name in _modules(f, pkg):
            parts = name.split(".")
            # a package import runs its __init__: `pipeline.ingest.stage` also reaches `pipeline`, `pipeline.ingest`
            todo += [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return frozenset(seen)


def _inverted(module: str) -> list[str]:
    reach = _closure(module)
    return sorted({m for m in reach if m.split(".")[0] in IO_CLIENTS} | (reach & ADAPTERS))


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_import_direction(package):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"{package}/ has no modules"
    bad = {str(f.relative_to(ROOT)): sorted(_imports(f) & FORBIDDEN[package]) for f in files}
    assert not {k: v for k, v in bad.items() if v}


@pytest.mark.parametrize("core", CORES)
def test_a_core_reaches_no_adapter_and_no_io_client(core):
    assert _file(core) is not None, f"{core} moved: update CORES"
    assert not _inverted(core), f"{core} reaches {_inverted(core)}"


def test_the_adapters_named_exist():
    assert not [m for m in sorted(ADAPTERS) if _file(m) is None]


def test_the_checker_sees_a_violation(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("from pipeline.settings import Settings\nimport confluent_kafka\nimport tests.conftest\n")
    assert {"pipeline", "confluent_kafka", "tests"} <= _imports(f)
    assert _imports(f) & FORBIDDEN["pipeline"] == {"tests"}


def test_the_closure_sees_an_adapter_behind_a_core(tmp_path):
    # the Kafka adapter itself reaches confluent_kafka; a core that imported it would fail the same way
    assert "confluent_kafka" in _inverted("pipeline.ingest.kafka_stage")
    # through another module: the case service reaches the store and its client
    assert {"pipeline.store", "clickhouse_connect"} <= set(_inverted("pipeline.cases.service"))
    # relative imports are resolved too
    f = tmp_path / "m.py"
    f.write_text("from .kafka_stage import X\n")
    assert "pipeline.ingest.kafka_stage" in _modules(f, "pipeline.ingest")
