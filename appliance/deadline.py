"""A request body must arrive within ``client_timeout`` of its request's start: a
client that trickles it (a byte now and then, each inside the socket's own timeout)
would otherwise hold a server thread for as long as it likes.

WSGI middleware notes when each request with a body began and when its body was read
to the end; the server's main loop (``expire``, every second) shuts down the socket of
a request whose body is overdue, so the thread blocked reading it is freed at once.
(The check cannot sit in the reads themselves: the server's body reader waits for a
whole chunk before it returns.)
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from flask import Flask

EXTENSION = "appliance.body_deadlines"
WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class _CountedInput:
    """The request body; says when it has been read to its end."""

    def __init__(self, stream: Any, length: int | None, done: Callable[[], None]) -> None:
        self._stream = stream
        self._left = length
        self._done = done

    def _took(self, data: bytes, asked: int | None) -> bytes:
        if self._left is not None:
            self._left -= len(data)
        ended = not data and asked != 0
        if ended or (self._left is not None and self._left <= 0):
            self._done()
        return data

    def read(self, size: int | None = -1) -> bytes:
        return self._took(self._stream.read(size), size)

    def readline(self, size: int | None = -1) -> bytes:
        return self._took(self._stream.readline(size), size)

    def __iter__(self) -> Any:
        return iter(self.readline, b"")


class BodyDeadlines:
    def __init__(self, app: WsgiApp, seconds: int) -> None:
        self.app = app
        self.seconds = seconds
        self._due: dict[object, tuple[float, socket.socket]] = {}
        self._lock = threading.Lock()

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        sock = environ.get("gunicorn.socket")  # under the real server only
        length = int(environ.get("CONTENT_LENGTH") or 0) or None
        chunked = "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower()
        if sock is None or not (length or chunked):
            return self.app(environ, start_response)
        token = object()
        with self._lock:
            self._due[token] = (time.monotonic() + self.seconds, sock)

        def done() -> None:
            with self._lock:
                self._due.pop(token, None)

        environ["wsgi.input"] = _CountedInput(environ["wsgi.input"], length, done)
        try:
            return self.app(environ, start_response)
        finally:
            done()  # read or not, the app is past the point of reading it

    def expire(self, now: float) -> None:
        with self._lock:
            late = [token for token, (due, _) in self._due.items() if due < now]
            socks = [self._due.pop(token)[1] for token in late]
        for sock in socks:  # the read blocked on it ends; the client is cut off
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


def init_app(app: Flask, seconds: int) -> BodyDeadlines:
    deadlines = BodyDeadlines(app.wsgi_app, seconds)
    app.wsgi_app = deadlines  # type: ignore[method-assign]
    app.extensions[EXTENSION] = deadlines
    return deadlines
