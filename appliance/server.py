"""The production server: gunicorn in-process, one gthread worker (so each model is
loaded once), JSON logs on stderr, graceful stop on SIGTERM.

SIGTERM: gunicorn stops accepting, in-flight requests (streams included) get
``shutdown_grace`` seconds to finish, then the process exits 0.
"""

from __future__ import annotations

import ipaddress
import logging
import signal
import sys
from collections.abc import Callable
from typing import Any

from flask import Flask
from gunicorn.app.base import BaseApplication
from gunicorn.glogging import Logger

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
            # gthread's main loop heartbeats independently of request threads, so a
            # long stream does not trip this.
            "timeout": 120,
            "keepalive": 5,
            "preload_app": False,  # load models in the worker, never fork llama.cpp
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
            "worker_exit": self._close,
        }
        for key, value in options.items():
            if key in self.cfg.settings:
                self.cfg.set(key, value)

    def _announce(self, worker: Any) -> None:
        from appliance.app import health_problem

        app = worker.wsgi
        print(ready_message(self.settings, app), flush=True)
        # Models verified and loaded, audit log open: now systemd may call it ready.
        systemd.notify(f"READY=1\nSTATUS=serving {', '.join(sorted(get_pool(app).served))}")
        interval = systemd.watchdog_interval()
        if interval:
            self._watchdog = systemd.Watchdog(lambda: health_problem(app), interval)
            self._watchdog.start()
        previous = signal.getsignal(signal.SIGTERM)

        def stopping(signum: int, frame: Any) -> None:
            systemd.notify("STOPPING=1")
            if callable(previous):
                previous(signum, frame)

        signal.signal(signal.SIGTERM, stopping)

    def _close(self, server: Any, worker: Any) -> None:
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
    systemd.take_socket_from_gunicorn()
    logging.getLogger(__name__).info(
        "starting", extra={"bind": bind_address(settings.host, settings.port)}
    )
    sys.stdout.flush()
    ApplianceServer(settings, create_app).run()
