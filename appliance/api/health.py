"""/healthz (the process answers), /livez (the process is alive and not wedged: what
systemd's watchdog checks) and /readyz (every pinned model loaded, the audit log
writable and its checkpoints copied out; with every model's state and memory).

Draining (SIGTERM with ``drain_seconds``, or POST /admin/drain): /readyz answers 404, which
HAProxy's ``http-check disable-on-404`` reads as "no new work", while the requests that
still come are served, each answer closing its connection so the client's next request
goes through the balancer again."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from flask import Blueprint, Flask, Response, current_app

from appliance.api.trail import get_store
from appliance.serving import get_pool

bp = Blueprint("health", __name__)
DRAIN = "appliance.drain"


@dataclass
class Drain:
    """Whether this box is draining, since when and why."""

    reason: str | None = None
    since: float | None = None  # time.time()
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def draining(self) -> bool:
        return self.reason is not None

    def begin(self, reason: str) -> bool:
        """Start draining; False if it already was."""
        with self._lock:
            if self.reason is not None:
                return False
            self.reason, self.since = reason, time.time()
            return True

    def end(self) -> bool:
        """Take work again; False if it was not draining."""
        with self._lock:
            if self.reason is None:
                return False
            self.reason = self.since = None
            return True

    def state(self) -> dict[str, object]:
        with self._lock:
            return {"draining": self.reason is not None, "reason": self.reason, "since": self.since}


def get_drain(app: Flask) -> Drain:
    drain: Drain = app.extensions[DRAIN]
    return drain


def init_app(app: Flask) -> Drain:
    drain = app.extensions[DRAIN] = Drain()

    @app.after_request
    def close_while_draining(resp: Response) -> Response:
        if drain.draining:  # the next request goes through the balancer again
            resp.headers["Connection"] = "close"
        return resp

    # gunicorn drops an application's Connection header (hop-by-hop) and decides
    # itself: tell its response object to close instead.
    inner = app.wsgi_app

    def closing_wsgi_app(environ: dict[str, Any], start_response: Any) -> Any:
        if not drain.draining:
            return inner(environ, start_response)

        def start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            write = start_response(status, headers, exc_info)
            server_response: Any = getattr(start_response, "__self__", None)
            if hasattr(server_response, "must_close"):
                server_response.must_close = True
            return write

        return inner(environ, start)

    app.wsgi_app = closing_wsgi_app  # type: ignore[method-assign]
    return drain


@bp.get("/healthz")
def healthz() -> Response:
    return Response('{"status":"alive"}', mimetype="application/json")


@bp.get("/livez")
def livez() -> Response:
    """Alive and not wedged: the same check that keeps systemd's watchdog fed. A
    liveness probe that fails here should restart the process."""
    from appliance.app import health_problem  # the app module wires this blueprint

    problem = health_problem(current_app)
    body = {"live": problem is None, "problem": problem}
    return Response(
        json.dumps(body), status=200 if problem is None else 503, mimetype="application/json"
    )


def readiness(app: Flask) -> tuple[bool, list[str]]:
    """Ready, or why not: every pinned model loaded (the others load on demand), the
    audit log writable. The one answer behind /readyz and /v2/health/ready."""
    pool = get_pool(app)
    store = get_store(app)
    reasons = pool.not_ready_reasons()
    if not store.healthy:
        reasons.append(f"the audit log cannot be written: {store.last_error}")
    if store.checkpoint_error is not None:  # the external copy is what catches a rollback
        reasons.append(f"the audit checkpoint cannot be copied out: {store.checkpoint_error}")
    drain = get_drain(app)
    if drain.draining:
        reasons.insert(0, f"draining: {drain.reason}")
    ready = pool.ready and store.healthy and store.checkpoint_error is None and not drain.draining
    return ready, reasons


@bp.get("/readyz")
def readyz() -> Response:
    pool = get_pool(current_app)
    store = get_store(current_app)
    ready, reasons = readiness(current_app)
    audit = {
        "writable": store.healthy,
        "error": store.last_error,
        "checkpoint_copy_error": store.checkpoint_error,
    }
    body = {
        "ready": ready,
        "reasons": reasons,
        "models": pool.state(),
        "memory": pool.budget_state(),
        "audit": audit,
        "drain": get_drain(current_app).state(),
    }
    # 404 while draining: HAProxy's disable-on-404 sends no new work, keeps what runs.
    status = 200 if ready else 404 if get_drain(current_app).draining else 503
    return Response(json.dumps(body), status=status, mimetype="application/json")
