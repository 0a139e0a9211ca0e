"""Answers while the models load: the socket is bound before the app exists (so a client
waits in the backlog instead of being refused), and this thread answers on it until the
app takes over, so a balancer's or a probe's check sees a clear state at once:

- /livez, /healthz, /v2/health/live: 200 (the process is alive: don't restart it);
- /readyz, /v2/health/ready: 503, ``"loading": true`` (send no work here yet);
- anything else: 503 with Retry-After, in the protocol's error shape. No model ran and
  no answer was given, so nothing is audited (as for /readyz).

Bare HTTP/1.1 on purpose: one short exchange per connection, then close.
"""

from __future__ import annotations

import json
import logging
import select
import socket
import ssl
import threading
import time
from collections.abc import Sequence

log = logging.getLogger(__name__)

RETRY_AFTER = 5
READ_TIMEOUT = 2.0
MAX_HEAD = 16 * 1024
LIVE = frozenset({"/livez", "/healthz", "/v2/health/live"})
READY = frozenset({"/readyz", "/v2/health/ready"})


def answer(path: str, since: float) -> tuple[int, dict[str, object]]:
    """The status and body for a request to ``path`` while the models load."""
    loading = round(time.monotonic() - since, 1)
    if path in LIVE:
        return 200, {"live": True, "status": "alive", "loading": True}
    if path in READY:
        reason = f"loading the models ({loading} s so far)"
        if path.startswith("/v2/"):
            return 503, {"error": "not ready: " + reason}
        return 503, {"ready": False, "loading": True, "reasons": [reason]}
    message = f"the appliance is loading its models; retry in {RETRY_AFTER} s"
    if path == "/v2" or path.startswith("/v2/"):
        return 503, {"error": message}
    body: dict[str, object] = {
        "error": {"message": message, "type": "server_error", "param": None, "code": "loading"}
    }
    return 503, body


def request_path(head: bytes) -> str | None:
    """The path of an HTTP request line (no query), or None if it is not one."""
    line = head.split(b"\r\n", 1)[0].decode("latin-1")
    parts = line.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        return None
    return parts[1].split("?", 1)[0]


class LoadingResponder:
    """Answers on the listening sockets from ``start()`` until ``stop()``."""

    def __init__(self, listeners: Sequence[socket.socket], tls: ssl.SSLContext | None) -> None:
        self.listeners = list(listeners)
        self.tls = tls
        self.since = time.monotonic()
        self.answered = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="loading-answers", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop answering; connections that come after wait for the app."""
        self._stop.set()
        self._thread.join(READ_TIMEOUT + 1)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                ready, _, _ = select.select(self.listeners, [], [], 0.1)
            except (OSError, ValueError):
                return  # a listener closed: start-up failed, the process is leaving
            for listener in ready:
                if self._stop.is_set():
                    return  # what is waiting now is for the app
                try:
                    listener.setblocking(False)
                    conn, _ = listener.accept()
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    return
                finally:
                    listener.setblocking(True)
                self._serve(conn)

    def _serve(self, conn: socket.socket) -> None:
        try:
            conn.setblocking(True)
            conn.settimeout(READ_TIMEOUT)
            if self.tls is not None:
                conn = self.tls.wrap_socket(conn, server_side=True)
            head = b""
            while b"\r\n\r\n" not in head and len(head) < MAX_HEAD:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                head += chunk
            path = request_path(head)
            body: dict[str, object]
            if path is None:
                status, body = 400, {"error": {"message": "not an HTTP request", "code": None}}
            else:
                status, body = answer(path, self.since)
            payload = json.dumps(body).encode()
            reason = {200: "OK", 400: "Bad Request", 503: "Service Unavailable"}[status]
            retry = f"Retry-After: {RETRY_AFTER}\r\n" if status == 503 else ""
            conn.sendall(
                f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(payload)}\r\n{retry}Connection: close\r\n\r\n".encode()
                + payload
            )
            self.answered += 1
        except (OSError, ssl.SSLError, UnicodeDecodeError) as exc:
            log.debug("loading answer failed", extra={"error": str(exc)})
        finally:
            conn.close()
