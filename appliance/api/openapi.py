"""/openapi.json: every route the server answers, generated from the pydantic models
that validate the requests (and hand-written JSON Schemas where no model validates:
/v2's Open Inference Protocol, the admin answers); who may call each route comes from
the route table (auth/policy.py). The /api page reads the same document."""

from __future__ import annotations

import json
from typing import Any

from flask import Blueprint, Response
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from appliance import __version__
from appliance.api import admin, openapi_paths, schemas
from appliance.api.openapi_paths import REF, ref
from appliance.api.trail import UNAUDITED
from appliance.audit.reader import EXPORT_FIELDS
from appliance.audit.records import KINDS
from appliance.auth.guard import CSRF_HEADER, SESSION_COOKIE
from appliance.auth.policy import PUBLIC, ROUTE_ROLES, SIGNED_IN
from appliance.engines.onnx import NUMPY_BY_DATATYPE
from appliance.web import LOGIN_CSRF_COOKIE

bp = Blueprint("openapi", __name__)

METHODS = ("get", "post", "put", "patch", "delete")

STR: dict[str, Any] = {"type": "string"}
INT: dict[str, Any] = {"type": "integer"}
NUM: dict[str, Any] = {"type": "number"}
BOOL: dict[str, Any] = {"type": "boolean"}


def _maybe(kind: str) -> dict[str, Any]:
    return {"type": [kind, "null"]}


