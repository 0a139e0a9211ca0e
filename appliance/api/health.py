"""/healthz (the process answers) and /readyz (every pinned model loaded, the audit log
writable and its checkpoints copied out; with every model's state and memory)."""

from __future__ import annotations

import json

from flask import Blueprint, Flask, Response, current_app

from appliance.api.trail import get_store
from appliance.serving import get_pool

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz() -> Response:
    return Response('{"status":"alive"}', mimetype="application/json")


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
    ready = pool.ready and store.healthy and store.checkpoint_error is None
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
    }
    return Response(json.dumps(body), status=200 if ready else 503, mimetype="application/json")
