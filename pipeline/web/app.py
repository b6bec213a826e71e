"""The console's routes: HTML pages (server-rendered with Jinja2, no JavaScript) and the JSON API under /api
(OpenAPI at /openapi.json, docs at /api/docs). Both call pipeline/web/views.py with the caller's role."""

from __future__ import annotations

import logging
import math
import secrets
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Form, HTTPException, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from pydantic import BaseModel, Field
from starlette.middleware.sessions import SessionMiddleware

from pipeline.cases.report import basis_text, utc
from pipeline.web import pdf, plot
from pipeline.web.auth import Authenticator, csrf_ok, csrf_token
from pipeline.web.config import ConsoleSettings
from pipeline.web.views import ACTIONS, STATUSES, ActionRejected, Console, NotFound, Viewer
from schemas.errors import TrainwatchError

log = logging.getLogger("trainwatch.console")
HERE = Path(__file__).resolve().parent
ActionName = Literal["acknowledge", "review", "report", "dismiss"]
# No scripts at all, styles and images from here only, never framed, forms post only here.
_CSP = ("default-src 'none'; img-src 'self'; style-src 'self'; form-action 'self'; frame-ancestors 'none'; "
        "base-uri 'none'")


class LoginRequired(Exception):
    pass


class ActionIn(BaseModel):
    reason: str | None = Field(default=None, max_length=4000, description="acknowledge, review, dismiss: why")
    reference: str | None = Field(default=None, max_length=400, description="report: the filing's reference")
    training: bool | None = Field(default=None, description="review: the finding")


class ActionOut(BaseModel):
    case_id: str
    status: str
    version: int
    events: list[dict[str, Any]]
    feed: dict[str, Any] | None = None  # what became of the change on the compliance feed (None: not wired)


class QueueOut(BaseModel):
    as_of: float
    as_of_utc: str | None
    cases: list[dict[str, Any]]
    counts: dict[str, int]
    overdue: int
    due_soon: int
    reasons: list[str]
    policies: list[str]


class Me(BaseModel):
    name: str
    role: str