def _about(text: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {**schema, "description": text}


def _list(items: dict[str, Any]) -> dict[str, Any]:
    return {"type": "array", "items": items}


def _obj(*optional: str, **props: dict[str, Any]) -> dict[str, Any]:
    """An object whose properties are all required but those named ``optional``."""
    return {
        "type": "object",
        "properties": props,
        "required": [name for name in props if name not in optional],
    }


def _oip_schemas() -> dict[str, dict[str, Any]]:
    datatype = {"type": "string", "enum": list(NUMPY_BY_DATATYPE)}
    shape = _about("-1: any size", _list(INT))
    element = {"anyOf": [NUM, STR, BOOL, ref("OipTensorData")]}
    binary_size = _about(
        "The tensor's bytes are in the binary part of the body, this many of them.",
        {"type": "integer", "minimum": 0},
    )
    return {
        "OipError": _obj(error=STR),
        "OipServerMetadata": _obj(name=STR, version=STR, extensions=_list(STR)),
        "OipLive": _obj(live=BOOL),
        "OipReady": _obj(ready=BOOL),
        "OipTensorMetadata": _obj(name=STR, datatype=datatype, shape=shape),
        "OipModelMetadata": _obj(
            name=STR,
            versions=_list(STR),
            platform=STR,
            inputs=_list(ref("OipTensorMetadata")),
            outputs=_list(ref("OipTensorMetadata")),
        ),
        "OipModelReady": _obj(
            "reason",
            name=STR,
            ready=BOOL,
            state={"type": "string", "enum": ["unloaded", "loading", "ready", "unloading"]},
            kind=STR,
            memory_bytes=INT,
            reason=_about("Why the model is refused.", STR),
        ),
        "OipTensorData": _about(
            "The elements in row-major order, flat or nested; BYTES as strings, BOOL as "
            "true/false, the others as numbers.",
            _list(element),
        ),
        "OipInferInput": _obj(
            "parameters",
            "data",
            name=STR,
            shape=_list({"type": "integer", "minimum": 0}),
            datatype=datatype,
            parameters=_obj("binary_data_size", binary_data_size=binary_size),
            data=ref("OipTensorData"),
        ),
        "OipRequestedOutput": _obj(
            "parameters",
            name=STR,
            parameters=_obj("binary_data", binary_data=_about("This output in binary.", BOOL)),
        ),
        "OipInferRequest": _obj(
            "id",
            "parameters",
            "outputs",
            id=_about("Echoed in the answer.", STR),
            parameters=_obj(
                "binary_data_output",
                binary_data_output=_about("Every output in binary (default false).", BOOL),
            ),
            inputs={"type": "array", "items": ref("OipInferInput"), "minItems": 1},
            outputs=_about("Default: every output.", _list(ref("OipRequestedOutput"))),
        ),
        "OipInferOutput": _obj(
            "data",
            "parameters",
            name=STR,
            datatype=datatype,
            shape=_list(INT),
            data=ref("OipTensorData"),
            parameters=_obj("binary_data_size", binary_data_size=binary_size),
        ),
        "OipInferResponse": _obj(
            "id",
            model_name=STR,
            model_version=STR,
            id=STR,
            outputs=_list(ref("OipInferOutput")),
        ),
    }


def _answer_schemas() -> dict[str, dict[str, Any]]:
    """The answers no pydantic model makes, as the routes write them."""
    role = {"type": "string", "enum": ["admin", "clinician", "line", "auditor"]}
    when = _maybe("string")
    model_state = _about(
        "A model's name, kind, format, state, pinned, installed, memory_bytes, keep_alive, "
        "in_use, loads, unloads (and reason, load_seconds; when loaded, its queue).",
        {"type": "object", "properties": {"name": STR, "state": STR, "memory_bytes": INT}},
    )
    passage = _obj(
        "text",
        rank=INT,
        passage_id=INT,
        collection=STR,
        document=STR,
        document_sha256=STR,
        version=INT,
        source_path=STR,
        heading=STR,
        start=INT,
        end=INT,
        score=NUM,
        similarity=NUM,
        text_rank=_maybe("integer"),
        vector_rank=_maybe("integer"),
        text=STR,
        relevant=BOOL,
    )
    ints = {"seq", "status", "latency_us", "prompt_tokens", "completion_tokens"}
    record = {
        name: (
            {"type": "object"}
            if name == "content"
            else _maybe("integer" if name in ints else "string")
        )
        for name in EXPORT_FIELDS
    }
    record["kind"] = {"type": "string", "enum": list(KINDS)}
    return {
        "Alive": _obj(status={"const": "alive"}),
        "Readiness": _obj(
            ready=BOOL,
            reasons=_list(STR),
            models=_list(model_state),
            memory=_obj(capacity_bytes=INT, used_bytes=INT),
            audit=_obj(writable=BOOL, error=when, checkpoint_copy_error=when),
            drain=ref("DrainState"),
        ),
        "DrainState": _obj(
            draining=BOOL,
            reason=_about("Why: stopping (SIGTERM) or what the admin said.", when),
            since=_about("When the drain began (Unix time).", _maybe("number")),
        ),
        "DrainChange": _obj(
            draining=BOOL,
            reason=when,
            since=_maybe("number"),
            changed=_about("False when the box already was in the state asked for.", BOOL),
        ),
        "Loading": _obj(ready={"const": False}, loading={"const": True}, reasons=_list(STR)),
        "Liveness": _obj(
            live=BOOL,
            problem=_about(
                "What keeps the watchdog from pinging (a wedged model, a "
                "stopped audit writer), or null.",
                when,
            ),
        ),
        "Collection": _obj(
            id=STR, object={"const": "collection"}, documents=INT, min_similarity=_maybe("number")
        ),
        "CollectionList": _obj(object={"const": "list"}, data=_list(ref("Collection"))),
        "Passage": passage,
        "RetrieveResult": _obj(
            object={"const": "list"},
            collections=_list(STR),
            min_similarity=_maybe("number"),
            data=_list(ref("Passage")),
        ),
        "TokenizeResult": _obj(
            model=STR,
            tokens=_about(
                "Ids; with with_pieces, {id, piece} each.",
                _list({"anyOf": [INT, _obj(id=INT, piece=STR)]}),
            ),
            count=INT,
        ),
        "DetokenizeResult": _obj(model=STR, content=STR),
        "Token": _obj(id=STR, name=STR, role=role, created=STR, expires=when, revoked=when),
        "TokenList": _obj(data=_list(ref("Token"))),
        "NewTokenCreated": _obj(
            id=STR,
            name=STR,
            role=role,
            created=STR,
            expires=when,
            token=_about("apl_<id>_<secret>: shown this once.", STR),
        ),
        "TokenRevoked": _obj(id=STR, name=STR, revoked={"const": True}),
        "User": _obj(
            name=STR,
            role=role,
            created=STR,
            disabled=BOOL,
            failures=_about("Failed sign-ins, over the client addresses.", INT),
            locked_until=when,
        ),
        "UserList": _obj(data=_list(ref("User"))),
        "UserAdded": _obj(name=STR, role=role),
        "UserDisabled": _obj(name=STR, disabled={"const": True}),
        "PasswordReset": _obj(name=STR, password_reset={"const": True}),
        "VerifyReport": _obj(
            ok=BOOL,
            records=INT,
            first_seq=_maybe("integer"),
            head_seq=INT,
            head_hash=STR,
            checkpoints=INT,
            external_checkpoints=INT,
            incomplete=_about("Requests with no outcome (cut off).", _list(STR)),
            purged=_maybe("object"),
            witnessed=_about(
                "With a witness key: the witness, the cosignatures checked, the largest "
                "cosigned size and when; else null.",
                _maybe("object"),
            ),
            problem={
                "anyOf": [_obj(seq=_maybe("integer"), kind=STR, detail=STR), {"type": "null"}]
            },
            notes=_list(STR),
        ),
        "AuditRecord": {"type": "object", "properties": record, "required": list(record)},
        "LoginForm": _obj(username=STR, password=STR, csrf_token=STR),
        "LogoutForm": _obj("csrf_token", csrf_token=STR),
    }


def _components() -> dict[str, Any]:
    models: list[type[BaseModel]] = [
        schemas.ChatCompletionRequest,
        schemas.CompletionRequest,
        schemas.ChatCompletion,
        schemas.ChatCompletionChunk,
        schemas.Completion,
        schemas.EmbeddingRequest,
        schemas.EmbeddingList,
        schemas.ModelCard,
        schemas.ModelList,
        schemas.RetrieveRequest,
        schemas.TokenizeRequest,
        schemas.DetokenizeRequest,
        schemas.ErrorResponse,
        admin.NewToken,
        admin.NewUser,
        admin.NewPassword,
        admin.DrainRequest,
    ]
    requests = {schemas.ChatCompletionRequest, schemas.CompletionRequest}
    requests |= {m for m in models if m.__name__.startswith("New")}
    modes = [
        (m, "validation" if m in requests or m.__name__.endswith("Request") else "serialization")
        for m in models
    ]
    _, defs = models_json_schema(modes, ref_template=REF)  # type: ignore[arg-type]
    generated: dict[str, Any] = defs["$defs"]
    written = _oip_schemas() | _answer_schemas()
    assert not set(generated) & set(written), set(generated) & set(written)
    header = {"schema": {"type": "integer"}}
    return {
        "schemas": generated | written,
        "headers": {
            "HeaderLength": {**header, "description": "The JSON header's length in bytes."},
            "RetryAfter": {**header, "description": "Seconds to wait before trying again."},
            "WWWAuthenticate": {"schema": STR, "description": 'Bearer realm="appliance"'},
        },
        "securitySchemes": {
            "bearer": {
                "type": "http",
                "scheme": "bearer",
                "bearerFormat": "apl_<id>_<secret>",
                "description": "An API token, from `appliance token create` or POST "
                "/admin/tokens: 'Authorization: Bearer apl_...'.",
            },
            "session": {
                "type": "apiKey",
                "in": "cookie",
                "name": SESSION_COOKIE,
                "description": "A web session, from POST /login. A write (not GET) with it "
                f"also needs the page's CSRF token in {CSRF_HEADER} or the form's csrf_token.",
            },
        },
    }


def _merge(responses: dict[str, Any], code: int, response: dict[str, Any]) -> None:
    """Add a response, or its reason (and media types) to the one the route gives."""
    have = responses.get(str(code))
    if have is None:
        responses[str(code)] = response
        return
    have["description"] += "; or " + response["description"]
    for media, value in response.get("content", {}).items():
        have.setdefault("content", {}).setdefault(media, value)
    for name, value in response.get("headers", {}).items():
        have.setdefault("headers", {}).setdefault(name, value)


def _secure(path: str, method: str, operation: dict[str, Any]) -> None:
    """Who may call the operation (ROUTE_ROLES), and what the gate, the body limit and
    the audit log answer before or instead of the route: in the route's error shape."""
    endpoint = operation["x-endpoint"]
    roles = ROUTE_ROLES[endpoint]
    web = endpoint.startswith("web.")
    shape = "OipError" if path.startswith("/v2") else "ErrorResponse"

    def error(text: str, *headers: str) -> dict[str, Any]:
        out = openapi_paths.answer(shape, text)
        if headers:
            out["headers"] = {
                h: {"$ref": f"#/components/headers/{h.replace('-', '')}"} for h in headers
            }
        return out

    responses = operation["responses"]
    if roles is PUBLIC:
        operation["security"] = []
        sentence = "Public: no authentication needed."
    else:
        allowed = sorted(roles)
        operation["security"] = [{"bearer": []}, {"session": []}]
        operation["x-roles"] = allowed
        sentence = f"Roles: {', '.join(allowed)} (a bearer token or a signed-in session)."
        if web:  # a browser is sent to sign in; a page it may not open says so
            _merge(responses, 303, openapi_paths.redirect("/login", "not signed in"))
        else:
            _merge(responses, 401, error("no valid token or session", "WWW-Authenticate"))
        if roles != SIGNED_IN:  # some role is refused: a page says so to a browser
            refused = "the caller's role may not use this route"
            page = web and method == "get"
            _merge(responses, 403, openapi_paths.page(refused) if page else error(refused))
        if method != "get":
            _merge(responses, 403, error(f"with the session cookie: no or a wrong {CSRF_HEADER}"))
        _merge(
            responses,
            429,
            error("over the rate limit, or too many requests in flight", "Retry-After"),
        )
    _merge(responses, 403, error("the client address is not in allowed_clients"))
    if "requestBody" in operation:
        _merge(responses, 413, error("the body is over max_body_bytes"))
    if path not in UNAUDITED:
        _merge(responses, 503, error("the audit log cannot be written"))
    operation["responses"] = dict(sorted(responses.items()))
    description = operation.get("description", "")
    operation["description"] = f"{description} {sentence}".strip()


def build_document() -> dict[str, Any]:
    paths: dict[str, Any] = {
        **openapi_paths.v1_paths(),
        **openapi_paths.token_paths(),
        **openapi_paths.v2_paths(),
        **openapi_paths.admin_paths(),
        **openapi_paths.audit_paths(),
        **openapi_paths.health_paths(),
        **openapi_paths.web_paths(SESSION_COOKIE, LOGIN_CSRF_COOKIE),
    }
    for path, item in paths.items():
        for method, operation in item.items():
            _secure(path, method, operation)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Inference appliance",
            "version": __version__,
            "description": "Every route the appliance answers. Every answer carries "
            "X-Request-Id; every request but the probes and /metrics leaves an audit "
            "record before its answer does (503 if it cannot).",
        },
        "tags": [{"name": name, "description": text} for name, text in openapi_paths.TAGS.items()],
        "paths": paths,
        "components": _components(),
    }


