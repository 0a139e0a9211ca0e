"""create_app(settings): the one place where the appliance is wired together."""

from __future__ import annotations

from flask import Flask

from appliance import reqlog, serving
from appliance.api import errors, health, openai, openapi
from appliance.config import Settings


def create_app(settings: Settings) -> Flask:
    app = Flask("appliance")
    app.config["APPLIANCE_SETTINGS"] = settings
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.json.sort_keys = False  # type: ignore[attr-defined]
    reqlog.init_app(app)
    errors.register(app)
    serving.init_app(app, settings)
    app.register_blueprint(health.bp)
    app.register_blueprint(openapi.bp)
    app.register_blueprint(openai.bp)
    return app
