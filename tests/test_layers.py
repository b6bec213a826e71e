"""Imports point one way: schemas <- detectors <- pipeline; detectors never touch Kafka, faust or ClickHouse."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "schemas": {"detectors", "pipeline", "confluent_kafka", "faust", "aiokafka", "clickhouse_connect", "chdb"},
    "detectors": {"pipeline", "confluent_kafka", "faust", "aiokafka", "clickhouse_connect", "chdb", "time"},
    "pipeline": set(),
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_import_direction(package):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"{package}/ has no modules"
    bad = {str(f.relative_to(ROOT)): sorted(_imports(f) & FORBIDDEN[package]) for f in files}
    assert not {k: v for k, v in bad.items() if v}


def test_the_checker_sees_a_violation(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("from pipeline.settings import Settings\nimport confluent_kafka\n")
    assert {"pipeline", "confluent_kafka"} <= _imports(f)