@bp.get("/openapi.json")
def openapi_json() -> Response:
    return Response(json.dumps(build_document()), mimetype="application/json")


# -- the /api page's reading of the document ------------------------------------------

LIMITS = (
    ("default", "default"),
    ("minimum", "≥"),
    ("exclusiveMinimum", ">"),
    ("maximum", "≤"),
    ("exclusiveMaximum", "<"),
    ("minLength", "length ≥"),
    ("maxLength", "length ≤"),
    ("minItems", "items ≥"),
    ("maxItems", "items ≤"),
    ("pattern", "matches"),
)
Part = tuple[str, str | None]  # text, and the schema it names (a link on the page)


def type_parts(node: dict[str, Any]) -> list[Part]:
    """A schema's type, to read: 'string or null', 'array of ChatMessage'."""
    if "$ref" in node:
        name = node["$ref"].rsplit("/", 1)[-1]
        return [(name, name)]
    for key in ("anyOf", "oneOf"):
        if key in node:
            parts: list[Part] = []
            for i, option in enumerate(node[key]):
                parts += ([(" or ", None)] if i else []) + type_parts(option)
            return parts
    if "const" in node:
        return [(json.dumps(node["const"]), None)]
    if "enum" in node:
        return [("one of " + ", ".join(json.dumps(v) for v in node["enum"]), None)]
    kind = node.get("type")
    if isinstance(kind, list):
        return [(" or ".join(kind), None)]
    if kind == "array":
        items = node.get("items")
        return [("array of ", None), *type_parts(items)] if items else [("array", None)]
    if kind == "object" and isinstance(node.get("additionalProperties"), dict):
        return [("object of ", None), *type_parts(node["additionalProperties"])]
    if kind == "string" and "format" in node:
        return [(f"string ({node['format']})", None)]
    return [(str(kind or "any"), None)]


