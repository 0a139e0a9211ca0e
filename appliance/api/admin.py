"""/admin: tokens and users, for the admin role (what the CLI does, over HTTP), and
/audit: verification and export for the auditor role."""

from __future__ import annotations

import json
from collections.abc import Iterator

from flask import Blueprint, Response, current_app, request
from pydantic import Field

from appliance.api.errors import ApiError, parse_body, read_json_object
from appliance.api.health import get_drain
from appliance.api.schemas import _Strict
from appliance.api.trail import get_store
from appliance.audit import chain, crypto
from appliance.audit.reader import ReadError, parse_time, records
from appliance.audit.witness import cosigned_path
from appliance.auth.guard import get_gate
from appliance.auth.store import ROLES, AuthError
from appliance.config import Settings

bp = Blueprint("admin", __name__, url_prefix="/admin")
audit_bp = Blueprint("audit_api", __name__, url_prefix="/audit")


class NewToken(_Strict):
    name: str = Field(min_length=1, max_length=128)
    role: str = Field(pattern="^(" + "|".join(ROLES) + ")$")
    expires: str | None = Field(default=None, description="e.g. 90d, 12h, 30m")


class NewUser(_Strict):
    name: str = Field(min_length=1, max_length=64)
    role: str = Field(pattern="^(" + "|".join(ROLES) + ")$")
    password: str = Field(min_length=1, max_length=1024)


class NewPassword(_Strict):
    password: str = Field(min_length=1, max_length=1024)


class DrainRequest(_Strict):
    draining: bool = Field(description="true: take no new work (/readyz 404); false: take work")
    reason: str = Field(default="asked by an admin", min_length=1, max_length=200)


def _json(data: object, status: int = 200) -> Response:
    return Response(json.dumps(data), status=status, mimetype="application/json")


def _do(action: object, status: int = 200) -> Response:
    try:
        return _json(action() if callable(action) else action, status)
    except AuthError as exc:
        missing = str(exc).startswith("no ")
        raise ApiError(404 if missing else 400, str(exc)) from None


@bp.get("/tokens")
def list_tokens() -> Response:
    return _json({"data": get_gate(current_app).store.list_tokens()})


@bp.post("/tokens")
def create_token() -> Response:
    req = parse_body(NewToken, read_json_object())
    store = get_gate(current_app).store
    return _do(lambda: store.create_token(req.name, req.role, req.expires), 201)


@bp.delete("/tokens/<token_id>")
def revoke_token(token_id: str) -> Response:
    return _do(lambda: get_gate(current_app).store.revoke_token(token_id))


@bp.get("/users")
def list_users() -> Response:
    return _json({"data": get_gate(current_app).store.list_users()})


@bp.post("/users")
def add_user() -> Response:
    req = parse_body(NewUser, read_json_object())
    return _do(lambda: get_gate(current_app).store.add_user(req.name, req.role, req.password), 201)


@bp.post("/users/<name>/disable")
def disable_user(name: str) -> Response:
    return _do(lambda: get_gate(current_app).store.disable_user(name))


@bp.post("/users/<name>/password")
def reset_password(name: str) -> Response:
    req = parse_body(NewPassword, read_json_object())
    return _do(lambda: get_gate(current_app).store.reset_password(name, req.password))


@bp.post("/drain")
def drain() -> Response:
    """Drain this box (a balancer moves new work elsewhere; what runs finishes), or end
    a drain. The request and its answer are in the audit log like every admin call."""
    req = parse_body(DrainRequest, read_json_object())
    state = get_drain(current_app)
    changed = state.begin(req.reason) if req.draining else state.end()
    return _json({**state.state(), "changed": changed})


@audit_bp.get("/verify")
def verify() -> Response:
    settings: Settings = current_app.config["APPLIANCE_SETTINGS"]
    key = crypto.load_public_key(settings.trusted_public_key_path)
    report = chain.verify(
        settings.audit_db_path,
        key,
        settings.checkpoint_path,
        witness_key=settings.witness_key,  # cosignatures too, when a witness is set
        cosigned_file=cosigned_path(settings),
    )
    return _json(report.as_dict(), 200)


@audit_bp.get("/export")
def export() -> Response:
    args = request.args
    try:
        since = parse_time(args["since"]) if "since" in args else None
        until = parse_time(args["until"]) if "until" in args else None
    except ReadError as exc:
        raise ApiError(400, str(exc), param="since/until") from None
    rows = records(
        get_store(current_app),
        since=since,
        until=until,
        actor=args.get("actor"),
        model=args.get("model"),
    )

    def lines() -> Iterator[bytes]:
        for row in rows:
            yield json.dumps(row, ensure_ascii=False).encode() + b"\n"

    return Response(lines(), mimetype="application/x-ndjson")
