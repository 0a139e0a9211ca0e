"""/v1: the OpenAI API (chat completions, completions, embeddings, models), so that the
`openai` SDK works unchanged. Each route translates the protocol into an ask for the
inference pipeline and its answer back; the pipeline does the rest."""

from __future__ import annotations

import base64
import functools
import json
import time
from typing import Any

import numpy as np
from flask import Blueprint, Response, current_app, request

from appliance import context
from appliance.api import conversation, departures, logprobs
from appliance.api.errors import ApiError, parse_body, read_json_object
from appliance.api.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionRequest,
    ChatMessage,
    Completion,
    CompletionChoice,
    CompletionRequest,
    Embedding,
    EmbeddingList,
    EmbeddingRequest,
    EmbeddingUsage,
    Grounded,
    Kernels,
    ModelCard,
    ModelList,
    Placement,
    RetrieveRequest,
    RouteCard,
    RouteDecision,
)
from appliance.api.streams import PutText, sse, start_stream, stream_after_load, usage
from appliance.api.trail import get_store
from appliance.context import RequestContext
from appliance.docs.grounding import get_library
from appliance.engines.base import TokenLogprob
from appliance.inference import audit_pair, get_pipeline
from appliance.inference.pipeline import ChatAsk, EmbedAsk, served_by
from appliance.problems import Forbidden
from appliance.routing import get_router
from appliance.serving import get_aliases, get_pool
from appliance.serving.loader import ServeSettings
from appliance.serving.pool import ModelUnavailable, WrongKind

bp = Blueprint("openai", __name__, url_prefix="/v1")
conversation.init_app(bp)  # X-Conversation-Id on every text answer
OPENAI_KINDS = ("chat", "specialist", "embedding")  # /v1's; tensor models are on /v2


def _refuse_unsupported(checks: dict[str, tuple[bool, str]]) -> None:
    for param, (present, why) in checks.items():
        if present:
            raise ApiError(
                400,
                f"{param} is not supported by this appliance: {why}",
                param=param,
                code="unsupported_parameter",
            )


def _common_unsupported(
    req: ChatCompletionRequest | CompletionRequest,
) -> dict[str, tuple[bool, str]]:
    return {
        "n": (
            req.n not in (None, 1),
            f"n is {req.n}; only n=1 is served, send one request per answer",
        ),
        "logit_bias": (bool(req.logit_bias), "token biases are not applied"),
    }


def _chat_messages(req: ChatCompletionRequest) -> list[dict[str, str]]:
    return plain_messages(req.messages)


def plain_messages(given: list[ChatMessage]) -> list[dict[str, str]]:
    """Messages as a chat template reads them: text content, developer as system."""
    messages = []
    for m in given:
        content = m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)
        messages.append({"role": "system" if m.role == "developer" else m.role, "content": content})
    return messages


