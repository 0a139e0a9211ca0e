"""The production server: gunicorn's gthread worker run in this process, without
gunicorn's arbiter (so each model is loaded once, and the service is one process),
JSON logs on stderr, graceful stop on SIGTERM or SIGHUP.

The arbiter would only fork the worker and watch it. Here systemd watches the process
(Type=notify, WatchdogSec, Restart=), and a second Python holding its own copy of
the imports cost the service ~24 MiB (RSS) for nothing.

SIGTERM: the worker stops accepting, in-flight requests (streams included) get
``shutdown_grace`` seconds to finish (then fail), the audit log is sealed, and the
process exits 0.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import logging
import os
import select
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from flask import Flask
from gunicorn.app.base import BaseApplication
from gunicorn.glogging import Logger
from gunicorn.sock import create_sockets
from gunicorn.workers.gthread import ThreadWorker

from appliance import systemd
from appliance.config import Settings
from appliance.reqlog import JsonFormatter, setup_logging
from appliance.serving import get_pool
from appliance.tls import tls_enabled


def bind_address(host: str, port: int) -> str:
    try:
        if ipaddress.ip_address(host).version == 6:
            return f"[{host}]:{port}"
    except ValueError:
        pass
    return f"{host}:{port}"


def base_url(settings: Settings) -> str:
    scheme = "https" if tls_enabled(settings) else "http"
    return f"{scheme}://" + bind_address(settings.host, settings.port)


class JsonLogger(Logger):  # type: ignore[misc]
    """gunicorn's own messages in the same JSON lines as the appliance's."""

    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        for handler in self.error_log.handlers:
            handler.setFormatter(JsonFormatter())


def ready_message(settings: Settings, app: Flask) -> str:
    pool = get_pool(app)
    url = base_url(settings)
    names = sorted(pool.served)
    ca = f" --cacert {settings.tls_dir / 'ca.crt'}" if tls_enabled(settings) else ""
    lines = [f"appliance serving on {url}"]
    if names:
        lines += [
            f"  models: {', '.join(names)}",
            "  try:",
            f'    curl{ca} {url}/v1/chat/completions -H "Authorization: Bearer $TOKEN" \\',
            "      -H 'Content-Type: application/json' \\",
            f'      -d \'{{"model": "{names[0]}", "messages": '
            '[{"role": "user", "content": "Hello"}]}\'',
            f"  or the openai SDK with base_url={url}/v1 and api_key=$TOKEN",
            "  (a token: appliance tokens create --name NAME --role line)",
        ]
    for tensor in sorted(pool.tensors):
        lines.append(f"  tensor model {tensor}: POST {url}/v2/models/{tensor}/infer")
    for reason in pool.refused.values():
        lines.append(f"  refused: {reason}")
    if not names and not pool.tensors:
        lines.append("  no model is serving: run `appliance models fetch-default`")
    return "\n".join(lines)


def trim_heap() -> None:
    """Return the heap that start-up used and freed (hashing, model metadata, schema
    checks) to the system: glibc keeps it otherwise, resident for the service's life."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to do
        ctypes.CDLL(None).malloc_trim(0)


class LingeringWorker(ThreadWorker):  # type: ignore[misc]
    """gthread, except that a kept-alive connection whose next request arrives within
    LINGER_MS is served again by the thread that answered it. gthread hands every
    request from its main thread's poller to a pool thread and the connection back
    again, two thread wake-ups (~0.1 ms) per request; a line system that sends its
    next reading as soon as it has the answer skips both.

    A thread lingers only while another is idle, so a new connection never waits
    for one that lingers; and at most LINGER_REQUESTS times in a row, so that one
    busy connection cannot keep a thread from the others."""

    LINGER_MS = 2
    LINGER_REQUESTS = 100

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._busy = 0
        self._busy_lock = threading.Lock()
        self._loop_at = time.monotonic()

    def notify(self) -> None:
        """Each turn of the main loop (every second at most, idle or not): what the
        arbiter's timeout watched, now the watchdog's."""
        self._loop_at = time.monotonic()
        super().notify()

    def stalled(self, limit: float) -> str | None:
        quiet = time.monotonic() - self._loop_at
        return f"the HTTP loop has not turned for {quiet:.0f} s" if quiet > limit else None

    def is_parent_alive(self) -> bool:
        return True  # no arbiter to outlive: the process that started it may go

    def handle(self, conn: Any) -> Any:
        with self._busy_lock:
            self._busy += 1
        try:
            keep = super().handle(conn)
            for _ in range(self.LINGER_REQUESTS):
                if keep is not True or not self.alive or not self._next_request_soon(conn):
                    break
                keep = super().handle(conn)
            return keep
        finally:
            with self._busy_lock:
                self._busy -= 1

    def _next_request_soon(self, conn: Any) -> bool:
        if conn.is_http2:
            return False
        if conn.parser.unreader.buf.getvalue():
            return True  # read ahead already
        pending = getattr(conn.sock, "pending", None)  # TLS: bytes already decrypted
        if pending is not None and pending():
            return True
        if self._busy >= self.cfg.threads:
            return False  # no other thread idle: back to the poller
        poller = select.poll()
        poller.register(conn.sock, select.POLLIN)
        return bool(poller.poll(self.LINGER_MS))


