"""What each route takes and gives, for /openapi.json: one operation per route and
method, named by its Flask endpoint (``x-endpoint``). Who may call it (security,
x-roles) and the refusals the gate and the audit log add are filled in by
openapi.py from the route table, not here."""

from __future__ import annotations

from typing import Any

REF = "#/components/schemas/{model}"

V1 = "OpenAI (/v1)"
V2 = "Open Inference Protocol (/v2)"
ADMIN = "Admin (/admin)"
AUDIT = "Audit (/audit)"
TOKENS = "Tokens (/tokenize, /detokenize)"
HEALTH = "Health, metrics and this reference"
WEB = "Web pages"
TAGS = {
    V1: "Language models and embeddings in the OpenAI API's shapes (the openai SDK works "
    'unchanged). Errors: {"error": {message, type, param, code}}.',
    V2: "Tensor models in the Open Inference Protocol v2 (KServe, Triton REST) with Triton's "
    'binary tensor extension (tritonclient works unchanged). Errors: {"error": "..."}.',
    ADMIN: "API tokens and web users: what `appliance token` and `appliance user` do, over HTTP.",
    AUDIT: "The audit log: its verification, and its records.",
    TOKENS: "Count a prompt's tokens before sending it, as llama-server does.",
    HEALTH: "Probes for systemd and load balancers, Prometheus metrics, this document.",
    WEB: "The browser's side: sign-in, the clinicians' page, IT's status page, this "
    "reference. HTML; a browser that is not signed in is sent to /login.",
}


def ref(name: str) -> dict[str, str]:
    return {"$ref": REF.format(model=name)}


def json_body(name: str) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": ref(name)}}}


def answer(name: str, description: str) -> dict[str, Any]:
    return {"description": description, **json_body(name)}


def page(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"text/html": {"schema": {"type": "string"}}}}


def errors(shape: str, codes: dict[int, str]) -> dict[str, Any]:
    """Error responses in one of the two shapes (ErrorResponse, or OipError on /v2)."""
    return {str(code): answer(shape, text) for code, text in codes.items()}


def oai_errors(codes: dict[int, str]) -> dict[str, Any]:
    return errors("ErrorResponse", codes)


def path_param(name: str, description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "description": description,
        "schema": {"type": "string"},
    }


def op(
    endpoint: str,
    tag: str,
    summary: str,
    responses: dict[str, Any],
    *,
    description: str = "",
    body: dict[str, Any] | None = None,
    params: list[dict[str, Any]] | None = None,
    operation_id: str | None = None,
) -> dict[str, Any]:
    """One operation; operationId is the endpoint, or a variant of it where one endpoint
    answers two paths (/v2's with and without a version)."""
    out: dict[str, Any] = {
        "operationId": operation_id or endpoint,
        "x-endpoint": endpoint,
        "tags": [tag],
        "summary": summary,
    }
    if description:
        out["description"] = description
    if params:
        out["parameters"] = params
    if body is not None:
        out["requestBody"] = {"required": True, **body}
    out["responses"] = responses
    return out


def _stream_or(model: str, chunk: str) -> dict[str, Any]:
    return {
        "description": f"{model}, or with stream=true server-sent events of {chunk} ending "
        "with 'data: [DONE]'",
        "content": {
            "application/json": {"schema": ref(model)},
            "text/event-stream": {"schema": ref(chunk)},
        },
    }


INFER_ERRORS = {
    400: "invalid request: the message names the parameter and the value; a model of "
    "another kind is wrong_model_kind; prompt and max_tokens over the context window is "
    "context_length_exceeded",
    404: "unknown model",
    503: "the model is refused, cannot be loaded now (insufficient_memory), or its queue "
    "is full; with Retry-After",
}
# A plain (non-streamed) text answer whose client hangs up: its model stops. A client
# that closed never reads this; the audit record, the log line and /metrics say it.
TEXT_ERRORS = INFER_ERRORS | {
    499: "client_disconnected: the client closed its connection (or its sending side) "
    "before its (not streamed) answer was whole; the model stopped (a route runs no "
    "further model). The status of its audit record, log line and metrics; a client "
    "that only shut down its sending side reads it",
}
MODEL_PARAM = path_param("name", "A model's name, a served name or a route.")


