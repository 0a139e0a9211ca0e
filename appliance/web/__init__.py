"""The browser side: sign-in, sign-out, the clinicians' page and IT's status page.
Every asset is served from here; the Content-Security-Policy allows nothing else."""

from __future__ import annotations

import hmac
import secrets
from collections import Counter
from datetime import UTC, datetime

from flask import (
    Blueprint,
    Response,
    current_app,
    make_response,
    redirect,
    render_template,
    request,
)
from werkzeug.wrappers import Response as BaseResponse

from appliance import context
from appliance.actors import Actor
from appliance.api.history import HEIGHT, WIDTH
from appliance.auth.guard import SESSION_COOKIE, get_gate
from appliance.auth.store import csrf_token

bp = Blueprint(
    "web", __name__, template_folder="templates", static_folder="static", static_url_path="/static"
)

LOGIN_CSRF_COOKIE = "appliance_login_csrf"
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
)
MESSAGES = {
    "wrong_password": "Wrong name or password.",
    "unknown_user": "Wrong name or password.",
    "disabled": "This account is disabled. Ask IT.",
    "locked": "Too many failed sign-ins: this account is locked for now. Try again later.",
    "locked_now": "Too many failed sign-ins: this account is locked for now. Try again later.",
    "too_many_attempts": "Too many failed sign-ins from this computer. Try again later.",
    "csrf": "The sign-in form expired. Please try again.",
}


@bp.after_request
def _headers(response: Response) -> Response:
    response.headers["Content-Security-Policy"] = CSP
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["Cache-Control"] = "no-store"
    return response


def _login_form(message: str = "", status: int = 200) -> Response:
    token = secrets.token_urlsafe(32)
    expired = request.args.get("expired") == "1"
    if expired and not message:
        message = "You were signed out after a period of inactivity."
    html = render_template("login.html", csrf=token, message=message)
    resp = make_response(html, status)
    resp.set_cookie(
        LOGIN_CSRF_COOKIE,
        token,
        httponly=True,
        samesite="Strict",
        secure=get_gate(current_app).secure_cookies,
        path="/login",
    )
    return resp


@bp.get("/login")
def login_page() -> Response:
    return _login_form()


@bp.post("/login")
def login() -> BaseResponse:
    # Login CSRF: the form's token must match the cookie set with the form.
    sent = request.form.get("csrf_token", "")
    expected = request.cookies.get(LOGIN_CSRF_COOKIE, "")
    if not expected or not hmac.compare_digest(sent, expected):
        context.current().note_error("csrf_failed")
        return _login_form(MESSAGES["csrf"], 403)
    name = request.form.get("username", "")[:64]
    result = get_gate(current_app).store.login(
        name, request.form.get("password", ""), request.remote_addr or ""
    )
    ctx = context.current()
    if result.principal is None or result.session is None:
        ctx.note_error(result.reason)
        # A name no account has is not recorded: it may be a password typed in the
        # wrong field, and the audit's actor column is not encrypted.
        known = result.reason not in ("unknown_user", "too_many_attempts")
        unknown = Actor(None, "unknown user", None)
        ctx.actor = Actor(f"user:{name}", name, None) if known else unknown
        status = 429 if result.reason == "too_many_attempts" else 401
        return _login_form(MESSAGES.get(result.reason, "Sign-in failed."), status)
    principal = result.principal
    ctx.actor = Actor(principal.id, principal.name, principal.role)
    resp = redirect("/", code=303)
    resp.set_cookie(
        SESSION_COOKIE,
        result.session,
        httponly=True,
        samesite="Strict",
        secure=get_gate(current_app).secure_cookies,
        path="/",
    )
    resp.delete_cookie(LOGIN_CSRF_COOKIE, path="/login")
    return resp


@bp.post("/logout")
def logout() -> BaseResponse:
    cookie = request.cookies.get(SESSION_COOKIE)
    if cookie:
        get_gate(current_app).store.end_session(cookie)
    resp = redirect("/login", code=303)
    resp.delete_cookie(SESSION_COOKIE, path="/")
    return resp


@bp.get("/")
def home() -> Response:
    assert context.current().principal is not None  # the gate lets no one in without
    settings = current_app.config["APPLIANCE_SETTINGS"]
    html = render_template(
        "home.html",
        **signed_in(),
        idle_seconds=settings.session_idle_minutes * 60,
        caution=settings.answer_caution,
    )
    return make_response(html)


def signed_in() -> dict[str, str]:
    """Who is signed in, for the header every page shows (name, role, sign-out)."""
    ctx = context.current()
    principal, cookie = ctx.principal, ctx.session_cookie
    if principal is None:
        return {}
    return {
        "user": principal.name,
        "role": principal.role,
        "csrf": csrf_token(cookie) if cookie else "",
    }


def forbidden_page(page: str) -> Response:
    """A signed-in person who may not open a page gets a page saying so, not JSON."""
    if page == "/status":
        heading, who_for = "This page is for IT", "It is for the appliance's administrators."
    else:
        heading, who_for = "This page is not for this account", "It is for other roles."
    html = render_template(
        "forbidden.html", page=page, heading=heading, who_for=who_for, **signed_in()
    )
    return make_response(html, 403)


@bp.get("/favicon.ico")
def favicon() -> Response:
    resp = bp.send_static_file("favicon.svg")
    resp.headers["Content-Type"] = "image/svg+xml"
    return resp


@bp.get("/status")
def status() -> Response:
    """For IT: models and their queues, routes, the machine's checks, the audit log."""
    from appliance.api.trail import get_store
    from appliance.doctor import examine
    from appliance.routing import get_router
    from appliance.serving import get_pool

    settings = current_app.config["APPLIANCE_SETTINGS"]
    store = get_store(current_app)
    pool = get_pool(current_app)
    router = get_router(current_app)
    with router.lock:
        answers = dict(router.counts)
    routes = []
    for name, route in sorted(router.table.routes().items()):
        counts: Counter[str] = Counter()
        for (r, _, outcome), n in answers.items():
            if r == name:
                counts[outcome] += n
        routes.append({**route.public(), "answers": dict(counts)})
    from appliance.docs.grounding import get_library

    library = get_library(current_app)
    index = library.index()
    from appliance.api.metrics import EXTENSION as METRICS

    history = current_app.extensions[METRICS].history
    html = render_template(
        "status.html",
        **signed_in(),
        charts=history.charts(),
        chart_size=(WIDTH, HEIGHT),
        collections=library.collections(),
        passages=len(index) if index is not None else 0,
        default_similarity=settings.retrieval_min_similarity / 100,
        models=pool.state(),
        routes=routes,
        route_problems=router.table.problems,
        memory=pool.budget_state(),
        checks=examine(settings, quick=True),
        audit={"writable": store.healthy, "error": store.last_error},
        drain=_drain_view(),
    )
    return make_response(html)


def _drain_view() -> dict[str, object]:
    from appliance.api.health import get_drain

    state = get_drain(current_app).state()
    since = state["since"]
    when = (
        datetime.fromtimestamp(since, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        if isinstance(since, float)
        else ""
    )
    return {**state, "since_text": when}


@bp.get("/api")
def api_reference() -> Response:
    """The API reference, rendered on the server from the /openapi.json document: it
    reads without scripts, and its assets are this blueprint's own."""
    from appliance.api.openapi import build_document, reference

    html = render_template("api.html", **signed_in(), **reference(build_document()))
    return make_response(html)
