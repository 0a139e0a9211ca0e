"""create_app(settings): the one place where the appliance is wired together."""

from __future__ import annotations

from flask import Flask

from appliance import __version__, reqlog, serving
from appliance.api import errors, health, openai, openapi
from appliance.audit import trail
from appliance.audit.records import Entry
from appliance.audit.store import AuditStore, local_actor
from appliance.config import Settings


def create_app(settings: Settings) -> Flask:
    app = Flask("appliance")
    app.config["APPLIANCE_SETTINGS"] = settings
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.json.sort_keys = False  # type: ignore[attr-defined]
    store = AuditStore(settings)  # first: no model serves without an audit log
    reqlog.init_app(app)
    trail.init_app(app, store)  # after reqlog: its after_request runs first
    errors.register(app)
    pool = serving.init_app(app, settings)
    app.register_blueprint(health.bp)
    app.register_blueprint(openapi.bp)
    app.register_blueprint(openai.bp)
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


def close_app(app: Flask) -> None:
    """Stop the models, then seal and close the audit log."""
    serving.get_pool(app).close()
    trail.get_store(app).close()
