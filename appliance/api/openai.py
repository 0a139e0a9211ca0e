"""/v1: the OpenAI API (chat completions, completions, models), so that the `openai`
SDK works unchanged. Request path: validate -> model -> prompt and bounds -> admission
-> stream or collect the job's events."""

from __future__ import annotations

import time
from typing import Any

from flask import Blueprint, Response, current_app, g

from appliance.api.errors import ApiError, parse_body, read_json_object
from appliance.api.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionChoice,
    CompletionRequest,
    Kernels,
    ModelCard,
    ModelList,
)
from appliance.api.streams import collect, sse, start_stream, usage
from appliance.audit.trail import confirm_inference, open_inference
from appliance.config import Settings
from appliance.engines.base import (
    Generation,
    PromptError,
    SamplingParams,
)
from appliance.resources import pressure
from appliance.scheduler import Job, QueueFull
from appliance.serving import ServedModel, get_pool

bp = Blueprint("openai", __name__, url_prefix="/v1")

MAX_STOPS = 4
MAX_STOP_CHARS = 256


def _settings() -> Settings:
    settings: Settings = current_app.config["APPLIANCE_SETTINGS"]
    return settings


def _served(name: str) -> ServedModel:
    pool = get_pool(current_app)
    short = pressure(_settings())
    if short:
        raise ApiError(503, short, code="memory_pressure", headers={"Retry-After": "5"})
    if name in pool.tensors:
        raise ApiError(
            400,
            f"model {name!r} is a tensor model: use /v2/models/{name}/infer",
            param="model",
            code="wrong_protocol",
        )
    if name in pool.served:
        return pool.served[name]
    if name in pool.refused:
        raise ApiError(503, pool.refused[name], param="model", code="model_unavailable")
    available = ", ".join(sorted(pool.served)) or "none"
    raise ApiError(
        404,
        f"model {name!r} does not exist; available: {available}",
        param="model",
        code="model_not_found",
    )


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
        "logprobs": (req.logprobs not in (None, False, 0), "log probabilities are not returned"),
        "logit_bias": (bool(req.logit_bias), "token biases are not applied"),
    }


def _stops(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if len(stops) > MAX_STOPS:
        raise ApiError(
            400,
            f"stop has {len(stops)} strings; at most {MAX_STOPS} are allowed",
            param="stop",
            code="invalid_value",
        )
    for i, text in enumerate(stops):
        # Each is matched against the answer after every token: a long one costs the
        # model's thread (a 250,000-character stop string took 3.3 s of it).
        if len(text) > MAX_STOP_CHARS:
            raise ApiError(
                400,
                f"stop[{i}] is {len(text)} characters long; at most {MAX_STOP_CHARS} are allowed",
                param=f"stop[{i}]" if not isinstance(stop, str) else "stop",
                code="invalid_value",
            )
    return tuple(s for s in stops if s)


def _sampling(
    req: ChatCompletionRequest | CompletionRequest,
    requested: int | None,
    prompt_tokens: int,
    model: ServedModel,
    prompt_param: str,
    grammar: str | None = None,
) -> SamplingParams:
    limit = _settings().max_tokens
    n_ctx = model.engine.info.n_ctx
    if requested is not None and requested > limit:
        raise ApiError(
            400,
            f"max_tokens is {requested}; this appliance allows at most {limit} "
            "(setting max_tokens)",
            param="max_tokens",
            code="invalid_value",
        )
    if prompt_tokens == 0:
        raise ApiError(400, "the prompt is empty", param=prompt_param, code="invalid_value")
    if prompt_tokens >= n_ctx:
        raise ApiError(
            400,
            f"the prompt has {prompt_tokens} tokens; the context window of "
            f"{model.manifest.name} is {n_ctx} tokens",
            param=prompt_param,
            code="context_length_exceeded",
        )
    max_tokens = requested if requested is not None else min(limit, n_ctx - prompt_tokens)
    if prompt_tokens + max_tokens > n_ctx:
        raise ApiError(
            400,
            f"the prompt has {prompt_tokens} tokens and max_tokens is {max_tokens}: "
            f"{prompt_tokens + max_tokens} tokens exceed the context window of "
            f"{model.manifest.name}, {n_ctx} tokens",
            param=prompt_param,
            code="context_length_exceeded",
        )
    if req.ignore_eos and grammar is not None:
        raise ApiError(
            400,
            "ignore_eos cannot be combined with response_format json",
            param="ignore_eos",
            code="invalid_value",
        )
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        seed=req.seed,
        stop=_stops(req.stop),
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        grammar=grammar,
        ignore_eos=req.ignore_eos,
    )


def _submit(model: ServedModel, generation: Generation) -> Job:
    try:
        return model.scheduler.submit(generation)
    except QueueFull as exc:
        raise ApiError(
            503, str(exc), code="queue_full", headers={"Retry-After": str(exc.retry_after)}
        ) from None


