"""create_app(settings): the one place where the appliance is wired together."""

from __future__ import annotations

from flask import Flask

from appliance import __version__, deadline, reqlog, serving, web
from appliance.api import admin, errors, health, kserve, metrics, openai, openapi
from appliance.audit import trail
from appliance.audit.records import Entry
from appliance.audit.store import AuditStore, local_actor
from appliance.auth import guard
from appliance.auth.store import AuthStore
from appliance.config import Settings
from appliance.tls import tls_enabled


def create_app(settings: Settings) -> Flask:
    app = Flask("appliance", static_folder=None)
    app.config["APPLIANCE_SETTINGS"] = settings
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.json.sort_keys = False  # type: ignore[attr-defined]
    store = AuditStore(settings)  # first: no model serves without an audit log
    # before_request runs in this order (request id, audit context, then the gate);
    # after_request in reverse (the audit record is written before the log line).
    reqlog.init_app(app)
    metrics.init_app(app)
    trail.init_app(app, store)
    guard.init_app(app, settings, AuthStore(settings), secure_cookies=tls_enabled(settings))
    errors.register(app)
    pool = serving.init_app(app, settings)
    blueprints = (
        health.bp,
        openapi.bp,
        openai.bp,
        kserve.bp,
        metrics.bp,
        admin.bp,
        admin.audit_bp,
        web.bp,
    )
    for blueprint in blueprints:
        app.register_blueprint(blueprint)
    deadline.init_app(app, settings.client_timeout)
    store.append(
        Entry(
            kind="admin",
            route="serve",
            method="START",
            status=0,
            actor=local_actor(),
            content={
                "action": "start",
                "version": __version__,
                "models": {n: m.manifest.sha256 for n, m in pool.served.items()},
                "refused": pool.refused,
            },
        )
    )
    return app


STALL_SECONDS = 60.0


def health_problem(app: Flask) -> str | None:
    """What keeps the watchdog from pinging: a wedged engine or a dead audit writer."""
    if not trail.get_store(app).alive:
        return "the audit writer has stopped"
    for model in serving.get_pool(app).served.values():
        problem = model.scheduler.stalled(STALL_SECONDS)
        if problem:
            return problem
    return None


def close_app(app: Flask) -> None:
    """Stop the models, then seal and close the audit log."""
    serving.get_pool(app).close()
    guard.get_gate(app).store.close()
    trail.get_store(app).close()
