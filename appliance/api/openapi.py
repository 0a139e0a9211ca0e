"""/openapi.json, generated from the pydantic models that validate the requests."""

from __future__ import annotations

import json
from typing import Any

from flask import Blueprint, Response
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from appliance import __version__
from appliance.api import schemas

bp = Blueprint("openapi", __name__)

_REF = "#/components/schemas/{model}"


def _body(model: type[BaseModel]) -> dict[str, Any]:
    return {
        "content": {"application/json": {"schema": {"$ref": _REF.format(model=model.__name__)}}}
    }


def _errors(*codes: int) -> dict[str, Any]:
    return {str(c): {"description": "error", **_body(schemas.ErrorResponse)} for c in codes}


def _stream_or(model: type[BaseModel], chunk: type[BaseModel]) -> dict[str, Any]:
    return {
        "description": f"{model.__name__}, or with stream=true server-sent events of "
        f"{chunk.__name__} ending with 'data: [DONE]'",
        "content": {
            "application/json": {"schema": {"$ref": _REF.format(model=model.__name__)}},
            "text/event-stream": {"schema": {"$ref": _REF.format(model=chunk.__name__)}},
        },
    }


def build_document() -> dict[str, Any]:
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
    ]
    modes = [
        (m, "validation" if m.__name__.endswith("Request") else "serialization") for m in models
    ]
    _, defs = models_json_schema(modes, ref_template=_REF)  # type: ignore[arg-type]
    infer_errors = _errors(400, 404, 413, 503)
    return {
        "openapi": "3.1.0",
        "info": {"title": "Inference appliance", "version": __version__},
        "paths": {
            "/v1/chat/completions": {
                "post": {
                    "summary": "Chat completion (OpenAI)",
                    "description": "model: a chat model, a specialist, a served name (its "
                    "champion answers) or a route. A route answers with the specialist whose "
                    "domain the question is in, the generalist when none is or the "
                    "specialist is not confident, or the site's referral message when "
                    "neither is; the answer carries appliance_route and the header "
                    "X-Appliance-Route. A routed stream sends keep-alive comments while the "
                    "route decides, then the chosen answer; its last chunk carries "
                    "appliance_route. An uncalibrated route is 503 route_uncalibrated.",
                    "requestBody": {"required": True, **_body(schemas.ChatCompletionRequest)},
                    "responses": {
                        "200": _stream_or(schemas.ChatCompletion, schemas.ChatCompletionChunk),
                        **infer_errors,
                    },
                }
            },
            "/v1/completions": {
                "post": {
                    "summary": "Text completion (OpenAI)",
                    "requestBody": {"required": True, **_body(schemas.CompletionRequest)},
                    "responses": {
                        "200": _stream_or(schemas.Completion, schemas.Completion),
                        **infer_errors,
                    },
                }
            },
            "/v1/embeddings": {
                "post": {
                    "summary": "Embeddings (OpenAI): unit-length vectors of texts or token ids",
                    "description": "On an embedding model (kind embedding); another kind is "
                    "400 wrong_model_kind. A model not loaded loads first (or 503 with "
                    "Retry-After when memory cannot be made).",
                    "requestBody": {"required": True, **_body(schemas.EmbeddingRequest)},
                    "responses": {
                        "200": {"description": "vectors", **_body(schemas.EmbeddingList)},
                        **infer_errors,
                    },
                }
            },
            "/v1/models": {
                "get": {
                    "summary": "The chat and embedding models, with their manifests, state "
                    "(unloaded, loading, ready, unloading) and memory; and the routes "
                    "(kind route)",
                    "responses": {"200": {"description": "list", **_body(schemas.ModelList)}},
                }
            },
            "/v1/models/{model}": {
                "get": {
                    "summary": "One model",
                    "parameters": [
                        {
                            "name": "model",
                            "in": "path",
                            "required": True,
                            "schema": {"type": "string"},
                        }
                    ],
                    "responses": {
                        "200": {
                            "description": "a model, or a route",
                            "content": {
                                "application/json": {
                                    "schema": {
                                        "oneOf": [
                                            {"$ref": _REF.format(model="ModelCard")},
                                            {"$ref": _REF.format(model="RouteCard")},
                                        ]
                                    }
                                }
                            },
                        },
                        **_errors(403, 404, 503),
                    },
                }
            },
            "/v1/retrieve": {
                "post": {
                    "summary": "Extension: the passages a grounded answer would be given",
                    "description": "Ranked by reciprocal rank fusion of BM25 (SQLite FTS5) "
                    "and embedding similarity, only from collections the caller's role may "
                    "read (default: all of them); each with its document, version, span, "
                    "scores and whether it is relevant (its similarity at or above the "
                    "collection's threshold). Audited: the passages returned are recorded.",
                    "requestBody": {"required": True, **_body(schemas.RetrieveRequest)},
                    "responses": {
                        "200": {"description": "ranked passages"},
                        **_errors(400, 403, 503),
                    },
                }
            },
            "/v1/collections": {
                "get": {
                    "summary": "Extension: the document collections the caller may read",
                    "responses": {"200": {"description": "list"}},
                }
            },
            "/tokenize": {
                "post": {
                    "summary": "Token ids of text, or of a chat as the model's template makes it",
                    "description": "As llama-server's: count a prompt before sending it. With "
                    "messages, the count equals the answer's usage.prompt_tokens.",
                    "requestBody": {"required": True, **_body(schemas.TokenizeRequest)},
                    "responses": {"200": {"description": "tokens"}, **_errors(400, 404, 503)},
                }
            },
            "/detokenize": {
                "post": {
                    "summary": "The text of token ids",
                    "requestBody": {"required": True, **_body(schemas.DetokenizeRequest)},
                    "responses": {"200": {"description": "content"}, **_errors(400, 404, 503)},
                }
            },
            "/healthz": {
                "get": {"summary": "Liveness", "responses": {"200": {"description": "alive"}}}
            },
            "/readyz": {
                "get": {
                    "summary": "Readiness: every pinned model loaded, the audit log "
                    "writable; every model's state and memory",
                    "responses": {
                        "200": {"description": "ready"},
                        "503": {"description": "not ready, with reasons"},
                    },
                }
            },
        },
        "components": {"schemas": defs["$defs"]},
    }


@bp.get("/openapi.json")
def openapi_json() -> Response:
    return Response(json.dumps(build_document()), mimetype="application/json")
