"""/healthz (the process answers) and /readyz (every known model verified and loaded)."""

from __future__ import annotations

import json

from flask import Blueprint, Response, current_app

from appliance.serving import get_pool

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz() -> Response:
    return Response('{"status":"alive"}', mimetype="application/json")


@bp.get("/readyz")
def readyz() -> Response:
    pool = get_pool(current_app)
    reasons = list(pool.problems) + list(pool.refused.values())
    if not pool.served and not reasons:
        reasons.append("no model is configured")
    body = {"ready": pool.ready, "reasons": reasons, "models": pool.state()}
    return Response(
        json.dumps(body), status=200 if pool.ready else 503, mimetype="application/json"
    )
