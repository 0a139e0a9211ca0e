"""Problems as HTTP: the one place a domain problem (appliance/problems.py) becomes a
status code and an error body, in the OpenAI shape {"error": {"message", "type",
"param", "code"}} or, on /v2, the Open Inference Protocol's {"error": "..."}."""

from __future__ import annotations

import json
from typing import Any, TypeVar

from flask import Flask, Response, current_app, has_request_context, request
from pydantic import BaseModel, ValidationError
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from appliance import context
from appliance.problems import Problem

M = TypeVar("M", bound=BaseModel)

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}


STATUS = {
    "invalid": 400,
    "unauthenticated": 401,
    "forbidden": 403,
    "not_found": 404,
    "too_large": 413,
    "rate_limited": 429,
    "client_gone": 499,  # nginx's "client closed request": for the records (see departures)
    "failed": 500,
    "unavailable": 503,
}


class ApiError(Problem):
    """A problem of the HTTP exchange itself (a body that is not JSON, a parameter the
    protocol does not offer), with its status code."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message, param=param, code=code, headers=headers)
        self.status = status


def status_of(problem: Problem) -> int:
    if isinstance(problem, ApiError):
        return problem.status
    return STATUS[problem.category]


def error_body(
    status: int, message: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {
        "error": {
            "message": message,
            "type": _TYPES.get(
                status, "server_error" if status >= 500 else "invalid_request_error"
            ),
            "param": param,
            "code": code,
        }
    }


def problem_body(problem: Problem) -> dict[str, Any]:
    return error_body(status_of(problem), problem.message, problem.param, problem.code)


def error_response(err: Problem) -> Response:
    """The error in the shape of the protocol asked: {"error": "..."} on /v2 (Open
    Inference Protocol), OpenAI's everywhere else."""
    status = status_of(err)
    body: dict[str, Any] = problem_body(err)
    if has_request_context():
        context.current().note_error(err.code or _TYPES.get(status, "error"))
        if request.path == "/v2" or request.path.startswith("/v2/"):
            body = {"error": err.message}
    resp = Response(json.dumps(body), status=status, mimetype="application/json")
    if err.retry_after is not None:
        resp.headers["Retry-After"] = str(err.retry_after)
    for key, value in err.headers.items():
        resp.headers[key] = value
    return resp


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def read_json_object() -> dict[str, Any]:
    """The request body as a JSON object, or an ApiError saying exactly what is wrong."""
    raw = request.get_data(cache=True)  # raises 413 past MAX_CONTENT_LENGTH
    if not raw:
        raise ApiError(400, "request body is empty; expected a JSON object", code="invalid_json")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApiError(
            400,
            f"request body is not UTF-8 text (bad byte at offset {exc.start})",
            code="invalid_json",
        ) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ApiError(
            400,
            f"request body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}",
            code="invalid_json",
        ) from None
    except RecursionError:
        raise ApiError(
            400,
            "request body nests JSON arrays or objects too deeply",
            code="invalid_json",
        ) from None
    if not isinstance(data, dict):
        raise ApiError(
            400,
            f"request body must be a JSON object, got {type(data).__name__}",
            code="invalid_json",
        )
    where = _lone_surrogate(data, "")
    if where is not None:
        raise ApiError(
            400,
            f"{where or 'a key'} holds a lone UTF-16 surrogate escape (such as \\ud800), "
            "which is not a character; send valid Unicode text",
            param=where or None,
            code="invalid_json",
        )
    return data


def _lone_surrogate(value: Any, path: str) -> str | None:
    """Where in the parsed body a string holds a lone surrogate (JSON allows the escape,
    UTF-8 cannot carry it), as a parameter path (messages[0].content); None if nowhere."""
    if isinstance(value, str):
        return path if not value.isascii() and _has_surrogate(value) else None
    if isinstance(value, dict):
        for key, item in value.items():
            if _has_surrogate(key):
                return ""
            found = _lone_surrogate(item, f"{path}.{key}" if path else key)
            if found is not None:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found = _lone_surrogate(item, f"{path}[{i}]")
            if found is not None:
                return found
    return None


def _has_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def parse_body(model: type[M], data: dict[str, Any]) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        param = ".".join(str(part) for part in first["loc"]) or None
        if first["type"] == "extra_forbidden":
            message = f"unrecognized request argument supplied: {param}"
            code = "unknown_parameter"
        elif first["type"] == "missing":
            message = f"missing required parameter: {param}"
            code = "missing_required_parameter"
        else:
            message = f"invalid value for {param}: {first['msg']} (got {_short(first['input'])})"
            code = "invalid_value"
        raise ApiError(400, message, param=param, code=code) from None


def register(app: Flask) -> None:
    """Every error the app can raise, in the OpenAI shape, never an HTML page."""

    @app.errorhandler(Problem)
    def _problem(err: Problem) -> Response:
        return error_response(err)

    @app.errorhandler(RequestEntityTooLarge)
    def _too_large(_: RequestEntityTooLarge) -> Response:
        limit = current_app.config["MAX_CONTENT_LENGTH"]
        length = request.content_length
        got = f"{length} bytes" if length is not None else "more than that"
        return error_response(
            ApiError(
                413,
                f"request body is {got}; the limit is {limit} bytes (max_body_bytes)",
                code="request_too_large",
            )
        )

    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException) -> Response:
        status = exc.code or 500
        message = exc.description or exc.name
        if status == 404:
            message = f"no route {request.method} {request.path}"
        elif status == 405:
            message = f"method {request.method} is not allowed on {request.path}"
        return error_response(ApiError(status, message))

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        current_app.logger.exception("unhandled error")
        return error_response(
            ApiError(500, "internal error; see the server log", code="internal_error")
        )
