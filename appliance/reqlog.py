"""Structured logs: one JSON object per line on stderr (journald keeps them as they
are), and one line per request with its id, route, model, status, latency and token
counts. Prompts and answers are never logged."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from flask import Flask, Response

from appliance import context
from appliance.clock import utc_second

_RESERVED = frozenset(vars(logging.makeLogRecord({})))
ACCESS = logging.getLogger("appliance.request")
_DUMPS = json.JSONEncoder(default=str).encode  # what json.dumps(data, default=str) does


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "ts": f"{utc_second(int(record.created))}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RESERVED:
                data[key] = value
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return _DUMPS(data)


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def init_app(app: Flask) -> None:
    @app.before_request
    def _start() -> None:
        context.begin()

    @app.after_request
    def _finish(response: Response) -> Response:
        ctx = context.current()
        response.headers["X-Request-Id"] = ctx.request_id
        http = {
            "request_id": ctx.request_id,
            "method": ctx.method,
            "route": ctx.route,
            "status": response.status_code,
        }

        def emit() -> None:
            if not ACCESS.isEnabledFor(logging.INFO):
                return
            if ctx.deferred_status is not None:  # a stream that ended with a problem
                http["status"] = ctx.deferred_status
            fields = {
                **ctx.log_fields(),
                **http,
                "latency_ms": round((time.perf_counter() - ctx.started) * 1000, 1),
            }
            # ACCESS.info() without the walk up the stack for the caller's file and
            # line, which the JSON line does not show: the same line, for less.
            ACCESS.handle(
                ACCESS.makeRecord(
                    ACCESS.name, logging.INFO, __file__, 0, "request", (), None, extra=fields
                )
            )

        if response.is_streamed:
            response.call_on_close(emit)  # when the stream ends or the client leaves
        else:
            emit()
        return response
