"""An inference's two audit records. The request record (with the input) is queued as
the prompt goes to the model and must be durable before the first byte of the answer
leaves (the commit overlaps the model's reading of the prompt); the outcome record
(with the output and the figures) is written before a plain answer leaves, or when a
stream ends. If a record cannot be written, the client gets 503 and no answer.

Everything here is read from the request's context: the figures come from the
context's usage, never from the log line.
"""

from __future__ import annotations

import time
from typing import Any

from appliance.audit.records import Entry
from appliance.audit.store import AuditStore, AuditUnavailable
from appliance.context import RequestContext
from appliance.problems import Unavailable


class AuditDown(Unavailable):
    def __init__(self, exc: AuditUnavailable) -> None:
        super().__init__(
            f"{exc}; the request was not served", code="audit_unavailable", retry_after=5
        )


def entry(kind: str, ctx: RequestContext) -> Entry:
    return Entry(
        kind=kind,
        request_id=ctx.request_id,
        actor=ctx.actor,
        client=ctx.client,
        method=ctx.method,
        route=ctx.route,
    )


def timed(ctx: RequestContext, wait: Any) -> Any:
    """Run a wait on the audit log, adding the time it blocked to the context."""
    started = time.perf_counter()
    try:
        return wait()
    finally:
        ctx.audit_ms += (time.perf_counter() - started) * 1000


def open_pair(
    store: AuditStore, ctx: RequestContext, body: dict[str, Any], with_outcome: bool = False
) -> None:
    """Queue the request record; confirm() waits for it. With ``with_outcome`` (a plain
    answer computed in moments) it is committed together with the outcome record
    instead, still before the answer leaves."""
    record = entry("request", ctx)
    record.model, record.model_sha256 = ctx.model, ctx.model_sha256
    record.content = {"input": body}
    if ctx.served_by is not None:  # a specialist: what answered, file by file
        record.content["served_by"] = ctx.served_by
    if "conversation" in ctx.notes:  # the key a balancer hashes on (X-Conversation-Id)
        record.content["conversation"] = ctx.notes["conversation"]
    if with_outcome:
        ctx.audit.deferred = record
        return
    try:
        ctx.audit.ticket = store.submit(record)
    except AuditUnavailable as exc:
        raise AuditDown(exc) from None


def confirm(store: AuditStore, ctx: RequestContext) -> None:
    """Block until the request record is durable: call before any byte of the answer
    leaves. Raises AuditDown (503) when it cannot be written."""
    pair = ctx.audit
    if pair.ticket is None or pair.opened:
        return
    ticket, pair.ticket = pair.ticket, None
    try:
        timed(ctx, lambda: store.wait(ticket))
    except AuditUnavailable as exc:
        raise AuditDown(exc) from None
    pair.opened = True


def outcome(ctx: RequestContext, status: int, kind: str = "outcome") -> Entry:
    """The outcome record as things stand (a stream's is completed when it ends)."""
    record = entry(kind, ctx)
    record.model, record.model_sha256 = ctx.model, ctx.model_sha256
    record.status = status
    record.error_type = ctx.error_type
    record.latency_us = int((time.perf_counter() - ctx.started) * 1_000_000)
    usage = ctx.usage
    record.prompt_tokens = usage.prompt_tokens
    record.completion_tokens = usage.completion_tokens
    record.finish_reason = usage.finish_reason
    if ctx.client_disconnected:
        record.error_type = "client_disconnected"
    elif usage.finish_reason == "failed":
        record.error_type = record.error_type or "generation_failed"
    return record


def outcome_content(ctx: RequestContext) -> dict[str, Any] | None:
    """What the outcome record holds: the answer, and a routed request's decision."""
    content: dict[str, Any] = {}
    if ctx.audit.output:
        content["output"] = "".join(ctx.audit.output)
    if ctx.routing is not None:
        content["route"] = ctx.routing
    if ctx.grounding is not None:  # what the answer rested on, passage by passage
        content["grounding"] = ctx.grounding.audit()
    return content or None
