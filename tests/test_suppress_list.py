"""`trainwatch suppress list` on a real chDB store: a held finding counts once per detection id, whatever number of
versions of it (re-decided by the engine: same id, other content) the suppression held, superseded or released."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from typer.testing import CliRunner

from pipeline.cases import suppressions as sup_ops
from pipeline.cases.service import CaseService
from pipeline.commands import suppress_cmd
from pipeline.store import Store
from tests.test_cases_core import BIS, DAY, NOW, T0, cip, det
from tests.test_suppressions import _add


def _listed(store: Store, store_path: Path) -> tuple[dict[str, dict], str]:
    app = typer.Typer()
    suppress_cmd.register(app)
    app.command("noop")(lambda: None)  # a group with one command would become the app itself
    where = ["--store", f"chdb://{store_path}", "--database", store.database]
    as_json = CliRunner().invoke(app, ["suppress", "list", "--json", *where])
    text = CliRunner().invoke(app, ["suppress", "list", *where])
    assert as_json.exit_code == 0 and text.exit_code == 0, as_json.output + text.output
    return {s["suppression_id"]: s for s in json.loads(as_json.output)}, text.output


def test_list_counts_a_redecided_finding_once_before_and_after_the_release(store: Store, store_path: Path):
    store.upsert_cip([cip()])
    sid = _add(store)
    other = _add(store, subject="acct-9", reason="another account")  # held nothing: listed with 0
    svc = CaseService(store, BIS)
    first, redecided, again = det(t=T0 + 600), det(t=T0 + 300), det(t=T0 + 420)
    assert first.detection_id == redecided.detection_id == again.detection_id
    projected = det(t=T0 + 900, detector="projection", reason="compute_projected")  # a second finding
    svc.process([first], NOW)
    svc.process([redecided, projected], NOW + 10)
    svc.process([first], NOW + 20)  # a redelivery of the superseded version: held again, stays superseded
    svc.process([again], NOW + 30)  # re-decided once more
    rows = store.suppression_hits(sid)
    assert len(rows) == 4  # three versions of one finding, one of the other: the table keeps every version
    assert sorted(r["state"] for r in rows) == [sup_ops.HELD, sup_ops.HELD, sup_ops.SUPERSEDED, sup_ops.SUPERSEDED]

    listed, text = _listed(store, store_path)
    assert (listed[sid]["held"], listed[sid]["released"]) == (2, 0)  # was 4 held (one per hit row)
    assert (listed[other]["held"], listed[other]["released"]) == (0, 0)
    assert f"{sid}\t" in text and "held 2\treleased 0" in text

    svc.tick(T0 + DAY + 60, NOW + 40)  # the suppression expires: the latest version of each finding is released
    listed, text = _listed(store, store_path)
    assert (listed[sid]["held"], listed[sid]["released"]) == (2, 2)
    assert "held 2\treleased 2" in text

    # re-decided after the release (the released case is the suppression's own, so the new version is held by it
    # and waits for the next tick): still one finding, not released until then
    svc.process([det(t=T0 + 360)], NOW + 50)
    listed, _ = _listed(store, store_path)
    assert (listed[sid]["held"], listed[sid]["released"]) == (2, 1)
    svc.tick(T0 + DAY + 120, NOW + 60)
    listed, _ = _listed(store, store_path)
    assert (listed[sid]["held"], listed[sid]["released"]) == (2, 2)
