"""/healthz (the process answers) and /readyz (every known model verified and loaded)."""

from __future__ import annotations

import json

from flask import Blueprint, Response, current_app

from appliance.audit.trail import get_store
from appliance.serving import get_pool

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz() -> Response:
    return Response('{"status":"alive"}', mimetype="application/json")


@bp.get("/readyz")
def readyz() -> Response:
    pool = get_pool(current_app)
    store = get_store(current_app)
    reasons = list(pool.problems) + list(pool.refused.values())
    if not pool.served and not reasons:
        reasons.append("no model is configured")
    if not store.healthy:
        reasons.append(f"the audit log cannot be written: {store.last_error}")
    ready = pool.ready and store.healthy
    audit = {
        "writable": store.healthy,
        "error": store.last_error,
        "checkpoint_copy_error": store.checkpoint_error,
    }
    body = {"ready": ready, "reasons": reasons, "models": pool.state(), "audit": audit}
    return Response(json.dumps(body), status=200 if ready else 503, mimetype="application/json")
