"""The console script is installed and its foundation commands work."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from schemas import MESSAGE_TYPES


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, timeout=120)


def test_help_lists_commands():
    out = _run("--help")
    assert out.returncode == 0, out.stderr
    for cmd in ("schemas", "policy"):
        assert cmd in out.stdout


def test_schemas_export(tmp_path):
    out = _run("schemas", "export", str(tmp_path / "schemas"))
    assert out.returncode == 0, out.stderr
    files = sorted((tmp_path / "schemas").glob("*.schema.json"))
    assert len(files) == len(MESSAGE_TYPES)
    assert all(json.loads(f.read_text())["type"] == "object" for f in files)


def test_errors_are_one_line_and_exit_2():
    out = _run("policy", "show", "no-such-profile")
    assert out.returncode == 2
    assert out.stderr.strip().startswith("error: no-such-profile: no such policy profile")


@pytest.mark.parametrize("args,message", [
    (("simulate", "no-such-scenario", "--out", "{tmp}/x"), "error: unknown scenario 'no-such-scenario'"),
    (("simulate", "demo", "--out", "{tmp}/x", "--scale", "-1"), "error: scale must be > 0"),
    (("simulate", "demo", "--out", "{tmp}/x", "--malformed-share", "1.5"), "error: malformed_share must be in [0, 1]"),
    (("ingest", "run", "--decoder", "bogus", "--max-seconds", "1"), "error: unknown decoder 'bogus'"),
])
def test_bad_arguments_are_one_line_errors_not_tracebacks(tmp_path, args, message):
    out = _run(*(a.format(tmp=tmp_path) for a in args))
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().startswith(message) and "Traceback" not in out.stderr
    assert not (tmp_path / "x").exists()  # nothing half-written


@pytest.mark.parametrize("args,message", [
    (("cases", "ack", "case-x", "--at", "abc"), "error: Invalid value for '--at'"),
    (("cases", "list", "--store", "chdb://bad/x"), "error: chdb DSN 'chdb://bad/x' is ambiguous"),
    (("cases", "list", "--store", "postgres://x"), "error: unsupported ClickHouse DSN"),
    (("cases", "list", "--store", "http://u:s3cret@127.0.0.1:1"), "error: cannot open ClickHouse store http://u:***@"),
    (("cases", "list", "--status", "bogus", "--store", "chdb:{tmp}/s"), "error: --status 'bogus': not a case status"),
    (("cases", "list", "--store", "chdb:{tmp}/s", "--database", "no;pe"), "error: database name 'no;pe'"),
])
def test_bad_dsn_and_case_arguments_are_one_line_errors(tmp_path, args, message):
    out = _run(*(a.format(tmp=tmp_path) for a in args))
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), out.stderr
    assert "s3cret" not in out.stderr and not (tmp_path.parent / "bad").exists()


def test_log_format_setting_reaches_every_command(tmp_path):
    # A command that logs (librdkafka against a dead broker) and then fails: JSON records, then the one error line.
    env = {**__import__("os").environ, "TRAINWATCH_LOG_FORMAT": "json", "TRAINWATCH_LOG_LEVEL": "INFO",
           "TRAINWATCH_KAFKA__BOOTSTRAP_SERVERS": "127.0.0.1:1", "TRAINWATCH_CLICKHOUSE_DSN": f"chdb:{tmp_path}/s"}
    out = subprocess.run([sys.executable, "-m", "pipeline", "run", "--stage", "dlq"], capture_output=True, text=True,
                         timeout=120, env=env, cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert errors == ["error: " + errors[0].removeprefix("error: ")] and "127.0.0.1:1" in errors[0]
    records = [json.loads(line) for line in lines if not line.startswith("error: ")]
    assert records and {r["logger"] for r in records} <= {"librdkafka", "trainwatch", "pipeline.dlq_sink"}
    assert "\x1b" not in out.stderr
