"""The gate every request passes: client subnet, authentication (bearer token or web
session), the route table, CSRF for cookie-authenticated writes, the rate limit.

401 when the caller is unknown, 403 when known but not allowed, 429 past the rate;
in the protocol's own shape (OpenAI JSON on /v1, /admin and /audit, {"error": ...}
on /v2), a redirect to the sign-in page for a browser. The audit trail records each
refusal with the precise reason, which the client is not told.
"""

from __future__ import annotations

import hmac
import ipaddress
import math
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flask import Flask, Response, current_app, redirect, request
from werkzeug.wrappers import Response as BaseResponse

from appliance import context
from appliance.actors import Actor
from appliance.auth.policy import MODEL_WORK, PUBLIC, ROUTE_ROLES, allowed
from appliance.auth.store import AuthStore, Principal, csrf_token
from appliance.config import Settings
from appliance.problems import Forbidden, Problem, RateLimited, Unauthenticated

EXTENSION = "appliance.auth"
SESSION_COOKIE = "appliance_session"
CSRF_HEADER = "X-CSRF-Token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class RateLimiter:
    """A token bucket per principal: `per_minute` requests, refilled continuously."""

    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def take(self, key: str) -> int:
        """0 if allowed, else the seconds to wait."""
        if self.per_minute <= 0:
            return 0
        rate = self.per_minute / 60.0
        with self._lock:
            stamp = time.monotonic()
            tokens, last = self._buckets.get(key, (float(self.per_minute), stamp))
            tokens = min(float(self.per_minute), tokens + (stamp - last) * rate)
            if tokens >= 1.0:
                self._buckets[key] = (tokens - 1.0, stamp)
                return 0
            self._buckets[key] = (tokens, stamp)
            return max(1, math.ceil((1.0 - tokens) / rate))


def count_down(counts: dict[str, int], key: str) -> None:
    """One fewer of ``key``; a count that reaches 0 leaves the map (which then holds only
    the keys in use, however many came and went)."""
    left = counts.get(key, 1) - 1
    if left > 0:
        counts[key] = left
    else:
        counts.pop(key, None)


class InFlight:
    """Requests each principal has in flight on the models; one caller may not take
    every slot and the whole queue from the others."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._counts: dict[str, int] = {}
        self._lock = threading.Lock()

    def enter(self, key: str) -> Callable[[], None] | None:
        """A release to call once when the request ends, or None when over the limit."""
        if self.limit <= 0:
            return lambda: None
        with self._lock:
            if self._counts.get(key, 0) >= self.limit:
                return None
            self._counts[key] = self._counts.get(key, 0) + 1
        released = threading.Event()

        def release() -> None:
            if released.is_set():
                return
            released.set()
            with self._lock:
                count_down(self._counts, key)

        return release


class Suppressed:
    """Unauthenticated refusals past refusals_per_minute, counted per client address
    until its next recorded refusal carries the count: a flood without a token cannot
    fill the disk with records (each one fsync'd) and so shut out everyone."""

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}
        self._lock = threading.Lock()

    def add(self, client: str) -> None:
        with self._lock:
            if len(self._counts) < 100_000 or client in self._counts:
                self._counts[client] = self._counts.get(client, 0) + 1

    def take(self, client: str) -> int:
        with self._lock:
            return self._counts.pop(client, 0)


@dataclass
class Gate:
    store: AuthStore
    limiter: RateLimiter
    networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network]
    secure_cookies: bool
    in_flight: InFlight
    refusals: RateLimiter
    suppressed: Suppressed
    audit_dir: Path
    reserve_bytes: int

    def below_reserve(self) -> bool:
        try:
            return shutil.disk_usage(self.audit_dir).free < self.reserve_bytes
        except OSError:
            return False  # no audit directory to measure: the store says what is wrong


def get_gate(app: Flask) -> Gate:
    gate: Gate = app.extensions[EXTENSION]
    return gate


def parse_networks(text: str) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    nets = []
    for part in (p.strip() for p in text.split(",")):
        if part:
            try:
                nets.append(ipaddress.ip_network(part, strict=False))
            except ValueError:
                raise ValueError(f"allowed_clients: {part!r} is not a subnet (CIDR)") from None
    return nets


def is_browser_route(endpoint: str | None) -> bool:
    return bool(endpoint) and str(endpoint).startswith("web.")


CLIENT_CODES = {401: "invalid_api_key", 403: "forbidden", 429: "rate_limited"}


REFUSALS: dict[int, type[Problem]] = {401: Unauthenticated, 403: Forbidden, 429: RateLimited}


def refusal(status: int, message: str, reason: str, **headers: str) -> Problem:
    """A refusal, to raise; the precise reason goes to the log and the audit only (a
    client is not told whether a token was unknown, revoked or expired)."""
    context.current().note_error(reason)
    code = reason if reason in ("csrf_failed", "too_many_in_flight") else CLIENT_CODES.get(status)
    named = {key.replace("_", "-"): value for key, value in headers.items()}
    return REFUSALS[status](message, code=code, headers=named)


def _authenticate(gate: Gate) -> tuple[Principal | None, str, str | None]:
    """(principal, why not, session cookie if that is how it came)."""
    header = request.headers.get("Authorization", "")
    if header:
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            return None, "malformed_authorization", None
        token = value.strip()
        principal, why = gate.store.check_token(token)
        if principal is None:
            public_id = token.split("_")[1] if token.count("_") >= 2 else "?"
            context.current().actor = Actor(f"token:{public_id}", "unauthenticated", None)
        return principal, why, None
    cookie = request.cookies.get(SESSION_COOKIE)
    if cookie:
        principal, why = gate.store.check_session(cookie)
        return principal, why, cookie
    return None, "no_credentials", None


