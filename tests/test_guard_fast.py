"""The gate's parts on their own, in milliseconds: the token bucket behind 429 and its
Retry-After, the per-caller bound on requests in flight, the count of suppressed
refusals, the client subnet list and the refusal each status gets."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from flask import Flask, request

from appliance.actors import Actor
from appliance.auth import guard
from appliance.auth.guard import (
    SESSION_COOKIE,
    Gate,
    InFlight,
    RateLimiter,
    Suppressed,
    _authenticate,
    _drain,
    client_address,
    count_down,
    get_gate,
    init_app,
    is_browser_route,
    parse_networks,
    refusal,
)
from appliance.auth.store import TOKEN_PREFIX, AuthStore
from appliance.config import load_settings
from appliance.context import current
from appliance.problems import Forbidden, RateLimited, Unauthenticated


def test_the_bucket_allows_per_minute_then_says_how_long_to_wait() -> None:
    limiter = RateLimiter(3)
    assert [limiter.take("a") for _ in range(3)] == [0, 0, 0]
    # 3 a minute: one token back every 20 s, so the next one is about 20 s away.
    assert 19 <= limiter.take("a") <= 20
    assert limiter.take("b") == 0  # a bucket per principal


def test_one_a_minute_allows_one() -> None:
    limiter = RateLimiter(1)
    assert limiter.take("a") == 0
    assert 59 <= limiter.take("a") <= 60


class Clock:
    """The gate's monotonic clock, moved by hand: the bucket's arithmetic is tested,
    not how fast this machine loops."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(guard, "time", clock)
    return clock


def test_retry_after_is_a_whole_second_at_least(clock: Clock) -> None:
    limiter = RateLimiter(6000)  # 100 a second: the next token is 10 ms away
    assert all(limiter.take("a") == 0 for _ in range(6000))
    assert limiter.take("a") == 1


def test_the_bucket_refills_continuously(clock: Clock) -> None:
    limiter = RateLimiter(1200)  # one token every 50 ms
    assert all(limiter.take("a") == 0 for _ in range(1200))
    clock.now += 0.045
    assert limiter.take("a") == 1  # not yet
    clock.now += 0.006
    assert limiter.take("a") == 0  # 51 ms on: one came back
    assert limiter.take("a") == 1
    # The refill stops at the bucket's size: however long a caller was idle, a burst
    # is at most per_minute (0.5 s would add 10 past it).
    limiter = RateLimiter(1200)
    assert limiter.take("b") == 0
    clock.now += 0.5
    burst = 1
    while limiter.take("b") == 0:
        burst += 1
    assert burst == 1201  # the first, then a full bucket


def test_a_limit_of_zero_means_no_limit() -> None:
    limiter = RateLimiter(0)
    assert all(limiter.take("a") == 0 for _ in range(1000))


def test_in_flight_bounds_each_caller_and_frees_a_place_on_release() -> None:
    flight = InFlight(2)
    first, second = flight.enter("a"), flight.enter("a")
    assert first is not None and second is not None
    assert flight.enter("a") is None  # a third is refused
    other = flight.enter("b")  # another caller is not affected
    assert other is not None
    first()
    third = flight.enter("a")
    assert third is not None
    assert flight.enter("a") is None


def test_releasing_twice_frees_one_place_only() -> None:
    flight = InFlight(2)
    first, second = flight.enter("a"), flight.enter("a")
    assert first is not None and second is not None
    first()
    first()  # a stream closed twice (after_request and teardown) must not free two
    assert flight.enter("a") is not None
    assert flight.enter("a") is None


def test_in_flight_of_one_means_one_at_a_time() -> None:
    flight = InFlight(1)
    release = flight.enter("a")
    assert release is not None
    assert flight.enter("a") is None
    release()
    assert flight.enter("a") is not None


def test_in_flight_of_zero_means_no_bound() -> None:
    flight = InFlight(0)
    releases = [flight.enter("a") for _ in range(100)]
    assert all(release is not None for release in releases)


def test_count_down_drops_a_key_at_zero() -> None:
    counts = {"a": 2, "b": 1}
    count_down(counts, "a")
    assert counts == {"a": 1, "b": 1}
    count_down(counts, "a")
    count_down(counts, "b")
    assert counts == {}  # only the keys in use, however many came and went
    count_down(counts, "gone")  # a key not there stays not there
    assert counts == {}


