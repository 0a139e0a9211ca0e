"""What went wrong, in the domain's words. The layers below HTTP (the pipeline, the
model pool, the audit trail, the gate) raise these; the API maps each category to a
status code and the protocol's error shape in one place (api/errors.py)."""

from __future__ import annotations

from typing import ClassVar


class Problem(Exception):
    """A request that cannot be served as asked. ``param``: the request field at fault;
    ``code``: a stable, machine-readable reason; ``retry_after``: seconds after which
    the same request may succeed."""

    category: ClassVar[str] = "invalid"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.retry_after = retry_after
        self.headers = dict(headers or {})


class Invalid(Problem):
    category = "invalid"


class Unauthenticated(Problem):
    category = "unauthenticated"


class Forbidden(Problem):
    category = "forbidden"


class NotFound(Problem):
    category = "not_found"


class TooLarge(Problem):
    category = "too_large"


class RateLimited(Problem):
    category = "rate_limited"


class Unavailable(Problem):
    """Not now: the model is loading or refused, the queue is full, memory is short, or
    the audit log cannot be written."""

    category = "unavailable"


class Failed(Problem):
    """The appliance's own fault, not the request's."""

    category = "failed"


class ClientGone(Problem):
    """The client closed its connection (or its sending side) before its answer was
    whole: the model stopped (recorded as 499, as proxies do)."""

    category = "client_gone"