def client_address(remote: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The client's address; an IPv4 client seen through a dual-stack socket (bound to
    ::) as ::ffff:a.b.c.d is its IPv4 address, so IPv4 subnets match it."""
    try:
        address = ipaddress.ip_address(remote or "")
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _drain() -> None:
    """Read (and drop) a refused request's body, within the body limit, so that the
    client reads the refusal on a connection that stays usable, not a reset."""
    limit = current_app.config.get("MAX_CONTENT_LENGTH") or 0
    if request.content_length and request.content_length <= limit:
        while request.stream.read(1 << 16):
            pass


def _releasing(body: Iterable[Any], release: Callable[[], None]) -> Iterator[Any]:
    try:
        yield from body
    finally:  # the last chunk sent, or the server closed the stream (a hang-up)
        release()


def init_app(app: Flask, settings: Settings, store: AuthStore, secure_cookies: bool) -> None:
    gate = Gate(
        store,
        RateLimiter(settings.rate_limit_per_minute),
        parse_networks(settings.allowed_clients),
        secure_cookies,
        InFlight(settings.max_requests_per_caller),
        RateLimiter(settings.refusals_per_minute),
        Suppressed(),
        settings.audit_db_path.parent,
        settings.audit_reserve_mb << 20,
    )
    app.extensions[EXTENSION] = gate

    @app.before_request
    def _guard() -> BaseResponse | None:
        ctx = context.current()
        if gate.networks:
            client = client_address(request.remote_addr)
            if client is None or not any(client in net for net in gate.networks):
                raise refusal(
                    403,
                    f"client address {request.remote_addr} is not allowed (allowed_clients)",
                    "client_not_allowed",
                )
        endpoint = request.endpoint
        roles = ROUTE_ROLES.get(endpoint or "")
        principal, why, cookie = _authenticate(gate)
        if principal is not None:
            ctx.actor = Actor(principal.id, principal.name, principal.role)
            ctx.principal = principal
            ctx.session_cookie = cookie
        if roles is PUBLIC:
            return None
        if principal is None:
            address = request.remote_addr or ""
            wait = gate.refusals.take(address)
            if not wait and gate.below_reserve():
                # The disk left is for known callers' records: refused as ever, counted.
                gate.suppressed.add(address)
                ctx.audit_suppressed = True
                _drain()
            elif wait:
                gate.suppressed.add(address)
                ctx.audit_suppressed = True  # counted, not recorded (see Suppressed)
                _drain()
                raise refusal(
                    429,
                    f"too many refused requests from {address}; retry in {wait} s",
                    "refusals_rate_limited",
                    Retry_After=str(wait),
                )
            else:
                ctx.suppressed_before = gate.suppressed.take(address)
                ctx.refused_unknown = True  # its record keeps the body's size and digest only
            if is_browser_route(endpoint):
                ctx.note_error(why)
                expired = "?expired=1" if why == "session_idle_timeout" else ""
                return redirect(f"/login{expired}", code=303)
            raise refusal(
                401,
                "authentication required: send a valid token as "
                "'Authorization: Bearer <token>' or sign in",
                why,
                WWW_Authenticate='Bearer realm="appliance"',
            )
        if endpoint is None:
            return None  # no such route: routing answers 404 to a known caller
        if not allowed(endpoint, principal.role):
            if is_browser_route(endpoint) and request.method in SAFE_METHODS:
                from appliance.web import forbidden_page

                ctx.note_error("forbidden")
                return forbidden_page(request.path)
            raise refusal(
                403,
                f"role {principal.role!r} may not use {request.method} {request.path}",
                "forbidden",
            )
        if cookie is not None and request.method not in SAFE_METHODS:
            sent = request.headers.get(CSRF_HEADER) or request.form.get("csrf_token", "")
            if not hmac.compare_digest(sent, csrf_token(cookie)):
                raise refusal(
                    403,
                    "CSRF token missing or wrong: send the page's token in "
                    f"{CSRF_HEADER} or the form's csrf_token",
                    "csrf_failed",
                )
        wait = gate.limiter.take(principal.id)
        if wait:
            raise refusal(
                429,
                f"rate limit of {gate.limiter.per_minute} requests "
                f"per minute reached for {principal.name}; retry in {wait} s",
                "rate_limited",
                Retry_After=str(wait),
            )
        if endpoint in MODEL_WORK:
            release = gate.in_flight.enter(principal.id)
            if release is None:
                raise refusal(
                    429,
                    f"{principal.name} has {gate.in_flight.limit} requests in flight, the most "
                    "one caller may have (max_requests_per_caller); retry when one ends",
                    "too_many_in_flight",
                    Retry_After="1",
                )
            ctx.release_in_flight = release
        return None

    @app.after_request
    def _release_when_done(response: Response) -> Response:
        ctx = context.current()
        release, ctx.release_in_flight = ctx.release_in_flight, None
        if release is None:
            pass
        elif response.is_streamed:  # holds its place until its last byte, or a hang-up
            response.response = _releasing(response.response, release)
        else:  # the model's work is done: the answer is in hand
            release()
        return response

    @app.teardown_request
    def _release_on_error(exc: BaseException | None) -> None:
        ctx = context.existing()
        if ctx is not None and ctx.release_in_flight is not None:  # after_request did not run
            release, ctx.release_in_flight = ctx.release_in_flight, None
            release()