def test_suppressed_refusals_are_counted_per_client_until_taken() -> None:
    suppressed = Suppressed()
    for _ in range(3):
        suppressed.add("10.0.0.1")
    suppressed.add("10.0.0.2")
    assert suppressed.take("10.0.0.1") == 3
    assert suppressed.take("10.0.0.1") == 0  # taken: its next record carried the count
    assert suppressed.take("10.0.0.2") == 1
    assert suppressed.take("10.0.0.3") == 0


def test_suppressed_counts_are_bounded_in_clients_not_in_counts() -> None:
    suppressed = Suppressed()
    for n in range(100_000):
        suppressed.add(str(n))
    suppressed.add("one too many")  # a flood of new addresses cannot grow the map
    suppressed.add("0")  # a client already counted is still counted
    assert suppressed.take("one too many") == 0
    assert suppressed.take("0") == 2
    suppressed.add("room again")  # one left, so one more fits
    assert suppressed.take("room again") == 1


def test_allowed_clients_are_subnets() -> None:
    nets = parse_networks(" 10.0.0.0/8, ,192.168.1.7/24,::1 ")
    assert nets == [
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("192.168.1.0/24"),  # host bits allowed: the subnet it names
        ipaddress.ip_network("::1/128"),
    ]
    assert parse_networks("") == []
    with pytest.raises(ValueError, match=r"allowed_clients: 'ten' is not a subnet \(CIDR\)"):
        parse_networks("10.0.0.0/8, ten")


def test_client_address_sees_ipv4_through_a_dual_stack_socket() -> None:
    assert client_address("::ffff:10.1.2.3") == ipaddress.ip_address("10.1.2.3")
    assert client_address("10.1.2.3") == ipaddress.ip_address("10.1.2.3")
    assert client_address("::1") == ipaddress.ip_address("::1")
    assert client_address("not an address") is None
    assert client_address(None) is None


def test_browser_routes_are_the_web_pages() -> None:
    assert is_browser_route("web.home")
    assert not is_browser_route("openai.chat_completions")
    assert not is_browser_route("health.webhook")
    assert not is_browser_route(None)
    assert not is_browser_route("")


def test_each_refusal_has_its_status_class_and_a_client_code() -> None:
    with Flask(__name__).test_request_context("/v1/models"):
        unknown = refusal(401, "who?", "token_revoked", WWW_Authenticate="Bearer")
        # The client is not told why (unknown, revoked, expired); the audit trail is.
        assert isinstance(unknown, Unauthenticated)
        assert (unknown.code, unknown.message) == ("invalid_api_key", "who?")
        assert unknown.headers == {"WWW-Authenticate": "Bearer"}
        assert current().error_type == "token_revoked"
        forbidden = refusal(403, "no", "forbidden")
        assert isinstance(forbidden, Forbidden) and forbidden.code == "forbidden"
        assert current().error_type == "token_revoked"  # the first reason wins
    with Flask(__name__).test_request_context("/v1/models"):
        limited = refusal(429, "slow down", "rate_limited", Retry_After="7")
        assert isinstance(limited, RateLimited)
        assert (limited.code, limited.headers) == ("rate_limited", {"Retry-After": "7"})
    with Flask(__name__).test_request_context("/v1/models"):
        # Two reasons a client may act on are its code as they are.
        assert refusal(403, "csrf", "csrf_failed").code == "csrf_failed"
        assert refusal(429, "many", "too_many_in_flight").code == "too_many_in_flight"


def gate(store: Any = None, audit_dir: Path = Path("/"), reserve: int = 0) -> Gate:
    return Gate(
        store=cast(AuthStore, store),
        limiter=RateLimiter(0),
        networks=[],
        secure_cookies=False,
        in_flight=InFlight(0),
        refusals=RateLimiter(0),
        suppressed=Suppressed(),
        audit_dir=audit_dir,
        reserve_bytes=reserve,
    )