class ApplianceServer(BaseApplication):  # type: ignore[misc]
    def __init__(self, settings: Settings, app_factory: Callable[[Settings], Flask]) -> None:
        self.settings = settings
        self.app_factory = app_factory
        self._watchdog: systemd.Watchdog | None = None
        super().__init__()

    def load_config(self) -> None:
        s = self.settings
        options: dict[str, Any] = {
            "bind": [bind_address(s.host, s.port)],
            "workers": 1,
            "worker_class": "gthread",
            "threads": s.http_threads,
            "graceful_timeout": s.shutdown_grace,
            "keepalive": 5,
            "accesslog": None,
            "errorlog": "-",
            "loglevel": s.log_level,
            "logger_class": JsonLogger,
            "proc_name": "appliance",
            "control_socket_disable": True,
            "post_worker_init": self._announce,
            **(
                {"certfile": str(s.tls_cert_path), "keyfile": str(s.tls_key_path)}
                if tls_enabled(s)
                else {}
            ),
        }
        for key, value in options.items():
            if key in self.cfg.settings:
                self.cfg.set(key, value)

    def _announce(self, worker: Any) -> None:
        from appliance.app import STALL_SECONDS, health_problem

        app = worker.wsgi
        trim_heap()
        print(ready_message(self.settings, app), flush=True)
        # Models verified and loaded, audit log open: now systemd may call it ready.
        systemd.notify(f"READY=1\nSTATUS=serving {', '.join(sorted(get_pool(app).served))}")
        interval = systemd.watchdog_interval()
        if interval:
            self._watchdog = systemd.Watchdog(
                lambda: health_problem(app) or worker.stalled(STALL_SECONDS), interval
            )
            self._watchdog.start()
        previous = signal.getsignal(signal.SIGTERM)

        def stopping(signum: int, frame: Any) -> None:
            systemd.notify("STOPPING=1")
            if callable(previous):
                previous(signum, frame)

        # SIGHUP (a closed terminal) stops gracefully too, as SIGTERM does; the signals
        # gunicorn's arbiter would have taken do nothing here.
        signal.signal(signal.SIGTERM, stopping)
        signal.signal(signal.SIGHUP, stopping)
        for ignored in (signal.SIGUSR2, signal.SIGTTIN, signal.SIGTTOU):
            signal.signal(ignored, signal.SIG_IGN)
        # systemd's watchdog ends a hung service with SIGABRT: die at once (and dump
        # core where allowed), not through gunicorn's exit path, which would first wait
        # for the engines that stopped answering.
        signal.signal(signal.SIGABRT, signal.SIG_DFL)

    def close(self, worker: Any) -> None:
        from appliance.app import close_app

        if self._watchdog is not None:
            self._watchdog.stop()
        if getattr(worker, "wsgi", None) is not None:
            close_app(worker.wsgi)  # the audit log seals a last checkpoint

    def load(self) -> Flask:
        setup_logging(self.settings.log_level)
        return self.app_factory(self.settings)


def serve(settings: Settings) -> None:
    from appliance.app import create_app

    setup_logging(settings.log_level)
    sys.stdout.flush()
    server = ApplianceServer(settings, create_app)
    cfg = server.cfg
    log = cfg.logger_class(cfg)
    # Bound before the models load, as gunicorn's arbiter did: a client that connects
    # meanwhile waits in the backlog instead of being refused.
    sockets = create_sockets(cfg, log)
    for listener in sockets:
        log.info("Listening at: %s (%s)", listener, os.getpid())
    worker = LingeringWorker(1, os.getppid(), sockets, server, cfg.timeout, cfg, log)
    worker.pid = os.getpid()
    code = 0
    try:
        # Loads the app (post_worker_init: READY=1), then serves until SIGTERM.
        worker.init_process()
    except SystemExit as stop:  # gunicorn's quick stop (SIGINT, SIGQUIT)
        code = stop.code if isinstance(stop.code, int) else 0
    except Exception:
        log.exception(
            "the appliance stopped on an error"
            if worker.booted
            else "the appliance failed to start"
        )
        code = 3
    finally:
        try:
            server.close(worker)
        finally:
            worker.tmp.close()
            for listener in sockets:
                listener.close()
    # The audit log is sealed and closed. A request thread still blocked on a client
    # past the grace period must not keep the process alive (the arbiter would have
    # killed the worker): leave now.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