def v1_paths() -> dict[str, Any]:
    return {
        "/v1/chat/completions": {
            "post": op(
                "openai.chat_completions",
                V1,
                "Chat completion (OpenAI)",
                {"200": _stream_or("ChatCompletion", "ChatCompletionChunk")}
                | oai_errors(TEXT_ERRORS),
                description="model: a chat model, a specialist, a served name (its champion "
                "answers) or a route. A route answers with the specialist whose domain the "
                "question is in, the generalist when none is or the specialist is not "
                "confident, or the site's referral message when neither is; the answer "
                "carries appliance_route and the header X-Appliance-Route. A routed stream "
                "sends keep-alive comments while the route decides, then the chosen answer; "
                "its last chunk carries appliance_route. An uncalibrated route is 503 "
                "route_uncalibrated. A route answers at the temperature its thresholds were "
                "calibrated at (temperature left out: that one); another is 400 "
                "temperature_not_calibrated.",
                body=json_body("ChatCompletionRequest"),
            )
        },
        "/v1/completions": {
            "post": op(
                "openai.completions",
                V1,
                "Text completion (OpenAI)",
                {"200": _stream_or("Completion", "Completion")} | oai_errors(TEXT_ERRORS),
                body=json_body("CompletionRequest"),
            )
        },
        "/v1/embeddings": {
            "post": op(
                "openai.embeddings",
                V1,
                "Embeddings (OpenAI): unit-length vectors of texts or token ids",
                {"200": answer("EmbeddingList", "vectors")} | oai_errors(INFER_ERRORS),
                description="On an embedding model (kind embedding); another kind is 400 "
                "wrong_model_kind. A model not loaded loads first (or 503 with Retry-After "
                "when memory cannot be made).",
                body=json_body("EmbeddingRequest"),
            )
        },
        "/v1/models": {
            "get": op(
                "openai.list_models",
                V1,
                "The chat and embedding models, with their manifests, state (unloaded, "
                "loading, ready, unloading) and memory; and the routes (kind route)",
                {"200": answer("ModelList", "list")},
            )
        },
        "/v1/models/{name}": {
            "get": op(
                "openai.get_model",
                V1,
                "One model, or a route",
                {
                    "200": {
                        "description": "a model, or a route",
                        "content": {
                            "application/json": {
                                "schema": {"oneOf": [ref("ModelCard"), ref("RouteCard")]}
                            }
                        },
                    }
                }
                | oai_errors(
                    {
                        400: "a model of another kind (tensor: see /v2)",
                        403: "a specialist or route the caller's role may not use",
                        404: "unknown model",
                        503: "the model is refused: the reason",
                    }
                ),
                params=[MODEL_PARAM],
            )
        },
        "/v1/retrieve": {
            "post": op(
                "openai.retrieve",
                V1,
                "Extension: the passages a grounded answer would be given",
                {"200": answer("RetrieveResult", "ranked passages")}
                | oai_errors(
                    {
                        400: "invalid request, or an unknown collection",
                        403: "a collection the caller's role may not read",
                        503: "the embedding model cannot be loaded now",
                    }
                ),
                description="Ranked by reciprocal rank fusion of BM25 (SQLite FTS5) and "
                "embedding similarity, only from collections the caller's role may read "
                "(default: all of them); each with its document, version, span, scores and "
                "whether it is relevant (its similarity at or above the collection's "
                "threshold). Audited: the passages returned are recorded.",
                body=json_body("RetrieveRequest"),
            )
        },
        "/v1/collections": {
            "get": op(
                "openai.list_collections",
                V1,
                "Extension: the document collections the caller may read",
                {"200": answer("CollectionList", "list")},
            )
        },
    }


def token_paths() -> dict[str, Any]:
    model_errors = oai_errors(
        {400: "invalid request", 404: "unknown model", 503: "the model cannot be loaded now"}
    )
    return {
        "/tokenize": {
            "post": op(
                "tokens.tokenize",
                TOKENS,
                "Token ids of text, or of a chat as the model's template makes it",
                {"200": answer("TokenizeResult", "tokens")} | model_errors,
                description="As llama-server's: count a prompt before sending it. With "
                "messages, the count equals the answer's usage.prompt_tokens.",
                body=json_body("TokenizeRequest"),
            )
        },
        "/detokenize": {
            "post": op(
                "tokens.detokenize",
                TOKENS,
                "The text of token ids",
                {"200": answer("DetokenizeResult", "content")} | model_errors,
                body=json_body("DetokenizeRequest"),
            )
        },
    }


