"""The watch on plain answers' connections, on real loopback TCP connections, in about a
second: a client that closes is seen gone; one that stays, or keeps its connection for
its next request (keep-alive, a pipelined request already sent), is not; a connection is
watched only inside its request's block; without a socket (Flask's test client)
nothing is watched."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from appliance.api.departures import Departures
from appliance.context import RequestContext

from helpers import wait_for


@pytest.fixture
def departures() -> Iterator[Departures]:
    departures = Departures(interval=0.02)
    yield departures
    departures.stop()


@pytest.fixture
def connection() -> Iterator[tuple[socket.socket, socket.socket]]:
    """(the server's side, the client's side) of one TCP connection."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    with server, client:
        yield server, client


def test_a_client_that_closes_is_seen_gone(
    departures: Departures, connection: tuple[socket.socket, socket.socket]
) -> None:
    server, client = connection
    ctx = RequestContext()
    with departures.watching(ctx, {"gunicorn.socket": server}):
        assert not wait_for(ctx.gone.is_set, 0.2)  # still there: not gone
        client.close()
        assert wait_for(ctx.gone.is_set, 2)
    assert departures.seen == 1


def test_a_client_that_sent_its_next_request_is_not_gone(
    departures: Departures, connection: tuple[socket.socket, socket.socket]
) -> None:
    """Bytes waiting on the connection (a pipelined request) are not a hang-up."""
    server, client = connection
    client.sendall(b"GET /v1/models HTTP/1.1\r\nHost: a\r\n\r\n")
    ctx = RequestContext()
    with departures.watching(ctx, {"gunicorn.socket": server}):
        assert not wait_for(ctx.gone.is_set, 0.3)
    assert departures.seen == 0


def test_only_inside_the_block_and_only_with_a_socket(
    departures: Departures, connection: tuple[socket.socket, socket.socket]
) -> None:
    server, client = connection
    ctx = RequestContext()
    with departures.watching(ctx, {"gunicorn.socket": server}):
        pass
    client.close()  # after its request's block: no longer watched
    assert not wait_for(ctx.gone.is_set, 0.3)
    other = RequestContext()
    with departures.watching(other, {}):  # the test client: no socket, no thread
        pass
    assert not other.gone.is_set() and departures.seen == 0


def test_one_watch_ends_the_others_go_on(
    departures: Departures,
    connection: tuple[socket.socket, socket.socket],
) -> None:
    """Two requests watched at once: only the one whose client closed is gone."""
    server, _ = connection
    with socket.create_server(("127.0.0.1", 0)) as listener:
        second_client = socket.create_connection(listener.getsockname())
        second_server, _ = listener.accept()
    with second_server, second_client:
        first, second = RequestContext(), RequestContext()
        with (
            departures.watching(first, {"gunicorn.socket": server}),
            departures.watching(second, {"gunicorn.socket": second_server}),
        ):
            second_client.close()
            assert wait_for(second.gone.is_set, 2)
            assert not first.gone.is_set()
