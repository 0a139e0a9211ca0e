"""One typed object per request: who asked, what they asked of which model, what it
cost, and the audit pair's progress. The middleware, the gate and the inference
pipeline each fill in their part; the log line, the metrics and the audit outcome
record all read it, and none reads another's notes.

It rides on ``flask.g`` as the one attribute ``g.ctx``.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from flask import g, request

from appliance.actors import ANONYMOUS, Actor

if TYPE_CHECKING:  # types only: the context sits below the layers that fill it in
    from appliance.audit.records import Entry
    from appliance.audit.store import Ticket
    from appliance.auth.store import Principal
    from appliance.docs.grounding import Grounding
    from appliance.serving.pool import Lease


@dataclass
class Usage:
    """What an inference cost, as the engine reported it when it ended."""

    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    finish_reason: str | None = None  # stop | length | cancelled | failed
    decode_seconds: float | None = None


@dataclass
class AuditPair:
    """An inference's request record (with the input) and its outcome record (with
    the output). The request record is durable before the answer's first byte."""

    ticket: Ticket | None = None  # the request record, queued
    deferred: Entry | None = None  # the request record, to commit with its outcome
    opened: bool = False  # the request record is durable: an outcome is owed
    output: list[str] = field(default_factory=list)
    # A stream that began before its model loaded: writes its last record now (True
    # when written); set by the audit trail.
    finish: Callable[[], bool] | None = None


@dataclass
class RequestContext:
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    started: float = field(default_factory=time.perf_counter)
    client: str | None = None
    method: str = ""
    route: str = ""  # the URL rule matched (the path where none did)
    actor: Actor = ANONYMOUS
    principal: Principal | None = None
    session_cookie: str | None = None
    # The model, once the pipeline resolved it.
    model: str | None = None
    model_sha256: str | None = None
    model_kind: str | None = None
    model_loaded_now: bool = False  # the request waited for its model to load
    # A specialist: the base and each adapter (hash, scale) that made the answer.
    served_by: dict[str, Any] | None = None
    # A routed request: the route's decision (similarities, each model tried, why).
    routing: dict[str, Any] | None = None
    # A grounded request: the sources it was given, what its answer cited.
    grounding: Grounding | None = None
    lease: Lease | None = None
    usage: Usage = field(default_factory=Usage)
    first_token_at: float | None = None  # perf_counter of the answer's first token
    client_disconnected: bool = False
    # Set when the client has gone before its answer began (a stream still routing or
    # loading): what was started for it stops at the next token.
    gone: threading.Event = field(default_factory=threading.Event)
    # A stream that began (with keep-alive comments) before its model had loaded: its
    # outcome, or the problem that ended it, is known only when the stream ends.
    deferred_stream: bool = False
    deferred_status: int | None = None
    error_type: str | None = None  # a stable reason for a refusal or a failure
    audit: AuditPair = field(default_factory=AuditPair)
    audit_ms: float = 0.0  # time the request waited on the audit log
    # The gate's notes for the audit trail.
    audit_suppressed: bool = False  # refused and counted, not recorded
    refused_unknown: bool = False  # refused before anyone was known: size and digest only
    suppressed_before: int = 0
    release_in_flight: Callable[[], None] | None = None
    # Figures a route adds to its log line (e.g. inputs of an embedding request).
    notes: dict[str, Any] = field(default_factory=dict)

    def note_error(self, reason: str) -> None:
        """The first reason given wins: it is the most precise."""
        if self.error_type is None:
            self.error_type = reason

    def log_fields(self) -> dict[str, Any]:
        """The request's log line, without the HTTP parts (route, status, latency)."""
        fields: dict[str, Any] = {}
        if self.model is not None:
            fields["model"] = self.model
        usage = self.usage
        for key in ("prompt_tokens", "completion_tokens", "cached_tokens", "finish_reason"):
            value = getattr(usage, key)
            if value is not None:
                fields[key] = value
        if usage.decode_seconds is not None:
            fields["decode_seconds"] = round(usage.decode_seconds, 4)
        if self.model_loaded_now:
            fields["model_loaded_now"] = True
        if self.client_disconnected:
            fields["client_disconnected"] = True
        if self.error_type is not None:
            fields["error_type"] = self.error_type
        if self.audit_ms:
            fields["audit_ms"] = round(self.audit_ms, 3)
        fields.update(self.notes)
        return fields


def begin() -> RequestContext:
    req = request._get_current_object()  # type: ignore[attr-defined]  # one proxy lookup
    rule = req.url_rule
    ctx = RequestContext(
        client=req.remote_addr, method=req.method, route=rule.rule if rule else req.path
    )
    g.ctx = ctx
    return ctx


def existing() -> RequestContext | None:
    """This request's context if one was made (teardown: after_request may not have run)."""
    ctx: RequestContext | None = g.get("ctx")
    return ctx


def current() -> RequestContext:
    """This request's context (one is made for a request that has none yet: an error
    raised before the first hook ran still gets a log line)."""
    ctx: RequestContext | None = g.get("ctx")
    return ctx if ctx is not None else begin()
