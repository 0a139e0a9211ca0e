"""The audit trail of HTTP requests.

An inference queues its *request* record (with the input) as it hands the prompt to
the model, and waits for it to be durable before the first byte of the answer leaves
(the commit overlaps the model's reading of the prompt); its *outcome* record is
written before a plain answer leaves, or when a stream ends. Every other request
(refusals included) leaves one *event* record before its response leaves. If a record
cannot be written, the client gets 503 and no answer.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from flask import Flask, Response, current_app, g, request

from appliance.api.errors import ApiError, error_response
from appliance.audit.records import ANONYMOUS, Entry
from appliance.audit.store import AuditStore, AuditUnavailable, Ticket

log = logging.getLogger(__name__)
EXTENSION = "appliance.audit"
# Probes carry no data and arrive every few seconds; auditing them would drown the log.
UNAUDITED = frozenset({"/healthz", "/readyz", "/v2/health/live", "/v2/health/ready", "/metrics"})


@dataclass
class RequestAudit:
    started: float = field(default_factory=time.perf_counter)
    ticket: Ticket | None = None  # the request record, queued
    deferred: Entry | None = None  # the request record, to commit with its outcome
    opened: bool = False  # the request record is durable: an outcome is owed
    model: str | None = None
    model_sha256: str | None = None
    output: list[str] = field(default_factory=list)


def get_store(app: Flask) -> AuditStore:
    store: AuditStore = app.extensions[EXTENSION]
    return store


def _base(kind: str, like: Entry | None = None) -> Entry:
    """A record of this request; `like`: another record of it, whose who-and-where it
    shares (cheaper than asking the request again)."""
    if like is not None:
        return Entry(kind, like.request_id, like.actor, like.client, like.method, like.route)
    req = request._get_current_object()  # type: ignore[attr-defined]  # one proxy lookup
    rule = req.url_rule
    return Entry(
        kind=kind,
        request_id=g.request_id,
        actor=g.get("actor") or ANONYMOUS,  # set by authentication when there is one
        client=req.remote_addr,
        method=req.method,
        route=rule.rule if rule else req.path,
    )


def _timed(wait: Callable[[], object]) -> None:
    """Run a wait on the audit log, adding the time it blocked to the request's log."""
    started = time.perf_counter()
    try:
        wait()
    finally:
        fields = g.log_fields
        spent = (time.perf_counter() - started) * 1000
        fields["audit_ms"] = round(fields.get("audit_ms", 0) + spent, 3)


def unavailable(exc: AuditUnavailable) -> ApiError:
    return ApiError(
        503,
        f"{exc}; the request was not served",
        code="audit_unavailable",
        headers={"Retry-After": "5"},
    )


def open_inference(
    model: str, model_sha256: str, body: dict[str, Any], with_outcome: bool = False
) -> None:
    """Queue the request record; confirm_inference() waits for it. With `with_outcome`
    (a plain answer computed in moments) it is committed together with the outcome
    record instead, still before the answer leaves."""
    ctx: RequestAudit = g.audit
    entry = _base("request")
    entry.model, entry.model_sha256 = model, model_sha256
    entry.content = {"input": body}
    ctx.model, ctx.model_sha256 = model, model_sha256
    if with_outcome:
        ctx.deferred = entry
        return
    try:
        ctx.ticket = get_store(current_app).submit(entry)
    except AuditUnavailable as exc:
        raise unavailable(exc) from None


def confirm_inference() -> None:
    """Block until the request record is durable: call before any byte of the answer
    leaves. Raises the 503 when it cannot be written."""
    ctx: RequestAudit = g.audit
    if ctx.ticket is None or ctx.opened:
        return
    ticket, ctx.ticket = ctx.ticket, None
    try:
        _timed(lambda: get_store(current_app).wait(ticket))
    except AuditUnavailable as exc:
        raise unavailable(exc) from None
    ctx.opened = True