def health_paths() -> dict[str, Any]:
    return {
        "/healthz": {
            "get": op("health.healthz", HEALTH, "Liveness", {"200": answer("Alive", "alive")})
        },
        "/livez": {
            "get": op(
                "health.livez",
                HEALTH,
                "Liveness: the process answers and no model or audit writer is wedged (what "
                "systemd's watchdog checks); a probe that fails here should restart it",
                {
                    "200": answer("Liveness", "alive"),
                    "503": answer("Liveness", "wedged: the problem says what"),
                },
            )
        },
        "/readyz": {
            "get": op(
                "health.readyz",
                HEALTH,
                "Readiness: every pinned model loaded, the audit log writable, not "
                "draining; every model's state and memory",
                {
                    "200": answer("Readiness", "ready"),
                    "404": answer(
                        "Readiness",
                        "draining (SIGTERM or POST /admin/drain): send no new work "
                        "(HAProxy's http-check disable-on-404)",
                    ),
                    "503": {
                        "description": "not ready, with reasons; while the models load: Loading",
                        "content": {
                            "application/json": {
                                "schema": {"anyOf": [ref("Readiness"), ref("Loading")]}
                            }
                        },
                    },
                },
            )
        },
        "/metrics": {
            "get": op(
                "metrics.metrics",
                HEALTH,
                "Prometheus metrics: requests by route, model and status, latency, queues, "
                "memory, routed answers",
                {
                    "200": {
                        "description": "Prometheus text exposition format 0.0.4",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            )
        },
        "/openapi.json": {
            "get": op(
                "openapi.openapi_json",
                HEALTH,
                "This document (OpenAPI 3.1)",
                {
                    "200": {
                        "description": "the OpenAPI document",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    }
                },
            )
        },
    }


def admin_paths() -> dict[str, Any]:
    user = path_param("name", "The user's name.")
    return {
        "/admin/tokens": {
            "get": op(
                "admin.list_tokens",
                ADMIN,
                "The API tokens (never their secrets)",
                {"200": answer("TokenList", "tokens")},
            ),
            "post": op(
                "admin.create_token",
                ADMIN,
                "A new API token",
                {"201": answer("NewTokenCreated", "the token; its secret is shown only here")}
                | oai_errors({400: "invalid name, role or expiry"}),
                body=json_body("NewToken"),
            ),
        },
        "/admin/tokens/{token_id}": {
            "delete": op(
                "admin.revoke_token",
                ADMIN,
                "Revoke a token (at once: its next request is 401)",
                {"200": answer("TokenRevoked", "revoked")}
                | oai_errors({404: "no token with that id"}),
                params=[path_param("token_id", "The token's public id (apl_<id>_...).")],
            )
        },
        "/admin/users": {
            "get": op(
                "admin.list_users",
                ADMIN,
                "The web users, with their failed sign-ins and lockouts",
                {"200": answer("UserList", "users")},
            ),
            "post": op(
                "admin.add_user",
                ADMIN,
                "A new web user",
                {"201": answer("UserAdded", "added")}
                | oai_errors({400: "invalid name or role, a short password, or the user exists"}),
                body=json_body("NewUser"),
            ),
        },
        "/admin/users/{name}/disable": {
            "post": op(
                "admin.disable_user",
                ADMIN,
                "Disable a user and end their sessions",
                {"200": answer("UserDisabled", "disabled")} | oai_errors({404: "no such user"}),
                params=[user],
            )
        },
        "/admin/drain": {
            "post": op(
                "admin.drain",
                ADMIN,
                "Drain this box (/readyz 404: a balancer sends no new work; what runs "
                "finishes; each answer closes its connection), or end a drain",
                {"200": answer("DrainChange", "the drain state now")}
                | oai_errors({400: "draining missing or not a boolean"}),
                body=json_body("DrainRequest"),
            )
        },
        "/admin/users/{name}/password": {
            "post": op(
                "admin.reset_password",
                ADMIN,
                "Set a user's password, clear their lockouts and end their sessions",
                {"200": answer("PasswordReset", "reset")}
                | oai_errors({400: "a short password", 404: "no such user"}),
                body=json_body("NewPassword"),
                params=[user],
            )
        },
    }


def _query(name: str, description: str) -> dict[str, Any]:
    return {"name": name, "in": "query", "description": description, "schema": {"type": "string"}}


def audit_paths() -> dict[str, Any]:
    return {
        "/audit/verify": {
            "get": op(
                "audit_api.verify",
                AUDIT,
                "Verify the audit log: its hash chain, signed checkpoints and external copies",
                {"200": answer("VerifyReport", "the report (ok false names the first problem)")},
            )
        },
        "/audit/export": {
            "get": op(
                "audit_api.export",
                AUDIT,
                "The audit records, their content decrypted, as JSON lines",
                {
                    "200": {
                        "description": "one AuditRecord a line, in order",
                        "content": {"application/x-ndjson": {"schema": ref("AuditRecord")}},
                    }
                }
                | oai_errors({400: "since or until is not an ISO date or time"}),
                params=[
                    _query("since", "From this ISO date or time (UTC unless it says)."),
                    _query("until", "Before this ISO date or time."),
                    _query("actor", "Only this actor (a name or an id)."),
                    _query("model", "Only this model."),
                ],
            )
        },
    }


HEADER_LENGTH = "Inference-Header-Content-Length"  # as kserve.py names it
BINARY = {"schema": {"type": "string", "format": "binary"}}


def _oip_errors(codes: dict[int, str]) -> dict[str, Any]:
    return errors("OipError", codes)


def v2_paths() -> dict[str, Any]:
    """Each model route twice, as the protocol has it: with and without /versions/1."""
    out: dict[str, Any] = {
        "/v2": {
            "get": op(
                "kserve.server_metadata",
                V2,
                "Server metadata: name, version, extensions (binary_tensor_data)",
                {"200": answer("OipServerMetadata", "metadata")},
            )
        },
        "/v2/health/live": {
            "get": op("kserve.live", V2, "Server liveness", {"200": answer("OipLive", "live")})
        },
        "/v2/health/ready": {
            "get": op(
                "kserve.ready",
                V2,
                "Server readiness (as /readyz: pinned models loaded, the audit log writable)",
                {"200": answer("OipReady", "ready")} | _oip_errors({503: "not ready: the reasons"}),
            )
        },
    }
    name = path_param("name", "A tensor model's name.")
    version = path_param("version", "The model's version: only 1 is served.")
    not_found = "unknown model, or a version other than 1"
    for suffix, params, variant in (
        ("", [name], ""),
        ("/versions/{version}", [name, version], ".versioned"),
    ):
        base = "/v2/models/{name}" + suffix
        out[base] = {
            "get": op(
                "kserve.model_metadata",
                V2,
                "Model metadata: its inputs and outputs (name, datatype, shape; -1 any size)",
                {"200": answer("OipModelMetadata", "metadata")}
                | _oip_errors(
                    {
                        400: "a model of another kind (chat, embedding: see /v1)",
                        404: not_found,
                        503: "the model is refused or cannot be loaded now",
                    }
                ),
                description="Loads the model if it is not loaded.",
                params=params,
                operation_id="kserve.model_metadata" + variant,
            )
        }
        out[base + "/ready"] = {
            "get": op(
                "kserve.model_ready",
                V2,
                "Whether the model is loaded (without loading it), its state and memory",
                {"200": answer("OipModelReady", "state")} | _oip_errors({404: not_found}),
                params=params,
                operation_id="kserve.model_ready" + variant,
            )
        }
        out[base + "/infer"] = {
            "post": op(
                "kserve.infer",
                V2,
                "Inference on tensors",
                {
                    "200": {
                        "description": "the outputs; with binary outputs asked for, "
                        f"application/octet-stream: the JSON header ({HEADER_LENGTH} bytes), "
                        "then each binary output's bytes in order",
                        "headers": {HEADER_LENGTH: {"$ref": "#/components/headers/HeaderLength"}},
                        "content": {
                            "application/json": {"schema": ref("OipInferResponse")},
                            "application/octet-stream": BINARY,
                        },
                    }
                }
                | _oip_errors(
                    {
                        400: "the request is not JSON, or a tensor's name, shape, datatype, "
                        "data or binary size does not match the model's (the message names "
                        "the tensor, the expected and the received)",
                        404: not_found,
                        503: "the model is refused, cannot be loaded now or its queue is full; "
                        "with Retry-After",
                    }
                ),
                description="Each input's data as JSON (row-major, flat or nested), or with "
                f"the binary extension: the JSON header, its length in {HEADER_LENGTH}, then "
                "the bytes of each input that gives parameters.binary_data_size, in order "
                "(BYTES elements each prefixed by a little-endian uint32 length). The "
                "request and the outputs are audited.",
                body={
                    "content": {
                        "application/json": {"schema": ref("OipInferRequest")},
                        "application/octet-stream": BINARY,
                    }
                },
                params=[
                    *params,
                    {
                        "name": HEADER_LENGTH,
                        "in": "header",
                        "required": False,
                        "description": "With a binary body: the length of its JSON header.",
                        "schema": {"type": "integer", "minimum": 0},
                    },
                ],
                operation_id="kserve.infer" + variant,
            )
        }
    return out


def redirect(to: str, why: str) -> dict[str, Any]:
    return {
        "description": f"{why}: to {to}",
        "headers": {"Location": {"description": to, "schema": {"type": "string"}}},
    }


def web_paths(session_cookie: str, login_cookie: str) -> dict[str, Any]:
    form = "application/x-www-form-urlencoded"
    return {
        "/": {
            "get": op(
                "web.home",
                WEB,
                "The clinicians' page: questions to the models, answers with sources",
                {"200": page("the page")},
            )
        },
        "/login": {
            "get": op(
                "web.login_page",
                WEB,
                "The sign-in form",
                {"200": page("the form, with a CSRF token in a cookie and the form")},
                description="?expired=1 says the session ended after inactivity.",
                params=[
                    {
                        "name": "expired",
                        "in": "query",
                        "description": "1: say that the session timed out.",
                        "schema": {"type": "string"},
                    }
                ],
            ),
            "post": op(
                "web.login",
                WEB,
                "Sign in: a session cookie, then the clinicians' page",
                {
                    "303": redirect("/", f"signed in; Set-Cookie {session_cookie}"),
                    "401": page("the form again: wrong name or password, or a disabled account"),
                    "403": page("the form again: it expired (its CSRF token did not match)"),
                    "429": page("the form again: too many failed sign-ins; locked for now"),
                },
                description=f"The form's csrf_token must match the {login_cookie} cookie set "
                "with the form. Failed sign-ins lock the account for the client address.",
                body={"content": {form: {"schema": ref("LoginForm")}}},
                params=[
                    {
                        "name": login_cookie,
                        "in": "cookie",
                        "required": True,
                        "description": "Set by GET /login.",
                        "schema": {"type": "string"},
                    }
                ],
            ),
        },
        "/logout": {
            "post": op(
                "web.logout",
                WEB,
                "Sign out: the session ends",
                {"303": redirect("/login", "signed out")},
                description="With the session cookie, the form's csrf_token (or the "
                "X-CSRF-Token header) is required.",
                body={"required": False, "content": {form: {"schema": ref("LogoutForm")}}},
            )
        },
        "/status": {
            "get": op(
                "web.status",
                WEB,
                "IT's status page: models and their queues, routes, documents, the machine's "
                "checks, the audit log",
                {"200": page("the page")},
            )
        },
        "/api": {
            "get": op(
                "web.api_reference",
                WEB,
                "This API reference, as a page (from /openapi.json)",
                {"200": page("the page")},
            )
        },
        "/favicon.ico": {
            "get": op(
                "web.favicon",
                WEB,
                "The icon",
                {
                    "200": {
                        "description": "SVG",
                        "content": {"image/svg+xml": {"schema": {"type": "string"}}},
                    }
                },
            )
        },
        "/static/{filename}": {
            "get": op(
                "web.static",
                WEB,
                "The pages' own style sheets, scripts and images (no asset comes from elsewhere)",
                {
                    "200": {
                        "description": "the file (text/css, text/javascript, image/svg+xml)",
                        "content": {"*/*": BINARY},
                    }
                }
                | oai_errors({404: "no such file"}),
                params=[path_param("filename", "A file under web/static.")],
            )
        },
    }