def client_of(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def page_viewer(request: Request) -> Viewer:
    auth: Authenticator = request.app.state.auth
    viewer = auth.proxied(request.headers, client_of(request)) or auth.session_viewer(request.session)
    if viewer is None:
        raise LoginRequired()
    return viewer


def api_viewer(request: Request) -> Viewer:
    auth: Authenticator = request.app.state.auth
    viewer, via = auth.proxied(request.headers, client_of(request)), "proxy"
    header = request.headers.get("authorization")
    if viewer is None and header:
        # Credentials sent explicitly win over a session cookie, and wrong ones fail (never fall back to it).
        found = auth.basic(header, client_of(request))
        if found is False:
            raise HTTPException(429, "too many failed logins; wait and retry")
        viewer, via = (found or None), "basic"
        if viewer is None:
            raise HTTPException(401, "wrong credentials", headers={"WWW-Authenticate": 'Basic realm="trainwatch"'})
    if viewer is None:
        viewer, via = auth.session_viewer(request.session), "session"
    if viewer is None:
        raise HTTPException(401, "authentication required", headers={"WWW-Authenticate": 'Basic realm="trainwatch"'})
    # Cookie- and proxy-authenticated writes come from a browser: they need the CSRF header too.
    if request.method not in ("GET", "HEAD", "OPTIONS") and via != "basic" and not csrf_ok(
        request.session, request.headers.get("x-csrf-token")
    ):
        raise HTTPException(403, "CSRF token missing or wrong (send X-CSRF-Token)")
    return viewer


PageViewer = Annotated[Viewer, Depends(page_viewer)]
ApiViewer = Annotated[Viewer, Depends(api_viewer)]


def _fmt_flop(x: Any) -> str:
    return f"{x:.3g}" if isinstance(x, int | float) and not isinstance(x, bool) else "—" if x is None else str(x)


def _fmt_days(d: float | None) -> str:
    if d is None:
        return "—"
    return f"{d:.1f} d overdue" if d < 0 else f"{d:.1f} d"


def _fmt_detail(x: Any, key: str) -> str:
    """An audit detail value: epoch times (keys ending in _at, event_time) as UTC text, a change {from, to} as
    "from → to" (e.g. knowledge_at and due_at moved by a re-decided detection), other objects key by key."""
    if isinstance(x, dict):
        if set(x) == {"from", "to"}:
            return f"{_fmt_detail(x['from'], key)} → {_fmt_detail(x['to'], key)}"
        return ", ".join(f"{k} {_fmt_detail(v, k)}" for k, v in x.items())
    if x is None:
        return "—"
    if (key.endswith("_at") or key == "event_time") and isinstance(x, int | float) and not isinstance(x, bool):
        return utc(float(x)) or ""
    return str(x)


def _local(path: str) -> str:
    """`path` if it stays on this site, else "/": no open redirect through ?next= ("//host", "/\\host", "https:")."""
    ok = path.startswith("/") and not path.startswith(("//", "/\\")) and not any(c in path for c in "\r\n\t")
    return path if ok else "/"


# as_of must be a real event time: the schemas' EpochSeconds range (year 2000 to before 10000).
_AS_OF_MIN, _AS_OF_MAX = 946_684_800.0, 253_402_300_800.0


def _parse_as_of(value: str | None) -> float | None:
    if value is None or value.strip() == "":
        return None
    v = value.strip()
    try:
        t = float(v)
    except ValueError:
        try:
            dt = datetime.fromisoformat(v.replace("Z", "+00:00"))
        except ValueError as exc:
            raise HTTPException(422, f"as_of: {value!r} is neither epoch seconds nor an ISO 8601 time") from exc
        t = (dt if dt.tzinfo else dt.replace(tzinfo=UTC)).timestamp()
    if not (math.isfinite(t) and _AS_OF_MIN <= t < _AS_OF_MAX):
        raise HTTPException(422, f"as_of: {value!r} is not a time between the years 2000 and 9999")
    return t


def create_app(console: Console, settings: ConsoleSettings, as_of: str = "now") -> FastAPI:
    """The app. `as_of` is the default time days-left are counted from: "now", "event" (the store's latest event
    time, for replays and the demo) or epoch seconds / ISO 8601; a page's `as_of` query parameter overrides it."""
    auth = Authenticator(settings)
    secret = settings.secret_key.get_secret_value() if settings.secret_key else secrets.token_urlsafe(32)
    if settings.secret_key is None:
        log.warning("console: no secret_key set; sessions are signed with a per-process key")
    app = FastAPI(title="trainwatch compliance console", version="1", docs_url="/api/docs", redoc_url=None,
                  description="Cases, their evidence, audit trail and draft report; actions are validated and "
                              "audited like the CLI's. Analysts never receive identity (PII) fields.")
    app.add_middleware(SessionMiddleware, secret_key=secret, session_cookie="tw_session",
                       max_age=settings.session_max_age_s, same_site="lax", https_only=settings.secure_cookies)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    templates = Jinja2Templates(directory=HERE / "templates")
    templates.env.filters.update(flop=_fmt_flop, days=_fmt_days, utc=utc, basis=basis_text, detail=_fmt_detail)
    app.state.console = console
    app.state.auth = auth

    @app.middleware("http")
    async def security_headers(request: Request, call_next: Any) -> Response:
        response = await call_next(request)
        if not request.url.path.startswith("/api/docs"):
            response.headers.setdefault("Content-Security-Policy", _CSP)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "same-origin")
        response.headers.setdefault("Cache-Control", "no-store")
        return response

    fixed: float | None = None
    if as_of not in ("now", "event"):
        try:
            fixed = _parse_as_of(as_of)
        except HTTPException as exc:
            raise TrainwatchError(f"--as-of: {exc.detail} (or use now | event)") from exc

    def resolve_as_of(value: str | None) -> float:
        parsed = _parse_as_of(value)
        if parsed is not None:
            return parsed
        if fixed is not None:
            return fixed
        if as_of == "event":
            return console.latest_event_time() or console.clock()
        return console.clock()

    @app.exception_handler(LoginRequired)
    async def _login(request: Request, exc: LoginRequired) -> Response:
        return RedirectResponse(f"/login?next={request.url.path}", status_code=303)

    @app.exception_handler(NotFound)
    async def _not_found(request: Request, exc: NotFound) -> Response:
        if request.url.path.startswith("/api/"):
            return JSONResponse({"detail": str(exc)}, status_code=404)
        return PlainTextResponse(str(exc), status_code=404)

    def render(request: Request, name: str, viewer: Viewer | None, status: int = 200, **ctx: Any) -> Response:
        ctx.update(viewer=viewer, csrf=csrf_token(request.session), flash=request.session.pop("flash", None))
        return templates.TemplateResponse(request, name, ctx, status_code=status)

    # ---- login ----------------------------------------------------------------------------------------------------

    @app.get("/login", include_in_schema=False)
    def login_page(request: Request, next: str = "/") -> Response:
        return render(request, "login.html", None, next=_local(next))

    @app.post("/login", include_in_schema=False)
    def login(
        request: Request, username: Annotated[str, Form()] = "", password: Annotated[str, Form()] = "",
        csrf_token_: Annotated[str, Form(alias="csrf_token")] = "", next: Annotated[str, Form()] = "/",
    ) -> Response:
        if not csrf_ok(request.session, csrf_token_):
            return render(request, "login.html", None, 403, error="The form expired; try again.", next="/")
        found = auth.check_password(username, password, client_of(request))
        if found is False:
            return render(request, "login.html", None, 429, error="Too many failed logins. Wait a few minutes.",
                          next="/")
        if found is None:
            return render(request, "login.html", None, 401, error="Wrong user name or password.", next="/")
        request.session.clear()  # a fresh session (and CSRF token) at login: no fixation
        request.session["user"] = found.name
        csrf_token(request.session)
        log.info("console login: user=%r role=%s client=%s", found.name, found.role, client_of(request))
        return RedirectResponse(_local(next), status_code=303)

    @app.post("/logout", include_in_schema=False)
    def logout(request: Request, csrf_token_: Annotated[str, Form(alias="csrf_token")] = "") -> Response:
        if not csrf_ok(request.session, csrf_token_):
            raise HTTPException(403, "CSRF token missing or wrong")
        request.session.clear()
        return RedirectResponse("/login", status_code=303)

    # ---- pages ----------------------------------------------------------------------------------------------------

    @app.get("/", include_in_schema=False)
    def queue_page(
        request: Request, viewer: PageViewer, status: Annotated[list[str] | None, Query()] = None,
        reason: str | None = None, policy: str | None = None, subject: str | None = None, due: str | None = None,
        as_of: str | None = None,
    ) -> Response:
        q = console.queue(viewer, resolve_as_of(as_of), status=[s for s in status or [] if s] or None,
                          reason=reason or None, policy=policy or None, subject=subject or None, due=due or None)
        return render(request, "queue.html", viewer, q=q, statuses=STATUSES,
                      filters={"status": status or [], "reason": reason or "", "policy": policy or "",
                               "subject": subject or "", "due": due or "", "as_of": as_of or ""})

    @app.get("/cases/{case_id}", include_in_schema=False)
    def case_page(request: Request, case_id: str, viewer: PageViewer, as_of: str | None = None) -> Response:
        view = console.case(viewer, case_id, resolve_as_of(as_of))
        return render(request, "case.html", viewer, v=view, actions=ACTIONS, as_of=as_of or "")

    @app.get("/cases/{case_id}/plot.svg", include_in_schema=False)
    def plot_svg(case_id: str, viewer: PageViewer) -> Response:
        return Response(plot.render(console.series(case_id), "svg"), media_type="image/svg+xml")

    @app.post("/cases/{case_id}/actions/{action}", include_in_schema=False)
    def act_form(
        request: Request, case_id: str, action: str, viewer: PageViewer,
        csrf_token_: Annotated[str, Form(alias="csrf_token")] = "", text: Annotated[str, Form()] = "",
        training: Annotated[str, Form()] = "",
    ) -> Response:
        if not csrf_ok(request.session, csrf_token_):
            raise HTTPException(403, "CSRF token missing or wrong")
        finding = {"training": True, "not_training": False}.get(training)
        try:
            done = console.act(viewer, case_id, action, text, finding)
            feed = done["feed"]
            request.session["flash"] = (f"{action}: case is now {done['status']} (version {done['version']})"
                                        + (f"; {feed['note']}" if feed else ""))
        except ActionRejected as exc:
            request.session["flash"] = f"refused: {exc}"
        return RedirectResponse(f"/cases/{case_id}#audit", status_code=303)

    @app.get("/cases/{case_id}/report", include_in_schema=False)
    def report_page(request: Request, case_id: str, viewer: PageViewer) -> Response:
        return render(request, "report.html", viewer, r=console.report(viewer, case_id), case_id=case_id)

    @app.get("/cases/{case_id}/report.pdf", include_in_schema=False)
    def report_pdf(case_id: str, viewer: PageViewer) -> Response:
        rep = console.report(viewer, case_id)
        body = pdf.render_pdf(rep, plot.render(console.series(case_id), "png"))
        return Response(body, media_type="application/pdf",
                        headers={"Content-Disposition": f'inline; filename="{case_id}-draft.pdf"'})

    @app.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        from pipeline.stage_metrics import case_metrics_text

        return Response(case_metrics_text(console.store, console.clock()),
                        media_type="text/plain; version=0.0.4; charset=utf-8")

    # ---- JSON API ------------------------------------------------------------------------------------------------

    @app.get("/api/me", response_model=Me, tags=["session"])
    def api_me(viewer: ApiViewer) -> Me:
        """Who the API sees, and with which role."""
        return Me(name=viewer.name, role=viewer.role)

    @app.get("/api/cases", response_model=QueueOut, tags=["cases"])
    def api_queue(
        viewer: ApiViewer, status: Annotated[list[str] | None, Query()] = None, reason: str | None = None,
        policy: str | None = None, subject: str | None = None,
        due: Literal["overdue", "soon"] | None = None, as_of: str | None = None,
    ) -> dict[str, Any]:
        """The queue: cases soonest due first, with days left as of `as_of` (epoch seconds or ISO 8601)."""
        return console.queue(viewer, resolve_as_of(as_of), status=status or None, reason=reason, policy=policy,
                             subject=subject, due=due)

    @app.get("/api/cases/{case_id}", tags=["cases"])
    def api_case(case_id: str, viewer: ApiViewer, as_of: str | None = None) -> dict[str, Any]:
        """One case: the case, its draft report, classifier verdict, foreign-person test, audit trail."""
        return console.case(viewer, case_id, resolve_as_of(as_of))

    @app.get("/api/cases/{case_id}/events", tags=["cases"])
    def api_events(case_id: str, viewer: ApiViewer) -> list[dict[str, Any]]:
        """The case's audit trail in event-time order."""
        return console.events(viewer, case_id)

    @app.get("/api/cases/{case_id}/report", tags=["cases"])
    def api_report(case_id: str, viewer: ApiViewer) -> dict[str, Any]:
        """The draft report (identity withheld for analysts)."""
        return console.report(viewer, case_id)

    @app.get("/api/cases/{case_id}/plot", tags=["cases"])
    def api_plot(case_id: str, viewer: ApiViewer) -> dict[str, Any]:
        """The plot's data: cumulative FLOP (estimate, low, high) at each window end, threshold, markers."""
        return console.series(case_id).as_json()

    @app.post("/api/cases/{case_id}/actions/{action}", response_model=ActionOut, tags=["actions"], responses={
        403: {"description": "the role may not do this"}, 404: {"description": "no such case"},
        409: {"description": "not allowed in this status"}, 422: {"description": "reason or reference missing"},
    })
    def api_act(case_id: str, action: ActionName, body: ActionIn, viewer: ApiViewer) -> dict[str, Any]:
        """Act on a case: acknowledge (reason), review (training + reason), report (reference), dismiss (reason).
        Validated by the same case rules as `trainwatch cases`; each appends an audit event."""
        text = body.reference if action == "report" else body.reason
        try:
            return console.act(viewer, case_id, action, text or "", body.training)
        except ActionRejected as exc:
            raise HTTPException(exc.status, str(exc)) from exc

    return app