def test_below_reserve_measures_the_audit_disk(tmp_path: Path) -> None:
    assert not gate(audit_dir=tmp_path, reserve=0).below_reserve()
    assert gate(audit_dir=tmp_path, reserve=1 << 62).below_reserve()
    # No directory to measure: not "below reserve"; the audit store says what is wrong.
    assert not gate(audit_dir=tmp_path / "absent", reserve=1 << 62).below_reserve()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[AuthStore]:
    store = AuthStore(load_settings(env={}, overrides={"state_dir": tmp_path / "state"}))
    yield store
    store.close()


def authenticate(store: AuthStore, **headers: str) -> tuple[Any, str, str | None, Actor]:
    with Flask(__name__).test_request_context("/v1/models", headers=headers):
        principal, why, cookie = _authenticate(gate(store))
        return principal, why, cookie, current().actor


def test_a_bearer_token_is_checked_and_its_principal_known(store: AuthStore) -> None:
    token = store.create_token("ward-3", "clinician")["token"]
    principal, why, cookie, _ = authenticate(store, Authorization=f"Bearer {token}")
    assert (principal.name, principal.role, why, cookie) == ("ward-3", "clinician", "", None)
    principal, why, _, _ = authenticate(store, Authorization=f"bearer   {token}  ")
    assert principal is not None and principal.name == "ward-3"  # scheme in any case


@pytest.mark.parametrize("header", ["Bearer", "Bearer    ", "Basic dXNlcjpwYXNz", "Token abc"])
def test_a_malformed_authorization_header_is_refused_as_such(store: AuthStore, header: str) -> None:
    assert authenticate(store, Authorization=header)[:3] == (None, "malformed_authorization", None)


def test_an_unknown_token_is_named_in_the_audit_by_its_public_part(store: AuthStore) -> None:
    principal, why, _, actor = authenticate(
        store, Authorization=f"Bearer {TOKEN_PREFIX}_abc123_secret"
    )
    assert (principal, why) == (None, "unknown_token")
    assert actor == Actor("token:abc123", "unauthenticated", None)
    principal, why, _, actor = authenticate(store, Authorization="Bearer no-underscores")
    assert (principal, why) == (None, "malformed_token")
    assert actor == Actor("token:?", "unauthenticated", None)
    # A token is one word: a space inside makes it a token that does not exist.
    assert authenticate(store, Authorization=f"Bearer {TOKEN_PREFIX}_abc_se cret")[1] != (
        "malformed_authorization"
    )


def test_without_a_header_the_session_cookie_is_checked(store: AuthStore) -> None:
    principal, why, cookie, _ = authenticate(store, Cookie=f"{SESSION_COOKIE}=nope")
    assert (principal, why, cookie) == (None, "unknown_session", "nope")
    assert authenticate(store)[:3] == (None, "no_credentials", None)


def test_the_gate_takes_its_bounds_from_the_settings(tmp_path: Path) -> None:
    settings = load_settings(
        env={},
        overrides={
            "state_dir": tmp_path / "state",
            "rate_limit_per_minute": 7,
            "refusals_per_minute": 9,
            "max_requests_per_caller": 3,
            "allowed_clients": "10.0.0.0/8",
            "audit_reserve_mb": 5,
        },
    )
    store = AuthStore(settings)
    try:
        app = Flask(__name__)
        init_app(app, settings, store, secure_cookies=True)
        made = get_gate(app)
        assert made.store is store and made.secure_cookies
        assert (made.limiter.per_minute, made.refusals.per_minute) == (7, 9)
        assert made.in_flight.limit == 3
        assert made.networks == [ipaddress.ip_network("10.0.0.0/8")]
        assert made.audit_dir == settings.audit_db_path.parent
        assert made.reserve_bytes == 5 * 1024 * 1024  # audit_reserve_mb, in MiB
    finally:
        store.close()


def drained(body: bytes, limit: int | None) -> bool:
    """Whether a refused request's body was read off the connection."""
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = limit
    with app.test_request_context("/v1/chat/completions", method="POST", data=body):
        _drain()
        left: bytes = request.environ["wsgi.input"].read()  # what is still unread
        return left == b""


def test_a_refused_body_is_drained_within_the_body_limit() -> None:
    body = b"x" * 200_000  # more than one read
    assert drained(body, len(body))  # up to the limit, inclusive
    assert not drained(body, len(body) - 1)  # past it: not read at all
    assert not drained(b"x", None)  # no limit set: nothing is read
    assert drained(b"", 10)  # nothing to read