def _confirm(job: Job) -> None:
    """The request record must be durable before the answer's first byte; if it cannot
    be written, the model stops and the client gets 503."""
    try:
        confirm_inference()
    except ApiError:
        job.cancel()
        raise


def _chat_messages(req: ChatCompletionRequest) -> list[dict[str, str]]:
    messages = []
    for m in req.messages:
        content = m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)
        messages.append({"role": "system" if m.role == "developer" else m.role, "content": content})
    return messages


def _grammar(req: ChatCompletionRequest, model: ServedModel) -> str | None:
    fmt = req.response_format
    if fmt is None or fmt.type == "text":
        return None
    try:
        if fmt.type == "json_object":
            return model.engine.json_grammar(None)
        if fmt.json_schema is None or fmt.json_schema.schema_ is None:
            raise ApiError(
                400,
                "response_format json_schema needs json_schema.schema",
                param="response_format.json_schema",
                code="missing_required_parameter",
            )
        return model.engine.json_grammar(fmt.json_schema.schema_)
    except PromptError as exc:
        raise ApiError(400, str(exc), param=exc.param, code="invalid_value") from None


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
            "top_logprobs": (bool(req.top_logprobs), "log probabilities are not returned"),
        }
    )
    model = _served(req.model)
    g.log_fields["model"] = model.manifest.name
    grammar = _grammar(req, model)
    try:
        prompt = model.engine.chat_prompt(_chat_messages(req))
    except PromptError as exc:
        raise ApiError(400, str(exc), param=exc.param or "messages", code="invalid_value") from None
    requested = req.max_completion_tokens or req.max_tokens
    params = _sampling(req, requested, len(prompt), model, "messages", grammar)
    open_inference(model.manifest.name, model.manifest.sha256, body)
    job = _submit(model, Generation(prompt, params))
    ident, created = "chatcmpl-" + g.request_id, int(time.time())
    if req.stream:
        _confirm(job)
        chunk = {
            "id": ident,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model.manifest.name,
        }

        def put_text(text: str | None, reason: str | None) -> dict[str, Any]:
            delta = {"content": text} if text is not None else {}
            return {"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}

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
        return start_stream(job, chunk, put_text, include, first)
    text, done = collect(job)
    _confirm(job)
    answer = ChatCompletion(
        id=ident,
        created=created,
        model=model.manifest.name,
        usage=usage(done),
        choices=[
            ChatChoice(
                index=0,
                message=AssistantMessage(content=text),
                finish_reason="length" if done.reason == "length" else "stop",
            )
        ],
    )
    return Response(answer.model_dump_json(), mimetype="application/json")


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
    model = _served(req.model)
    g.log_fields["model"] = model.manifest.name
    try:
        prompt = model.engine.text_prompt(prompt_in)
    except PromptError as exc:
        raise ApiError(400, str(exc), param="prompt", code="invalid_value") from None
    params = _sampling(req, req.max_tokens, len(prompt), model, "prompt")
    open_inference(model.manifest.name, model.manifest.sha256, body)
    job = _submit(model, Generation(prompt, params))
    ident, created = "cmpl-" + g.request_id, int(time.time())
    if req.stream:
        _confirm(job)
        chunk = {
            "id": ident,
            "object": "text_completion",
            "created": created,
            "model": model.manifest.name,
        }

        def put_text(text: str | None, reason: str | None) -> dict[str, Any]:
            return {"index": 0, "text": text or "", "finish_reason": reason, "logprobs": None}

        include = bool(req.stream_options and req.stream_options.include_usage)
        return start_stream(job, chunk, put_text, include)
    text, done = collect(job)
    _confirm(job)
    answer = Completion(
        id=ident,
        created=created,
        model=model.manifest.name,
        usage=usage(done),
        choices=[
            CompletionChoice(
                index=0, text=text, finish_reason="length" if done.reason == "length" else "stop"
            )
        ],
    )
    return Response(answer.model_dump_json(), mimetype="application/json")


def _card(model: ServedModel) -> ModelCard:
    path = _settings().models_path / model.manifest.file
    kernels = model.engine.info.extra.get("kernels")
    return ModelCard(
        id=model.manifest.name,
        created=int(path.stat().st_mtime),
        owned_by="appliance",
        n_ctx=model.engine.info.n_ctx,
        parallel_streams=model.scheduler.slots,
        kernels=Kernels.model_validate(kernels) if kernels else None,
        **model.manifest.public(),
    )


@bp.get("/models")
def list_models() -> Response:
    pool = get_pool(current_app)
    cards = [_card(m) for _, m in sorted(pool.served.items())]
    return Response(ModelList(data=cards).model_dump_json(), mimetype="application/json")


@bp.get("/models/<path:name>")
def get_model(name: str) -> Response:
    return Response(_card(_served(name)).model_dump_json(), mimetype="application/json")
