"""Clients that leave before their answer is whole. A plain (non-streamed) answer is
written only once it is complete, so a client that gives up (its own timeout, a line
system restarting) is not noticed by a failed write, as a stream's is: its model would
go on for nobody, holding a slot, and a route would go on to its next model.

One thread looks at the connections of the requests whose answers are being made, a few
times a second (``poll`` with ``POLLRDHUP``: the peer closed or shut down its side).
When one has hung up, the request's ``ctx.gone`` is set; what runs for it (the model's
job, a route's attempts) stops at its next token, and the request ends as 499
``client_disconnected`` in its audit record, its log line and ``/metrics``.

A client that shuts down its sending side after its request while still reading
(``shutdown(SHUT_WR)``, rare for HTTP clients) is taken as gone too. Under Flask's
test client there is no socket, and nothing is watched.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import select
import threading
from collections.abc import Iterator
from typing import Any

from flask import Flask

from appliance.context import RequestContext

log = logging.getLogger(__name__)
EXTENSION = "appliance.departures"
POLL_SECONDS = 0.25
HUNG_UP = select.POLLRDHUP | select.POLLHUP | select.POLLERR | select.POLLNVAL


class Departures:
    """Watches the connections of requests in ``watching`` blocks."""

    def __init__(self, interval: float = POLL_SECONDS) -> None:
        self.interval = interval
        self.seen = 0  # clients found gone
        self._watched: dict[int, tuple[int, threading.Event]] = {}  # ticket: (fd, gone)
        self._tickets = itertools.count()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False

    @contextlib.contextmanager
    def watching(self, ctx: RequestContext, environ: dict[str, Any]) -> Iterator[None]:
        """While the block runs, ``ctx.gone`` is set if the client hangs up."""
        sock = environ.get("gunicorn.socket")  # under the real server only
        if sock is None:
            yield
            return
        ticket = next(self._tickets)
        with self._cond:
            self._watched[ticket] = (sock.fileno(), ctx.gone)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="departures", daemon=True)
                self._thread.start()
            self._cond.notify()
        try:
            yield
        finally:
            with self._cond:
                self._watched.pop(ticket, None)

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(self.interval * 4)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._watched and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                watched = list(self._watched.values())
            try:
                self._look(watched)
            except (OSError, ValueError) as exc:  # never let one look end the watch
                log.error("departures: a look at the connections failed", extra={"error": str(exc)})
            with self._cond:
                self._cond.wait(self.interval)

    def _look(self, watched: list[tuple[int, threading.Event]]) -> None:
        """One look at each connection. A watch may have ended since the list was
        taken (its socket closed, even reused): setting that request's event is then
        harmless, it has no one left to stop."""
        poller = select.poll()
        gone_by_fd: dict[int, threading.Event] = {}
        for fd, gone in watched:
            if not gone.is_set():
                gone_by_fd[fd] = gone
                poller.register(fd, HUNG_UP)
        if not gone_by_fd:
            return
        for fd, events in poller.poll(0):
            if events & HUNG_UP and fd in gone_by_fd:
                self.seen += 1  # counted first: whoever waits on the event sees it
                gone_by_fd[fd].set()


def init_app(app: Flask) -> Departures:
    departures = Departures()
    app.extensions[EXTENSION] = departures
    return departures


def get(app: Flask) -> Departures:
    departures: Departures = app.extensions[EXTENSION]
    return departures
