"""The audit trail of HTTP requests, as middleware.

An inference's audit pair is opened by the pipeline (inference/audit_pair.py); here
its outcome record is written when the answer is complete: before a plain answer
leaves, or when a stream ends. Every other request (refusals included) leaves one
*event* record before its response leaves. If a record cannot be written, the client
gets 503 and no answer.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from typing import Any

from flask import Flask, Response, current_app, request

from appliance import context
from appliance.api.errors import error_response
from appliance.audit.store import AuditStore, AuditUnavailable
from appliance.inference import audit_pair
from appliance.inference.audit_pair import AuditDown

log = logging.getLogger(__name__)
EXTENSION = "appliance.audit"
# Probes carry no data and arrive every few seconds; auditing them would drown the log.
UNAUDITED = frozenset(
    {"/healthz", "/livez", "/readyz", "/v2/health/live", "/v2/health/ready", "/metrics"}
)


def get_store(app: Flask) -> AuditStore:
    store: AuditStore = app.extensions[EXTENSION]
    return store


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
    except (ValueError, RecursionError):  # kept as the text it came as
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


def _instead(response: Response, err: AuditDown) -> Response:
    """The 503 in place of an answer that cannot be recorded; the answer's response is
    closed, so that what waits on its end (the model's lease) lets go."""
    response.close()
    return error_response(err)


def _when_the_stream_ends(store: AuditStore, response: Response) -> Response:
    """A stream that began before its model loaded: whether its request record was
    opened (an outcome is owed) or a problem ended it first (an event record with the
    problem's status) is known only later. The stream calls ``ctx.audit.finish`` before
    it sends a problem's error event; otherwise it runs when the stream ends."""
    ctx = context.current()
    content = _request_input()  # read now: the request is gone when the stream ends
    done = False

    def finish() -> bool:
        """Write the record; whether it was written."""
        nonlocal done
        if done:
            return True
        done = True
        status = ctx.deferred_status or response.status_code
        if ctx.audit.ticket is not None:  # queued by the pipeline, then a problem came
            with contextlib.suppress(AuditDown):
                audit_pair.confirm(store, ctx)
        if ctx.audit.opened:
            record = audit_pair.outcome(ctx, status)
            record.content = audit_pair.outcome_content(ctx) or {"output": ""}
        else:
            record = audit_pair.outcome(ctx, status, "event")
            record.content = content
        try:
            store.append(record)
        except AuditUnavailable as exc:
            log.error("audit record lost", extra={"request_id": ctx.request_id, "error": str(exc)})
            return False
        return True

    ctx.audit.finish = finish
    response.call_on_close(finish)
    return response


def init_app(app: Flask, store: AuditStore) -> None:
    app.extensions[EXTENSION] = store

    @app.after_request
    def _close(response: Response) -> Response:
        ctx = context.current()
        if ctx.route in UNAUDITED or request.path in UNAUDITED or ctx.audit_suppressed:
            return response
        pair = ctx.audit
        if pair.ticket is not None and not ctx.deferred_stream:
            try:
                audit_pair.confirm(store, ctx)  # a request refused after its record was queued
            except AuditDown as err:
                return _instead(response, err)
        if response.is_streamed and ctx.deferred_stream:
            return _when_the_stream_ends(store, response)
        if response.is_streamed and pair.opened:

            def finish() -> None:
                record = audit_pair.outcome(ctx, response.status_code)
                record.content = audit_pair.outcome_content(ctx) or {"output": ""}
                try:
                    store.append(record)
                except AuditUnavailable as exc:  # the answer has left: it stays incomplete
                    log.error(
                        "audit outcome lost",
                        extra={"request_id": record.request_id, "error": str(exc)},
                    )

            response.call_on_close(finish)
            return response
        if pair.opened or pair.deferred is not None:
            record = audit_pair.outcome(ctx, response.status_code)
            record.content = audit_pair.outcome_content(ctx)
        else:
            record = audit_pair.outcome(ctx, response.status_code, "event")
            if ctx.refused_unknown:
                # Refused before anyone was known: what came, bounded (size and digest),
                # never the body itself, which an anonymous flood would fill the disk with.
                record.content = _refused_input(ctx.suppressed_before)
            else:
                record.content = _request_input()
        # A deferred request record goes in the same commit as its outcome.
        records = [record] if pair.deferred is None else [pair.deferred, record]
        try:
            audit_pair.timed(ctx, lambda: store.commit(records))
        except AuditUnavailable as exc:
            return _instead(response, AuditDown(exc))
        return response
