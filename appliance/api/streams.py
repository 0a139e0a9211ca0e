"""Answers as server-sent events in OpenAI's chunk shape, from a pipeline's ChatRun.
Closing the stream (the client went away) closes the run, which cancels the job."""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

from flask import Response

from appliance.api.errors import error_body, problem_body, status_of
from appliance.api.schemas import PromptTokensDetails, Usage
from appliance.context import RequestContext
from appliance.engines.base import Failed, Finished, TextDelta, TokenLogprob
from appliance.inference.pipeline import ChatRun
from appliance.problems import Failed as Failure
from appliance.problems import Problem, Unavailable

log = logging.getLogger(__name__)
LOADING_KEEPALIVE_SECONDS = 2.0

# Writes text (and its tokens' log-probabilities, when asked for) or a finish reason
# into a choice of the protocol's chunk.
PutText = Callable[[str | None, str | None, tuple[TokenLogprob, ...]], dict[str, Any]]


def usage(done: Finished) -> Usage:
    return Usage(
        prompt_tokens=done.prompt_tokens,
        completion_tokens=done.completion_tokens,
        total_tokens=done.prompt_tokens + done.completion_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=done.cached_tokens),
    )


def sse(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


# Stands for the text while a chunk's template is made: a served model's name (the only
# text from the client in a chunk) cannot hold a NUL.
_MARK_TEXT = "\x00appliance-text\x00"
_MARK = json.dumps(_MARK_TEXT).encode()


def text_chunks(data: dict[str, Any]) -> Callable[[str], bytes] | None:
    """Chunks that differ only in their text, made without serializing the rest each
    time (a streamed token's share of the request thread's work, which on a small box
    competes with the model's threads): the same bytes as ``sse`` with the text in
    place of the mark. None if the mark is not there exactly once."""
    whole = sse(data)
    if whole.count(_MARK) != 1:
        return None
    head, tail = whole.split(_MARK)
    return lambda text: head + json.dumps(text).encode() + tail


def _chunks(
    run: ChatRun, chunk: dict[str, Any], put_text: PutText, include_usage: bool, first: bytes
) -> Iterator[bytes]:
    """``chunk`` is the event template; ``put_text`` writes text or a finish reason into
    a choice."""
    events = run.stream()
    try:
        if first:
            yield first
        usage_key = {"usage": None} if include_usage else {}
        # Without log-probabilities a text chunk depends on its text alone.
        plain = (
            text_chunks({**chunk, "choices": [put_text(_MARK_TEXT, None, ())], **usage_key})
            if run.job.generation.params.logprobs is None
            else None
        )
        for event in events:
            if event is None:
                yield b": keep-alive\n\n"
            elif isinstance(event, TextDelta):
                if plain is not None and not event.tokens:
                    yield plain(event.text)
                    continue
                yield sse(
                    {**chunk, "choices": [put_text(event.text, None, event.tokens)], **usage_key}
                )
            elif isinstance(event, Finished):
                reason = "length" if event.reason == "length" else "stop"
                last = {**chunk, "choices": [put_text(None, reason, ())], **usage_key}
                if run.ctx.routing is not None:  # extension: who answered the route, why
                    last["appliance_route"] = run.ctx.routing
                if run.ctx.grounding is not None:  # extension: the sources and citations
                    last["appliance_grounding"] = run.ctx.grounding.public()
                yield sse(last)
                if include_usage:
                    yield sse({**chunk, "choices": [], "usage": usage(event).model_dump()})
                yield b"data: [DONE]\n\n"
            elif isinstance(event, Failed):
                yield sse(error_body(500, event.message, code="generation_failed"))
    finally:
        events.close()
        run.close()  # before the end, the client went away: the run cancels its job


def start_stream(
    run: ChatRun, chunk: dict[str, Any], put_text: PutText, include_usage: bool, first: bytes = b""
) -> Response:
    run.confirm()  # the request record is durable before the first byte
    resp = Response(
        _chunks(run, chunk, put_text, include_usage, first), mimetype="text/event-stream"
    )
    resp.headers["Cache-Control"] = "no-cache"
    resp.headers["X-Accel-Buffering"] = "no"
    return resp


def stream_after_load(
    ctx: RequestContext,
    start: Callable[[], ChatRun],
    chunk: dict[str, Any],
    put_text: PutText,
    include_usage: bool,
    first: bytes = b"",
    waiting: str = "loading model",
) -> Response:
    """A stream whose model must load first: the response begins at once with SSE
    comments every few seconds (clients and proxies keep the connection), while
    ``start`` (the pipeline) loads, prepares and submits. A problem found then (the
    prompt too long, no room) ends the stream with one error event in OpenAI's shape.
    The request record is still durable before the answer's first byte."""
    ctx.deferred_stream = True
    outcome: dict[str, Any] = {}

    def prepare() -> None:
        try:
            outcome["run"] = start()
        except Problem as problem:
            outcome["problem"] = problem
        except Exception as exc:  # reported in the stream, and logged by the caller
            outcome["error"] = exc

    worker = threading.Thread(target=prepare, name=f"prepare-{ctx.request_id[:8]}", daemon=True)
    worker.start()

    def body() -> Iterator[bytes]:
        ended = False  # the stream reached its end: an answer, or an error event
        try:
            name = ctx.model or chunk.get("model", "")
            while worker.is_alive():
                yield f": {waiting} {name}\n\n".encode()
                worker.join(LOADING_KEEPALIVE_SECONDS)
            run: ChatRun | None = outcome.get("run")
            problem: Problem | None = outcome.get("problem")
            if "error" in outcome:
                log.error("stream preparation failed", exc_info=outcome["error"])
                problem = Failure("internal error; see the server log", code="internal_error")
            if run is not None:
                try:
                    run.confirm()
                except Problem as audit_down:  # confirm() has cancelled the job
                    problem = audit_down
            if problem is not None:
                ended = True
                ctx.note_error(problem.code or "error")
                ctx.deferred_status = status_of(problem)
                # Its record first: nothing leaves without one (fail closed).
                if ctx.audit.finish is not None and not ctx.audit.finish():
                    problem = Unavailable(
                        "the audit log cannot be written; the request was not served",
                        code="audit_unavailable",
                        retry_after=5,
                    )
                yield sse(problem_body(problem))
                return
            assert run is not None
            ended = True
            yield from _chunks(run, chunk, put_text, include_usage, first)
        finally:
            if not ended:
                # The client left while the model loaded (or the route ran): the
                # pipeline stops what it runs, then what it started is cancelled, so
                # that the model is free and the audit pair closes (as cancelled).
                ctx.gone.set()
                worker.join()
                late: ChatRun | None = outcome.get("run")
                if late is not None:
                    with contextlib.suppress(Problem):
                        late.confirm()
                    late.close()

    resp = Response(body(), mimetype="text/event-stream")
    resp.headers["Cache-Control"] = "no-cache"
    resp.headers["X-Accel-Buffering"] = "no"
    return resp
