"""The console after the engine re-decided a detection (same id, crossing later): the case page lists the finding
once, at its latest version, and the audit trail shows the one `redecided` event with knowledge_at and due_at
moved, as UTC text; served by uvicorn in this process, driven by Debian's chromium (as tests/test_console_e2e.py)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from pipeline.cases.report import utc
from pipeline.cases.service import CaseService
from pipeline.store import Store
from pipeline.web.app import create_app
from pipeline.web.views import Console
from tests.test_cases_core import BIS, DAY, NOW, T0, cip, det
from tests.test_console_e2e import _login, _settings
from tests.web_browser import chromium, served


@pytest.fixture
def redecided_store(store: Store) -> tuple[Store, str]:
    store.upsert_cip([cip()])
    svc = CaseService(store, BIS)
    for d, now in ((det(t=T0), NOW), (det(t=T0 + 180), NOW + 60), (det(t=T0 + 180), NOW + 120)):  # + a redelivery
        store.insert_detections([d])
        svc.process([d], now)
    (case,) = store.list_cases()
    return store, case.case_id


@pytest.fixture
def base_url(redecided_store: tuple[Store, str]) -> Iterator[str]:
    app = create_app(Console(redecided_store[0], BIS.id), _settings(), as_of="event")
    with served(app) as url:
        yield url


@pytest.fixture
def browser() -> Iterator[Any]:
    with chromium() as b:
        yield b


def test_case_page_shows_the_latest_version_once_and_the_move_in_the_audit(
        redecided_store: tuple[Store, str], base_url: str, browser: Any) -> None:
    store, case_id = redecided_store
    assert [d.event_time for d in store.list_detections()] == [T0 + 180]  # the detections table: one row per id
    page = _login(browser, base_url, "cleo")
    page.goto(f"{base_url}/cases/{case_id}")
    rows = page.locator("#evidence table.evidence tbody tr")
    assert rows.count() == 1 and utc(T0 + 180) in rows.inner_text() and utc(T0) not in rows.inner_text()
    assert page.locator("table[data-testid=audit] tbody tr").count() == 2  # opened, redecided: no redelivery row
    moved = page.locator("table[data-testid=audit] tr[data-action=redecided]")
    text = moved.inner_text()
    assert f"knowledge_at: {utc(T0)} → {utc(T0 + 180)}" in text
    assert f"due_at: {utc(T0 + 15 * DAY)} → {utc(T0 + 180 + 15 * DAY)}" in text
    assert "why: detection_redecided" in text and f"event_time {utc(T0)}" in text
    # the queue and the JSON API agree: one case, due at the moved date
    api = page.request.get(f"{base_url}/api/cases/{case_id}").json()
    assert api["case"]["due_at"] == T0 + 180 + 15 * DAY and len(api["case"]["evidence"]["detections"]) == 1