@bp.post("/chat/completions")
def chat_completions() -> Response:
    body = read_json_object()
    req = parse_body(ChatCompletionRequest, body)
    _refuse_unsupported(
        {
            **_common_unsupported(req),
            "tools": (bool(req.tools), "tool calling is not offered"),
            "tool_choice": (req.tool_choice not in (None, "none"), "tool calling is not offered"),
            "functions": (bool(req.functions), "function calling is not offered"),
            "function_call": (
                req.function_call not in (None, "none"),
                "function calling is not offered",
            ),
        }
    )
    if req.top_logprobs is not None and not req.logprobs:
        raise ApiError(
            400,
            f"top_logprobs is {req.top_logprobs}; it needs logprobs set to true",
            param="top_logprobs",
            code="invalid_value",
        )
    if req.max_tokens is not None and req.max_completion_tokens is not None:
        # As OpenAI answers it: max_completion_tokens is max_tokens' new name, not a second limit.
        raise ApiError(
            400,
            f"max_tokens is {req.max_tokens} and max_completion_tokens is "
            f"{req.max_completion_tokens}; setting both at the same time is not supported "
            "(max_completion_tokens replaces max_tokens)",
            param="max_tokens",
            code="invalid_parameter_combination",
        )
    top = (req.top_logprobs or 0) if req.logprobs else None
    fmt = req.response_format
    if (
        fmt is not None
        and fmt.type == "json_schema"
        and (fmt.json_schema is None or fmt.json_schema.schema_ is None)
    ):
        raise ApiError(
            400,
            "response_format json_schema needs json_schema.schema",
            param="response_format.json_schema",
            code="missing_required_parameter",
        )
    ask = ChatAsk(
        model=req.model,
        body=body,
        messages=_chat_messages(req),
        max_tokens=req.max_completion_tokens or req.max_tokens,
        max_tokens_param=(
            "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        ),
        json_mode=fmt is not None and fmt.type != "text",
        json_schema=fmt.json_schema.schema_ if fmt and fmt.json_schema else None,
        stream=req.stream,
        logprobs=top,
        grounding=(
            (req.appliance_grounding.collections, req.appliance_grounding.top_k)
            if req.appliance_grounding is not None
            else None
        ),
        **_sampling(req),
    )
    ctx = context.current()
    ident, created, name = "chatcmpl-" + ctx.request_id, int(time.time()), req.model
    router = get_router(current_app)
    routed = router.has(req.model)
    if req.stream:
        chunk = {
            "id": ident,
            "object": "chat.completion.chunk",
            "created": created,
            "model": name,
        }

        def put_text(
            text: str | None, reason: str | None, tokens: tuple[TokenLogprob, ...]
        ) -> dict[str, Any]:
            delta = {"content": text} if text is not None else {}
            shown = logprobs.chat(tokens).model_dump() if top is not None and text else None
            return {"index": 0, "delta": delta, "finish_reason": reason, "logprobs": shown}

        include = bool(req.stream_options and req.stream_options.include_usage)
        first = sse(
            {
                **chunk,
                "choices": [
                    {
                        "index": 0,
                        "delta": {"role": "assistant", "content": ""},
                        "finish_reason": None,
                        "logprobs": None,
                    }
                ],
                **({"usage": None} if include else {}),
            }
        )
        if routed:
            return _routed_stream(ctx, ask, chunk, put_text, include, first)
        return _stream(ctx, ask, chunk, put_text, include, first)
    with departures.get(current_app).watching(ctx, request.environ):
        run = (router if routed else get_pipeline(current_app)).chat(ctx, ask)
        text, done = run.collect()
    answer = ChatCompletion(
        id=ident,
        created=created,
        model=name,
        usage=usage(done),
        choices=[
            ChatChoice(
                index=0,
                message=AssistantMessage(content=text),
                finish_reason="length" if done.reason == "length" else "stop",
                logprobs=logprobs.chat(run.tokens) if top is not None else None,
            )
        ],
    )
    # Extensions: which model answered a route and why; a grounded answer's sources.
    exclude = set()
    if ctx.routing is not None:
        answer.appliance_route = RouteDecision.model_validate(ctx.routing)
    else:
        exclude.add("appliance_route")
    if ctx.grounding is not None:
        answer.appliance_grounding = Grounded.model_validate(ctx.grounding.public())
    else:
        exclude.add("appliance_grounding")
    resp = Response(answer.model_dump_json(exclude=exclude), mimetype="application/json")
    if ctx.routing is not None:
        resp.headers["X-Appliance-Route"] = route_header(ctx.routing)
    return resp


def _not_a_route(name: str, path: str) -> None:
    if get_router(current_app).has(name):
        raise ApiError(
            400,
            f"model {name!r} is a route: it answers /v1/chat/completions, not {path}",
            param="model",
            code="wrong_model_kind",
        )


def route_header(decision: dict[str, Any]) -> str:
    return (
        f"{decision['route']}; answered_by={decision['answered_by']}; outcome={decision['outcome']}"
    )


def _routed_stream(
    ctx: RequestContext,
    ask: ChatAsk,
    chunk: dict[str, Any],
    put_text: PutText,
    include: bool,
    first: bytes,
) -> Response:
    """A routed stream: the route decides (keep-alive comments meanwhile), then the
    chosen answer streams, its last chunk naming who answered and why."""
    router = get_router(current_app)
    route = router.route(ask.model)
    router.authorize(ctx, route)  # a 403 or 503 is a plain one, never inside a stream
    router.ready(route)
    router.check(route, ask)
    get_pipeline(current_app).check(ask)
    start = functools.partial(router.chat, ctx, ask)
    resp = stream_after_load(ctx, start, chunk, put_text, include, first, waiting="routing")
    resp.headers["X-Appliance-Route"] = route.name
    return resp


def _stream(
    ctx: RequestContext,
    ask: ChatAsk,
    chunk: dict[str, Any],
    put_text: PutText,
    include: bool,
    first: bytes = b"",
) -> Response:
    """A stream; when its model must load first, one that says so with keep-alive
    comments while it loads, rather than a silent wait."""
    pipeline = get_pipeline(current_app)
    pipeline.authorize(ctx, ask.model)  # a 403 is a plain 403, never inside a stream
    if pipeline.pool.needs_load(ask.model, "chat"):
        pipeline.check(ask)  # a plain mistake is a plain 400, before anything loads
        pipeline.pool.check_room(ask.model)  # and no room a 503 with Retry-After
        start = functools.partial(pipeline.chat, ctx, ask)
        return stream_after_load(ctx, start, chunk, put_text, include, first)
    return start_stream(pipeline.chat(ctx, ask), chunk, put_text, include, first)


def _sampling(req: ChatCompletionRequest | CompletionRequest) -> dict[str, Any]:
    return {
        "temperature": req.temperature,
        "top_p": req.top_p,
        "seed": req.seed,
        "stop": req.stop,
        "presence_penalty": req.presence_penalty,
        "frequency_penalty": req.frequency_penalty,
        "ignore_eos": req.ignore_eos,
    }


def _one_prompt(prompt: str | list[str] | list[int] | list[list[int]]) -> str | list[int]:
    """The one prompt of a request: text or token ids; a batch of one is one prompt."""
    if isinstance(prompt, str):
        return prompt
    if all(isinstance(p, int) for p in prompt):
        return [p for p in prompt if isinstance(p, int)]
    if len(prompt) == 1 and isinstance(prompt[0], str | list):
        return prompt[0]
    raise ApiError(
        400,
        f"prompt holds {len(prompt)} prompts; this appliance takes one prompt per request",
        param="prompt",
        code="unsupported_parameter",
    )


@bp.post("/completions")
def completions() -> Response:
    body = read_json_object()
    req = parse_body(CompletionRequest, body)
    prompt_in = _one_prompt(req.prompt)
    _refuse_unsupported(
        {
            **_common_unsupported(req),
            "best_of": (req.best_of not in (None, 1), "only best_of=1 is served"),
            "echo": (req.echo, "the prompt is not echoed"),
            "suffix": (req.suffix is not None, "insertion (suffix) is not offered"),
        }
    )
    _not_a_route(req.model, "/v1/completions")
    top = req.logprobs
    ask = ChatAsk(
        model=req.model,
        body=body,
        prompt=prompt_in,
        max_tokens=req.max_tokens,
        stream=req.stream,
        logprobs=top,
        **_sampling(req),
    )
    ctx = context.current()
    ident, created, name = "cmpl-" + ctx.request_id, int(time.time()), req.model
    if req.stream:
        chunk = {
            "id": ident,
            "object": "text_completion",
            "created": created,
            "model": name,
        }

        offset = 0  # where the next chunk's tokens start in the answer

        def put_text(
            text: str | None, reason: str | None, tokens: tuple[TokenLogprob, ...]
        ) -> dict[str, Any]:
            nonlocal offset
            shown = None
            if top is not None and text:
                shown = logprobs.completion(tokens, top, offset).model_dump()
                offset += len(text)
            return {"index": 0, "text": text or "", "finish_reason": reason, "logprobs": shown}

        include = bool(req.stream_options and req.stream_options.include_usage)
        return _stream(ctx, ask, chunk, put_text, include)
    with departures.get(current_app).watching(ctx, request.environ):
        run = get_pipeline(current_app).chat(ctx, ask)
        text, done = run.collect()
    answer = Completion(
        id=ident,
        created=created,
        model=name,
        usage=usage(done),
        choices=[
            CompletionChoice(
                index=0,
                text=text,
                finish_reason="length" if done.reason == "length" else "stop",
                logprobs=logprobs.completion(run.tokens, top) if top is not None else None,
            )
        ],
    )
    return Response(answer.model_dump_json(), mimetype="application/json")


def _embedding_input(
    value: str | list[str] | list[int] | list[list[int]],
) -> tuple[list[str] | None, list[list[int]] | None]:
    """Texts or token-id lists, as OpenAI's input allows them."""
    if isinstance(value, str):
        return [value], None
    if value and all(isinstance(v, int) for v in value):
        return None, [[v for v in value if isinstance(v, int)]]
    if all(isinstance(v, str) for v in value):
        return [v for v in value if isinstance(v, str)], None
    return None, [v for v in value if isinstance(v, list)]


@bp.post("/embeddings")
def embeddings() -> Response:
    body = read_json_object()
    req = parse_body(EmbeddingRequest, body)
    _not_a_route(req.model, "/v1/embeddings")
    texts, token_ids = _embedding_input(req.input)
    ask = EmbedAsk(
        model=req.model, body=body, texts=texts, token_ids=token_ids, dimensions=req.dimensions
    )
    ctx = context.current()
    result = get_pipeline(current_app).embed(ctx, ask)
    data = []
    for i, row in enumerate(result.vectors):
        vector: list[float] | str
        if req.encoding_format == "base64":
            vector = base64.b64encode(row.astype("<f4").tobytes()).decode("ascii")
        else:
            vector = [float(x) for x in np.asarray(row, dtype=np.float32)]
        data.append(Embedding(index=i, embedding=vector))
    answer = EmbeddingList(
        data=data,
        model=ctx.model or req.model,
        usage=EmbeddingUsage(prompt_tokens=result.prompt_tokens, total_tokens=result.prompt_tokens),
    )
    return Response(answer.model_dump_json(), mimetype="application/json")


def _card(row: dict[str, Any]) -> ModelCard:
    settings = current_app.config["APPLIANCE_SETTINGS"]
    pool = get_pool(current_app)
    manifest = pool.manifest(row["name"])
    path = settings.models_path / manifest.file
    serve = ServeSettings.of(settings, manifest)
    chat = manifest.kind in ("chat", "specialist")
    if manifest.specialist is not None and manifest.kind == "specialist":
        base = pool.manifest(manifest.specialist.base)
        manifest_for_window = base
    else:
        manifest_for_window = manifest
    n_ctx = row.get("n_ctx")
    if n_ctx is None and chat:  # not loaded: what it will have
        window = manifest_for_window.context_length or serve.context_size
        n_ctx = min(serve.context_size, window)
    kernels = row.get("kernels")
    placement = row.get("placement")
    public = manifest.public()
    if row.get("adapters") is not None:  # with each adapter's hash, as served
        public["adapters"] = row["adapters"]
    parts = pool.parts(manifest.name)
    if manifest.specialist is not None and parts is not None:
        # What answers, as one hash: its base and adapters by file, its system prompt
        # and sampling (the audit records' model_sha256 for its answers).
        public["sha256"] = served_by(parts, manifest.specialist)["sha256"]
    return ModelCard(
        id=manifest.name,
        created=int(path.stat().st_mtime) if path.exists() else 0,
        owned_by="appliance",
        state=row["state"],
        reason=row.get("reason"),
        memory_bytes=row["memory_bytes"],
        keep_alive=row["keep_alive"],
        n_ctx=n_ctx if chat else manifest.context_length,
        parallel_streams=row.get("slots", serve.parallel_streams) if chat else None,
        kernels=Kernels.model_validate(kernels) if kernels else None,
        placement=Placement.model_validate(placement) if placement else None,
        **public,
    )


def _rows() -> dict[str, dict[str, Any]]:
    """The models /v1 serves (installed, not refused) that the caller's role may use,
    with their state."""
    pool = get_pool(current_app)
    role = context.current().actor.role
    rows = {}
    for row in pool.state():
        if not row["installed"] or row["kind"] not in OPENAI_KINDS or row["state"] == "refused":
            continue
        spec = pool.manifest(row["name"]).specialist
        if spec is not None and spec.roles is not None and role not in spec.roles:
            continue
        rows[row["name"]] = row
    return rows


def _route_cards() -> dict[str, RouteCard]:
    """The routes the caller's role may use."""
    role = context.current().actor.role
    cards = {}
    for name, route in get_router(current_app).table.routes().items():
        if route.roles is not None and role not in route.roles:
            continue
        cards[name] = RouteCard(
            id=name,
            created=int(route.path.stat().st_mtime) if route.path.exists() else 0,
            domain="routed: " + ", ".join(route.models()),
            description=route.description,
            state="ready" if route.calibration is not None else "uncalibrated",
            route=route.public(),
        )
    return cards


@bp.get("/models")
def list_models() -> Response:
    rows = _rows()
    cards: list[ModelCard | RouteCard] = [_card(row) for row in rows.values()]
    for served, entry in sorted(get_aliases(current_app).all().items()):
        row = rows.get(entry["champion"])
        if row is not None:  # a served name, as the model behind it now
            cards.append(_card(row).model_copy(update={"id": served, "champion": row["name"]}))
    cards += _route_cards().values()
    return Response(ModelList(data=cards).model_dump_json(), mimetype="application/json")


@bp.get("/models/<path:name>")
def get_model(name: str) -> Response:
    router = get_router(current_app)
    if router.has(name):
        router.authorize(context.current(), router.route(name))
        return Response(_route_cards()[name].model_dump_json(), mimetype="application/json")
    pool = get_pool(current_app)
    manifest = pool.manifest(name)  # UnknownModel: 404
    if manifest.kind not in OPENAI_KINDS:
        raise WrongKind(name, manifest.kind, "chat")
    spec, role = manifest.specialist, context.current().actor.role
    if spec is not None and spec.roles is not None and role not in spec.roles:
        raise Forbidden(
            f"role {role!r} may not use specialist {name!r}; it is for: " + ", ".join(spec.roles),
            param="model",
            code="forbidden",
        )
    real = manifest.name  # a served name's champion
    row = _rows().get(real)
    if row is None:  # refused (a missing, changed or unloadable file): the reason
        raise ModelUnavailable(pool.refused().get(real) or f"model {real!r} is refused")
    card = _card(row)
    if real != name:
        card = card.model_copy(update={"id": name, "champion": real})
    return Response(card.model_dump_json(), mimetype="application/json")


@bp.post("/retrieve")
def retrieve() -> Response:
    """Extension: the passages a grounded answer would be given, ranked, with scores;
    only from collections the caller may read."""
    body = read_json_object()
    req = parse_body(RetrieveRequest, body)
    ctx = context.current()
    library = get_library(current_app)
    chosen, hits = library.retrieve(ctx, req.query, req.collections, req.top_k, req.vector_weight)
    threshold = library.threshold(chosen) if chosen else None
    data = [
        {
            "rank": i,
            **hit.public(),
            "relevant": threshold is not None and hit.similarity >= threshold,
        }
        for i, hit in enumerate(hits, 1)
    ]
    ctx.notes["passages"] = len(hits)
    # Passages are the documents' text: the request and what it returned are recorded.
    audit_pair.open_pair(get_store(current_app), ctx, body, with_outcome=True)
    ctx.audit.output.append(
        json.dumps(
            {
                "collections": chosen,
                "passages": [
                    {
                        "passage_id": h.passage.id,
                        "document_sha256": h.passage.document_sha256,
                        "version": h.passage.version,
                    }
                    for h in hits
                ],
            }
        )
    )
    weight = req.vector_weight if req.vector_weight is not None else library.vector_weight(chosen)
    out = {
        "object": "list",
        "collections": chosen,
        "min_similarity": threshold,
        "vector_weight": weight,
        "data": data,
    }
    return Response(json.dumps(out), mimetype="application/json")


@bp.get("/collections")
def list_collections() -> Response:
    """Extension: the document collections the caller may read (for grounding)."""
    library = get_library(current_app)
    readable = library.readable(context.current().actor.role or "")
    data = [
        {
            "id": name,
            "object": "collection",
            "documents": c["documents"],
            "min_similarity": c["min_similarity"],
            "vector_weight": c["vector_weight"],
        }
        for name, c in sorted(readable.items())
    ]
    return Response(json.dumps({"object": "list", "data": data}), mimetype="application/json")
