"""create_app(settings): the one place where the appliance is wired together."""

from __future__ import annotations

import logging

from flask import Flask

from appliance import __version__, deadline, inference, reqlog, routing, serving, web
from appliance.api import (
    admin,
    departures,
    errors,
    health,
    kserve,
    metrics,
    openai,
    openapi,
    tokens,
    trail,
)
from appliance.audit import siem, witness
from appliance.audit.records import Entry
from appliance.audit.store import AuditStore, AuditUnavailable, local_actor
from appliance.auth import guard
from appliance.auth.store import AuthStore
from appliance.config import Settings
from appliance.docs.grounding import LIBRARY, Library, grounding_stage
from appliance.inference.pipeline import Pipeline
from appliance.routing.router import Router
from appliance.routing.spec import RouteTable
from appliance.serving.loader import Loader
from appliance.serving.pool import PoolEvent
from appliance.tls import tls_enabled

log = logging.getLogger(__name__)


def create_app(settings: Settings, loader: Loader | None = None) -> Flask:
    """The app; ``loader`` turns manifests into engines (default: the real engines;
    the fast tests give a fake one)."""
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
    health.init_app(app)  # draining: /readyz 404, connections close after each answer
    pool = serving.init_app(app, settings, loader)
    pool.listeners.append(lambda event: _audit_pool_event(store, event))
    pool.open()  # verify every manifest, load the pinned models
    pool.start_reaper()
    library = Library(settings, pool)  # the site's documents, for grounded answers
    app.extensions[LIBRARY] = library
    stages = [grounding_stage(library, settings)]
    pipeline = inference.init_app(app, Pipeline(settings, pool, store, stages))
    routing.init_app(app, Router(pipeline, RouteTable(settings.routes_path, pool.has), store))
    blueprints = (
        health.bp,
        openapi.bp,
        openai.bp,
        tokens.bp,
        kserve.bp,
        metrics.bp,
        admin.bp,
        admin.audit_bp,
        web.bp,
    )
    for blueprint in blueprints:
        app.register_blueprint(blueprint)
    deadline.init_app(app, settings.client_timeout)
    departures.init_app(app)  # a plain answer's client that hangs up stops its model
    app.extensions[metrics.EXTENSION].history.start()  # everything it reads is wired
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
                "models": {n: m.manifest.sha256 for n, m in pool.loaded().items()},
                "refused": pool.refused(),
            },
        )
    )
    witness.init_app(app, settings, store)  # cosigning on its own thread, if configured
    siem.init_app(app, settings, store)  # the SIEM feed on its own thread, if configured
    return app


def _audit_pool_event(store: AuditStore, event: PoolEvent) -> None:
    """A model loaded or unloaded: which file (by hash), why, and what it took; a
    language model's load also says its kernels (and self-test) and where it runs."""
    entry = Entry(
        kind="admin",
        route="models",
        method=event.action.upper(),
        status=0,
        actor=local_actor(),
        model=event.model,
        model_sha256=event.sha256,
        content={
            "action": event.action,
            "reason": event.reason,
            "seconds": round(event.seconds, 3),
            "memory_bytes": event.memory_bytes,
            **event.runs_on,
        },
    )
    try:
        store.append(entry)
    except AuditUnavailable as exc:
        log.error("model event not audited", extra={"model": event.model, "error": str(exc)})


def health_problem(app: Flask) -> str | None:
    """What keeps the watchdog from pinging: a dead audit writer, or a language model
    whose engine has not stepped for stall_seconds while it had work."""
    if not trail.get_store(app).alive:
        return "the audit writer has stopped"
    limit = app.config["APPLIANCE_SETTINGS"].stall_seconds
    for model in serving.get_pool(app).loaded().values():
        problem = model.stalled(limit)
        if problem:
            return problem
    return None


def close_app(app: Flask) -> None:
    """Stop the models, then seal and close the audit log."""
    app.extensions[metrics.EXTENSION].history.stop()
    departures.get(app).stop()
    serving.get_pool(app).close()
    guard.get_gate(app).store.close()
    witness.close_app(app)  # what the last interval added, witnessed if it can be
    siem.close_app(app)  # what is written by now (model unloads) goes, if it can
    trail.get_store(app).close()
