"""The compliance console end to end: the demo scenario replayed into a temp chDB database, the console served by
uvicorn in this process (chDB allows one engine path per process), driven by Debian's chromium through Playwright,
its API fuzzed by schemathesis, and the Grafana dashboard's ClickHouse queries run against the same database."""

from __future__ import annotations

import base64
import io
import json
import logging
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from argon2 import PasswordHasher

from pipeline.runner import InProcessPipeline
from pipeline.simulator import simulate
from pipeline.sources import read_folder
from pipeline.store import Store
from pipeline.web.app import create_app
from pipeline.web.config import ConsoleSettings, ConsoleUser
from pipeline.web.redact import identity_values
from pipeline.web.views import Console
from schemas.policy import load_policy
from tests.web_browser import chromium, served

DASHBOARD = Path(__file__).resolve().parents[1] / "deploy" / "grafana" / "trainwatch.json"
# Cheap argon2 parameters for test users only (the hash carries its parameters; production hashes use defaults).
_HASHER = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
USERS = {"ana": ("analyst", "ana-pass-1"), "cleo": ("compliance", "cleo-pass-1")}
DAY = 86_400.0


def _basic(user: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{USERS[user][1]}".encode()).decode()}


def _settings(**extra: Any) -> ConsoleSettings:
    users = {u: ConsoleUser(role=r, password_hash=_HASHER.hash(p)) for u, (r, p) in USERS.items()}
    return ConsoleSettings(users=users, secret_key="test-secret-key", **extra)


@pytest.fixture(scope="module")
def demo_store(store_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    """The demo scenario replayed once into its own database (processing time pinned, as test_demo_e2e does)."""
    folder = simulate("demo", tmp_path_factory.mktemp("console") / "demo", seed=0)
    store = Store.connect(f"chdb://{store_path}", f"test_console_{uuid.uuid4().hex[:8]}")
    try:
        InProcessPipeline(store, load_policy("demo"), clock=lambda: 1_800_000_000.0).run(read_folder(folder))
        yield store
    finally:
        store.drop_database()
        store.close()


@pytest.fixture(scope="module")
def cases(demo_store: Store) -> dict[str, Any]:
    """Every demo case, as stored before any console action: by account id, a second case of one account (two
    monitored runs) under its case id, so that len() and values() cover them all."""
    out: dict[str, Any] = {}
    for c in demo_store.list_cases():
        out[c.case_id if c.account_id in out else c.account_id] = c
    return out


@pytest.fixture(scope="module")
def app(demo_store: Store) -> Any:
    return create_app(Console(demo_store, "demo"), _settings(), as_of="event")


@pytest.fixture(scope="module")
def base_url(app: Any) -> Iterator[str]:
    with served(app) as url:
        yield url


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with chromium() as b:
        yield b


def _login(browser: Any, base_url: str, user: str) -> Any:
    page = browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
    page.goto(f"{base_url}/cases/anything")  # a deep link: login first, then back to it
    assert "/login" in page.url
    page.fill("input[name=username]", user)
    page.fill("input[name=password]", USERS[user][1])
    page.click("button[type=submit]")
    page.wait_for_url(re.compile(r".*/cases/anything$"))
    return page


def _pdf_text(body: bytes) -> str:
    """The PDF's text with whitespace collapsed (a value wrapped over two lines still matches)."""
    from pypdf import PdfReader

    return " ".join(" ".join(p.extract_text() for p in PdfReader(io.BytesIO(body)).pages).split())


def _plot_loaded(page: Any) -> bool:
    return page.eval_on_selector("img[data-testid=plot]", "img => img.complete && img.naturalWidth > 0")


def test_compliance_works_a_case_in_the_browser(browser: Any, base_url: str, cases: dict[str, Any],
                                                tmp_path: Path) -> None:
    page = _login(browser, base_url, "cleo")
    first, second = sorted((c for c in cases.values() if c.due_at), key=lambda c: c.due_at)[:2]
    # As of halfway between the two soonest due dates: the first is overdue, the second due within hours.
    as_of = (first.due_at + second.due_at) / 2
    page.goto(f"{base_url}/?as_of={as_of}")
    assert page.inner_text("[data-testid=role]") == "compliance"
    rows = page.locator("table[data-testid=queue] tbody tr")
    assert rows.count() == len(cases)
    assert page.get_attribute(f"tr[data-case='{first.case_id}']", "data-urgency") == "overdue"
    assert page.get_attribute(f"tr[data-case='{second.case_id}']", "data-urgency") == "soon"
    assert "open 6" in " ".join(page.inner_text("[data-testid=counts]").split())
    page.screenshot(path=str(tmp_path / "queue.png"), full_page=True)
    page.click("ul.counts li.urg-overdue a")  # the count links keep as_of
    assert [r.get_attribute("data-case") for r in rows.all()] == [first.case_id]
    page.goto(f"{base_url}/?as_of={as_of}")

    # Filter, then open the compute_projected case from the queue.
    page.select_option("select[name=reason]", "compute_projected")
    page.click("form.filters button[type=submit]")
    assert rows.count() == sum(c.reason == "compute_projected" for c in cases.values())
    target = cases["acct-us-fo"]
    page.click(f"tr[data-case='{target.case_id}'] a")
    page.wait_for_url(re.compile(rf".*/cases/{target.case_id}.*"))
    assert _plot_loaded(page)
    accelerators = next(iter(target.evidence["detections"].values()))["evidence"]["run"]["accelerators"]
    assert all(model in page.inner_text("#run") for model in accelerators)
    assert page.inner_text("[data-testid=duration]").endswith(" h")
    assert "p(training)" in page.inner_text("#classifier")
    assert "foreign" in page.inner_text("#foreign")
    assert target.identity["name"] in page.inner_text("[data-testid=identity]")
    svg = page.request.get(f"{base_url}/cases/{target.case_id}/plot.svg").text()
    for label in ("threshold", "knowledge_at", "due_at", "projected to reservation end", "low-high band"):
        assert label in svg, label

    # Acknowledge with a reason: the flash says so and the audit trail shows the event with the actor.
    page.fill("form[data-action=acknowledge] input[name=text]", "taking it: projected run of a foreign customer")
    page.click("form[data-action=acknowledge] button")
    assert "acknowledge: case is now acknowledged" in page.inner_text("[data-testid=flash]")
    assert page.inner_text("[data-testid=status]") == "acknowledged"
    audit = page.locator("table[data-testid=audit] tr[data-action=acknowledged]")
    assert audit.count() == 1 and "cleo" in audit.inner_text()
    assert "projected run of a foreign customer" in audit.inner_text()  # the reason is kept in the audit event
    page.screenshot(path=str(tmp_path / "case-compliance.png"), full_page=True)

    # The draft report: HTML with the identity, and a PDF.
    page.goto(f"{base_url}/cases/{target.case_id}/report")
    assert target.identity["name"] in page.inner_text("[data-testid=identity]")
    pdf = page.request.get(f"{base_url}/cases/{target.case_id}/report.pdf")
    assert pdf.headers["content-type"] == "application/pdf" and pdf.body()[:5] == b"%PDF-"
    assert len(pdf.body()) > 10_000  # text, fonts and the plot image
    text = _pdf_text(pdf.body())
    assert target.identity["name"] in text and "Compute estimate" in text and target.case_id in text
    page.context.close()


def test_analyst_sees_no_identity_in_pages_or_api(browser: Any, base_url: str, cases: dict[str, Any],
                                                  tmp_path: Path) -> None:
    page = _login(browser, base_url, "ana")
    page.goto(f"{base_url}/")
    assert page.inner_text("[data-testid=role]") == "analyst"
    leaks: list[str] = []
    for c in cases.values():
        values = identity_values(c.identity)
        assert values, c.account_id  # every demo case carries identity, so the check below can fail
        page.goto(f"{base_url}/cases/{c.case_id}")
        assert _plot_loaded(page)
        assert page.locator("[data-testid=identity-withheld]").count() == 1
        assert page.locator("form[data-action=dismiss], form[data-action=report]").count() == 0
        texts = {"page": page.content()}
        for path in ("", "/events", "/report", "/plot"):
            r = page.request.get(f"{base_url}/api/cases/{c.case_id}{path}")
            assert r.ok, (path, r.status)
            texts[f"api{path}"] = r.text()
        texts["report"] = page.request.get(f"{base_url}/cases/{c.case_id}/report").text()
        assert '"identity"' not in texts["api"]
        leaks += [f"{c.account_id} {where}: {v}" for where, t in texts.items() for v in values if v in t]
    queue = page.request.get(f"{base_url}/api/cases").text()
    leaks += [v for c in cases.values() for v in identity_values(c.identity) if v in queue]
    assert leaks == []
    for account in ("acct-resold", "acct-us-fo"):  # the draft report PDF: reseller, owners, customer all withheld
        c = cases[account]
        text = _pdf_text(page.request.get(f"{base_url}/cases/{c.case_id}/report.pdf").body())
        assert "Withheld: the analyst role" in text and c.case_id in text
        leaks += [f"{account} pdf: {v}" for v in identity_values(c.identity) if " ".join(v.split()) in text]
    assert leaks == []
    # The reseller's name sits inside a foreign-person reason: scrubbed there too.
    page.goto(f"{base_url}/cases/{cases['acct-resold'].case_id}")
    assert "foreign_reseller:[withheld]" in page.inner_text("#foreign")
    page.screenshot(path=str(tmp_path / "case-analyst.png"), full_page=True)
    page.context.close()


def test_plot_series_crosses_the_threshold_at_knowledge_time(app: Any, cases: dict[str, Any]) -> None:
    """The plot's data is the store's windows: for cases opened on compute used, the cumulative estimate reaches the
    threshold within one window of knowledge_at (the detector interpolates inside the crossing window)."""
    from fastapi.testclient import TestClient

    client = TestClient(app)
    checked = 0
    for c in cases.values():
        if c.reason not in ("compute_used", "owner_aggregate") or c.knowledge_at is None:
            continue
        s = client.get(f"/api/cases/{c.case_id}/plot", headers=_basic("ana")).json()
        assert s["scope"] == "run" and s["t"] == sorted(s["t"])
        assert all(lo <= f <= hi for lo, f, hi in zip(s["low"], s["flop"], s["high"], strict=True))
        crossing = next(t for t, f in zip(s["t"], s["flop"], strict=True) if f >= s["threshold"])
        assert c.knowledge_at <= crossing <= c.knowledge_at + 60.0, (c.account_id, crossing, c.knowledge_at)
        checked += 1
    assert checked >= 3
    projected = client.get(f"/api/cases/{cases['acct-us-fo'].case_id}/plot", headers=_basic("ana")).json()
    assert projected["projected"] and projected["projected"][3] >= projected["threshold"]


def test_api_roles_validation_and_csrf(app: Any, cases: dict[str, Any], caplog: pytest.LogCaptureFixture) -> None:
    from fastapi.testclient import TestClient

    client = TestClient(app)
    case = cases["acct-de-ai"]
    url = f"/api/cases/{case.case_id}/actions"
    assert client.get("/api/cases").status_code == 401
    assert client.get("/api/me", headers=_basic("ana")).json() == {"name": "ana", "role": "analyst"}
    # Role, required text and transition rules; each refusal writes nothing.
    assert client.post(f"{url}/dismiss", json={"reason": "x"}, headers=_basic("ana")).status_code == 403
    r = client.post(f"{url}/dismiss", json={"reason": "  "}, headers=_basic("cleo"))
    assert r.status_code == 422 and "reason is required" in r.json()["detail"]
    assert client.post(f"{url}/review", json={"reason": "x", "training": True}, headers=_basic("cleo")).status_code \
        == 409  # not a needs_review case
    done = client.post(f"{url}/report", json={"reference": "BIS-2025-0001"}, headers=_basic("cleo"))
    assert done.status_code == 200 and done.json()["status"] == "reported"
    assert done.json()["events"][0]["details"]["filing_reference"] == "BIS-2025-0001"
    again = client.post(f"{url}/report", json={"reference": "BIS-2025-0002"}, headers=_basic("cleo"))
    assert again.status_code == 409 and "reported" in again.json()["detail"]
    events = client.get(f"/api/cases/{case.case_id}/events", headers=_basic("cleo")).json()
    assert [e["action"] for e in events].count("reported") == 1

    # A session cookie alone cannot post: forms need the CSRF field, the API the X-CSRF-Token header.
    page = client.get("/login")
    token = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
    assert client.post("/login", data={"username": "cleo", "password": USERS["cleo"][1], "csrf_token": "nope"}
                       ).status_code == 403
    r = client.post("/login", data={"username": "cleo", "password": USERS["cleo"][1], "csrf_token": token},
                    follow_redirects=False)
    assert r.status_code == 303
    other = cases["acct-scope"].case_id
    assert client.post(f"/api/cases/{other}/actions/acknowledge", json={"reason": "r"}).status_code == 403
    r = client.post(f"/cases/{other}/actions/acknowledge", data={"text": "r", "csrf_token": "forged"})
    assert r.status_code == 403
    assert client.get(f"/api/cases/{other}").json()["case"]["status"] == "open"

    # Failed logins: throttled after the configured count, logged with the name and never the password.
    caplog.set_level(logging.WARNING, logger="trainwatch.console")
    wrong = "Wrong-Secret-123"
    codes = [client.get("/api/me", auth=("ana", wrong)).status_code for _ in range(6)]
    assert codes == [401] * 5 + [429]
    assert client.get("/api/me", auth=("ana", USERS["ana"][1])).status_code == 429  # blocked for the window
    assert "login failed: user='ana'" in caplog.text and wrong not in caplog.text


def test_proxy_header_mode_trusts_only_its_proxy(demo_store: Store) -> None:
    from fastapi.testclient import TestClient

    app = create_app(Console(demo_store, "demo"), _settings(proxy_auth=True, proxy_trusted=["testclient"]))
    client = TestClient(app)
    sso = {"X-Forwarded-User": "sam@example.com", "X-Forwarded-Groups": "staff, trainwatch-compliance"}
    assert client.get("/api/me", headers=sso).json() == {"name": "sam@example.com", "role": "compliance"}
    assert client.get("/api/me", headers={"X-Forwarded-User": "ria"}).json()["role"] == "analyst"
    untrusted = TestClient(create_app(Console(demo_store, "demo"), _settings(proxy_auth=True)))
    assert untrusted.get("/api/me", headers=sso).status_code == 401  # the peer is not the configured proxy


def test_metrics_and_grafana_queries(app: Any, demo_store: Store, cases: dict[str, Any]) -> None:
    from fastapi.testclient import TestClient

    text = TestClient(app).get("/metrics").text
    now_cases = demo_store.list_cases()
    pending = sum(c.status in ("open", "needs_review", "acknowledged") for c in now_cases)
    assert f"trainwatch_cases_overdue {float(pending)}" in text  # demo due dates are in 2025: all past
    monitored = sum(c.status == "monitored" for c in now_cases)
    assert monitored >= 1
    assert f'trainwatch_cases{{status="monitored"}} {float(monitored)}' in text

    dashboard = json.loads(DASHBOARD.read_text())
    t0, t1 = (demo_store.query("SELECT min(window_start) a, max(window_end) b FROM windows")[0][k] for k in "ab")
    ran: dict[str, list[dict[str, Any]]] = {}
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            if "rawSql" not in target:
                continue
            sql = target["rawSql"].replace("${database}", demo_store.database)
            # Grafana's ClickHouse plugin macros, expanded as the plugin does for the dashboard's time range.
            sql = re.sub(r"\$__timeFilter\(([^()]*(?:\([^()]*\))?[^()]*)\)",
                         rf"(\1 >= toDateTime({int(t0)}) AND \1 <= toDateTime({int(t1)}))", sql)
            assert "$" not in sql, sql
            ran[panel["title"]] = demo_store.query(sql)
    assert len(ran) >= 6
    for title in ("Cases per status", "Open cases by due date", "Compute per account (top 50)",
                  "Estimated compute per 5 minutes of event time", "Case events per hour of event time",
                  "Detections per detector"):
        assert ran[title], title
    assert {r["status"]: r["cases"] for r in ran["Cases per status"]}["monitored"] == monitored
    pii = {"name", "address", "emails", "phones", "identity", "record"}
    assert not [k for rows in ran.values() for r in rows for k in r if k in pii]


def test_api_fuzz_no_server_errors(app: Any) -> None:
    """schemathesis over every operation of the OpenAPI document, as compliance: never a 5xx (8 examples each)."""
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from schemathesis.checks import not_a_server_error

    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [r.ok() for r in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/api/cases", "/api/cases/{case_id}/actions/{action}"}
    for op in operations:
        @given(case=op.as_strategy())
        @settings(max_examples=8, deadline=None, phases=[Phase.explicit, Phase.generate], database=None,
                  suppress_health_check=list(HealthCheck))
        def run(case: Any) -> None:
            response = case.call(headers=_basic("cleo"))
            case.validate_response(response, checks=[not_a_server_error])

        run()
