"""Structured logs: one JSON object per line on stderr (journald keeps them as they
are), and one line per request with its id, route, model, status, latency and token
counts. Prompts and answers are never logged."""

from __future__ import annotations

import json
import logging
import sys
import time
import uuid
from typing import Any

from flask import Flask, Response, g, request

_RESERVED = set(vars(logging.makeLogRecord({})))
ACCESS = logging.getLogger("appliance.request")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        data.update({k: v for k, v in vars(record).items() if k not in _RESERVED})
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return json.dumps(data, default=str)


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def init_app(app: Flask) -> None:
    @app.before_request
    def _start() -> None:
        g.request_id = uuid.uuid4().hex
        g.started = time.perf_counter()
        g.log_fields = {}

    @app.after_request
    def _finish(response: Response) -> Response:
        response.headers["X-Request-Id"] = g.request_id
        fields: dict[str, Any] = g.log_fields
        fields.update(
            request_id=g.request_id,
            method=request.method,
            route=request.url_rule.rule if request.url_rule else request.path,
            status=response.status_code,
        )
        started = g.started

        def emit() -> None:
            fields["latency_ms"] = round((time.perf_counter() - started) * 1000, 1)
            ACCESS.info("request", extra=fields)

        if response.is_streamed:
            response.call_on_close(emit)  # when the stream ends or the client leaves
        else:
            emit()
        return response
