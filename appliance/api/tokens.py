"""/tokenize and /detokenize, as llama-server has them: a line system or the page
counts a prompt's tokens before sending it. A chat request's ``messages`` count as the
model will read them (its chat template), so the count equals the answer's
``usage.prompt_tokens``."""

from __future__ import annotations

import json
from typing import Any

from flask import Blueprint, Response, current_app

from appliance import context
from appliance.api.errors import parse_body, read_json_object
from appliance.api.openai import plain_messages
from appliance.api.schemas import DetokenizeRequest, TokenizeRequest
from appliance.engines.base import PromptError
from appliance.inference import get_pipeline
from appliance.problems import Invalid
from appliance.serving.models import ChatModel

bp = Blueprint("tokens", __name__)


def _engine(name: str | None) -> tuple[str, Any]:
    """The chat model's engine (loaded if need be), for the caller."""
    pipeline = get_pipeline(current_app)
    ctx = context.current()
    lease = pipeline.resolve(ctx, name or default_model(), "chat")
    model = lease.model
    assert isinstance(model, ChatModel)
    return lease.manifest.name, model.engine


def default_model() -> str:
    pool = get_pipeline(current_app).pool
    for row in pool.state():
        if pool.manifest(row["name"]).default:
            return str(row["name"])
    raise Invalid("no default model: name one", param="model", code="missing_required_parameter")


def _json(data: dict[str, Any]) -> Response:
    return Response(json.dumps(data), mimetype="application/json")


@bp.post("/tokenize")
def tokenize() -> Response:
    req = parse_body(TokenizeRequest, read_json_object())
    name, engine = _engine(req.model)
    try:
        if req.messages is not None:
            tokens = engine.chat_prompt(plain_messages(req.messages))
        elif req.content is not None:
            tokens = engine.text_prompt(req.content)
        else:
            raise Invalid(
                "give content (text) or messages (a chat)",
                param="content",
                code="missing_required_parameter",
            )
    except PromptError as exc:
        raise Invalid(str(exc), param=exc.param or "messages", code="invalid_value") from None
    out: dict[str, Any] = {"model": name, "tokens": tokens, "count": len(tokens)}
    if req.with_pieces:
        _, pieces = engine.detokenize(tokens)
        out["tokens"] = [{"id": t, "piece": p} for t, p in zip(tokens, pieces, strict=True)]
    return _json(out)


@bp.post("/detokenize")
def detokenize() -> Response:
    req = parse_body(DetokenizeRequest, read_json_object())
    name, engine = _engine(req.model)
    try:
        text, _ = engine.detokenize(req.tokens)
    except PromptError as exc:
        raise Invalid(str(exc), param="tokens", code="invalid_value") from None
    return _json({"model": name, "content": text})
