"""Answers as server-sent events in OpenAI's chunk shape, from a pipeline's ChatRun.
Closing the stream (the client went away) closes the run, which cancels the job."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

from flask import Response

from appliance.api.errors import error_body
from appliance.api.schemas import PromptTokensDetails, Usage
from appliance.engines.base import Failed, Finished, TextDelta
from appliance.inference.pipeline import ChatRun

PutText = Callable[[str | None, str | None], dict[str, Any]]


def usage(done: Finished) -> Usage:
    return Usage(
        prompt_tokens=done.prompt_tokens,
        completion_tokens=done.completion_tokens,
        total_tokens=done.prompt_tokens + done.completion_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=done.cached_tokens),
    )


def sse(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


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
        for event in events:
            if event is None:
                yield b": keep-alive\n\n"
            elif isinstance(event, TextDelta):
                yield sse({**chunk, "choices": [put_text(event.text, None)], **usage_key})
            elif isinstance(event, Finished):
                reason = "length" if event.reason == "length" else "stop"
                yield sse({**chunk, "choices": [put_text(None, reason)], **usage_key})
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