def _outcome(ctx: RequestAudit, fields: dict[str, Any], status: int, kind: str) -> Entry:
    entry = _base(kind, ctx.deferred)
    entry.model = ctx.model or fields.get("model")
    entry.model_sha256 = ctx.model_sha256
    entry.status = status
    entry.error_type = fields.get("error_type")
    entry.latency_us = int((time.perf_counter() - ctx.started) * 1_000_000)
    entry.prompt_tokens = fields.get("prompt_tokens")
    entry.completion_tokens = fields.get("completion_tokens")
    entry.finish_reason = fields.get("finish_reason")
    return entry


SECRET_FIELDS = frozenset({"password", "csrf_token"})


def _redacted(value: Any) -> Any:
    """Passwords and form tokens never reach the audit log, not even encrypted."""
    if isinstance(value, dict):
        return {k: "[redacted]" if k in SECRET_FIELDS else _redacted(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_redacted(v) for v in value]
    return value


def _request_input() -> dict[str, Any] | None:
    if request.content_length is None and not request.is_json:
        return None
    try:
        if request.mimetype == "application/x-www-form-urlencoded":
            return {"input": _redacted(request.form.to_dict())}
        raw = request.get_data(cache=True)
    except Exception:  # over the body limit: the body was never read
        return None
    if not raw:
        return None
    text = raw.decode("utf-8", errors="replace")
    try:
        return {"input": _redacted(json.loads(text))}
    except ValueError:
        return {"input": text}


def _refused_input(suppressed_before: int) -> dict[str, Any]:
    length = request.content_length or 0
    digest = None
    if 0 < length <= current_app.config.get("MAX_CONTENT_LENGTH", 0):
        try:
            digest = hashlib.sha256(request.get_data(cache=True)).hexdigest()
        except Exception:  # unreadable body: its size is what there is to say
            digest = None
    refused: dict[str, Any] = {"body_bytes": length, "body_sha256": digest}
    if suppressed_before:
        refused["refusals_not_recorded_before"] = suppressed_before
    return {"refused": refused}


def init_app(app: Flask, store: AuditStore) -> None:
    app.extensions[EXTENSION] = store

    @app.before_request
    def _begin() -> None:
        g.audit = RequestAudit()

    @app.after_request
    def _close(response: Response) -> Response:
        ctx: RequestAudit | None = g.get("audit")
        if ctx is None or request.path in UNAUDITED or g.get("audit_suppressed"):
            return response
        fields: dict[str, Any] = g.log_fields
        if ctx.ticket is not None:
            try:
                confirm_inference()  # a request refused after its record was queued
            except ApiError as err:
                return error_response(err)
        if response.is_streamed and ctx.opened:
            entry = _outcome(ctx, fields, response.status_code, "outcome")

            def finish() -> None:
                entry.latency_us = int((time.perf_counter() - ctx.started) * 1_000_000)
                for key in ("prompt_tokens", "completion_tokens", "finish_reason"):
                    setattr(entry, key, fields.get(key))
                if fields.get("client_disconnected"):
                    entry.error_type = "client_disconnected"
                elif fields.get("finish_reason") == "failed":
                    entry.error_type = "generation_failed"
                entry.content = {"output": "".join(ctx.output)}
                try:
                    store.append(entry)
                except AuditUnavailable as exc:  # the answer has left: it stays incomplete
                    log.error(
                        "audit outcome lost",
                        extra={"request_id": entry.request_id, "error": str(exc)},
                    )

            response.call_on_close(finish)
            return response
        if ctx.opened or ctx.deferred is not None:
            entry = _outcome(ctx, fields, response.status_code, "outcome")
            entry.content = {"output": "".join(ctx.output)} if ctx.output else None
        else:
            entry = _outcome(ctx, fields, response.status_code, "event")
            if g.get("refused_unknown"):
                # Refused before anyone was known: what came, bounded (size and digest),
                # never the body itself, which an anonymous flood would fill the disk with.
                entry.content = _refused_input(g.get("suppressed_before", 0))
            else:
                entry.content = _request_input()
        # A deferred request record goes in the same commit as its outcome.
        entries = [entry] if ctx.deferred is None else [ctx.deferred, entry]
        try:
            _timed(lambda: store.commit(entries))
        except AuditUnavailable as exc:
            return error_response(unavailable(exc))
        return response