def _limits(node: dict[str, Any]) -> str:
    found = []
    for branch in [node, *node.get("anyOf", [])]:
        for key, words in LIMITS:
            if key in branch and not (key == "default" and branch["default"] is None):
                found.append(f"{words} {json.dumps(branch[key])}")
    return "; ".join(found)


def fields(
    schema: dict[str, Any], components: dict[str, Any], prefix: str = ""
) -> list[dict[str, Any]]:
    """An object schema's properties (through a $ref): name, type, required, description;
    an object written in place (not a named schema) has its own listed after it."""
    while "$ref" in schema:
        schema = components[schema["$ref"].rsplit("/", 1)[-1]]
    required = set(schema.get("required", []))
    rows = []
    for name, prop in schema.get("properties", {}).items():
        rows.append(
            {
                "name": prefix + name,
                "type": type_parts(prop),
                "required": name in required,
                "description": prop.get("description", ""),
                "limits": _limits(prop),
            }
        )
        if "properties" in prop:
            rows += fields(prop, components, f"{prefix}{name}.")
    return rows


def _operation(
    path: str, method: str, operation: dict[str, Any], components: dict[str, Any]
) -> dict[str, Any]:
    bodies = []
    body = operation.get("requestBody")
    for media, content in (body or {}).get("content", {}).items():
        schema = content.get("schema", {})
        bodies.append(
            {
                "media": media,
                "type": type_parts(schema),
                "fields": fields(schema, components),
            }
        )
    return {
        "id": operation["operationId"].replace(".", "-"),
        "method": method.upper(),
        "path": path,
        "summary": operation.get("summary", ""),
        "description": operation.get("description", ""),
        "roles": ", ".join(operation.get("x-roles", [])) or "public",
        "params": [
            {
                "name": p["name"],
                "in": p["in"],
                "required": p.get("required", False),
                "description": p.get("description", ""),
            }
            for p in operation.get("parameters", [])
        ],
        "body_required": bool(body and body.get("required")),
        "bodies": bodies,
        "responses": [
            {
                "code": code,
                "description": response.get("description", ""),
                "content": [
                    {"media": media, "type": type_parts(c.get("schema", {}))}
                    for media, c in response.get("content", {}).items()
                ],
            }
            for code, response in sorted(operation["responses"].items())
        ],
    }


def reference(document: dict[str, Any]) -> dict[str, Any]:
    """What the /api page shows: one section per tag, each operation in it, then every
    schema the operations name."""
    components = document["components"]["schemas"]
    sections = [
        {
            "name": tag["name"],
            "id": "tag-" + "".join(c if c.isalnum() else "-" for c in tag["name"].lower()),
            "description": tag.get("description", ""),
            "operations": [],
        }
        for tag in document["tags"]
    ]
    by_tag = {s["name"]: s for s in sections}
    for path, item in document["paths"].items():
        for method, operation in item.items():
            if method in METHODS:
                section = by_tag[operation["tags"][0]]
                section["operations"].append(_operation(path, method, operation, components))
    models = [
        {
            "name": name,
            "description": schema.get("description", ""),
            "type": type_parts({k: v for k, v in schema.items() if k != "properties"}),
            "fields": fields(schema, components),
        }
        for name, schema in sorted(components.items())
    ]
    return {"info": document["info"], "sections": sections, "schemas": models}
