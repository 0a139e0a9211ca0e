"""Answers from a model job: collected whole, or as server-sent events in OpenAI's
chunk shape. Closing a stream (the client went away) cancels the job."""

from __future__ import annotations

import json
import queue
from collections.abc import Iterator
from typing import Any

from flask import Response, g

from appliance.api.errors import ApiError, error_body
from appliance.api.schemas import PromptTokensDetails, Usage
from appliance.engines.base import Event, Failed, Finished, TextDelta
from appliance.scheduler import Job

KEEPALIVE_SECONDS = 5.0


def events(job: Job) -> Iterator[Event | None]:
    """The job's events; None every few seconds while nothing happens (keep-alive)."""
    while True:
        try:
            event = job.events.get(timeout=KEEPALIVE_SECONDS)
        except queue.Empty:
            yield None
            continue
        yield event
        if isinstance(event, Finished | Failed):
            return


def note(fields: dict[str, Any], done: Finished) -> None:
    fields.update(
        prompt_tokens=done.prompt_tokens,
        completion_tokens=done.completion_tokens,
        cached_tokens=done.cached_tokens,
        finish_reason=done.reason,
        decode_seconds=round(done.decode_seconds, 4),
    )


def collect(job: Job) -> tuple[str, Finished]:
    parts: list[str] = g.audit.output  # the audit's outcome record keeps the answer
    try:
        for event in events(job):
            if isinstance(event, TextDelta):
                parts.append(event.text)
            elif isinstance(event, Finished):
                note(g.log_fields, event)
                return "".join(parts), event
            elif isinstance(event, Failed):
                raise ApiError(500, event.message, code="generation_failed")
    finally:
        job.cancel()
    raise AssertionError("event stream ended without an outcome")


def usage(done: Finished) -> Usage:
    return Usage(
        prompt_tokens=done.prompt_tokens,
        completion_tokens=done.completion_tokens,
        total_tokens=done.prompt_tokens + done.completion_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=done.cached_tokens),
    )


def sse(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


def stream(
    job: Job,
    chunk: dict[str, Any],
    put_text: Any,
    include_usage: bool,
    fields: dict[str, Any],
    output: list[str],
) -> Iterator[bytes]:
    """Server-sent events for one job. ``chunk`` is the event template; ``put_text``
    writes text or a finish reason into a choice. Closing the generator (the client
    went away) cancels the job, which frees the model at the next token."""
    settled = False
    try:
        usage_key = {"usage": None} if include_usage else {}
        for event in events(job):
            if event is None:
                yield b": keep-alive\n\n"
            elif isinstance(event, TextDelta):
                output.append(event.text)
                yield sse({**chunk, "choices": [put_text(event.text, None)], **usage_key})
            elif isinstance(event, Finished):
                settled = True
                note(fields, event)
                reason = "length" if event.reason == "length" else "stop"
                yield sse({**chunk, "choices": [put_text(None, reason)], **usage_key})
                if include_usage:
                    yield sse({**chunk, "choices": [], "usage": usage(event).model_dump()})
                yield b"data: [DONE]\n\n"
            elif isinstance(event, Failed):
                settled = True
                fields.update(finish_reason="failed")
                yield sse(error_body(500, event.message, code="generation_failed"))
    finally:
        if not settled:  # the client went away before the end
            fields["client_disconnected"] = True
            last = job.cancel_and_settle()
            if isinstance(last, Finished):
                note(fields, last)
            fields["finish_reason"] = "cancelled"


def start_stream(
    job: Job, chunk: dict[str, Any], put_text: Any, include_usage: bool, first: bytes = b""
) -> Response:
    fields, output = g.log_fields, g.audit.output

    def body() -> Iterator[bytes]:
        if first:
            yield first
        yield from stream(job, chunk, put_text, include_usage, fields, output)

    resp = Response(body(), mimetype="text/event-stream")
    resp.headers["Cache-Control"] = "no-cache"
    resp.headers["X-Accel-Buffering"] = "no"
    return resp
