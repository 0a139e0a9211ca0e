"""systemd's notify protocol, in the standard library: READY=1 once the models are
verified and loaded and the audit log is open, WATCHDOG=1 while the engines and the
audit writer are alive, STOPPING=1 when a stop begins. Does nothing outside systemd.

The server runs gunicorn's worker without gunicorn's arbiter (whose READY=1 would come
as soon as it had bound its socket, before any model is loaded): these are the only
notifications the service sends, from its main process.
"""

from __future__ import annotations

import ctypes
import logging
import os
import socket
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


def notify(message: str) -> bool:
    """Send one notification; False when there is no NOTIFY_SOCKET (not under systemd)."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.connect(address)
            sock.sendall(message.encode())
        except OSError as exc:
            log.warning("sd_notify failed", extra={"error": str(exc)})
            return False
    return True


def watchdog_interval() -> float | None:
    """Half of WATCHDOG_USEC, as systemd advises; None when no watchdog is asked for."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 2_000_000
    except ValueError:
        return None


class Watchdog:
    """Pings WATCHDOG=1 every interval while `healthy()` holds; a wedged engine or a dead
    audit writer stops the pings, and systemd restarts the service. The reason goes to
    the unit's status line (`systemctl status`) when the pings stop, and `status()` back
    when they resume (a component that recovered within WatchdogSec)."""

    def __init__(
        self,
        healthy: Callable[[], str | None],
        interval: float,
        status: Callable[[], str] | None = None,
    ) -> None:
        self.healthy = healthy
        self.interval = interval
        self.status = status
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="watchdog", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        withheld = False
        while not self._stop.wait(self.interval):
            problem = self.healthy()
            if problem is None:
                if withheld:
                    withheld = False
                    log.warning("watchdog resumed")
                    if self.status is not None:
                        notify(f"STATUS={self.status()}")
                notify("WATCHDOG=1")
            else:
                log.error("watchdog withheld", extra={"reason": problem})
                if not withheld:
                    withheld = True
                    notify(f"STATUS=watchdog withheld: {problem}")


# For the watchdog's tests only, never set in service: a fault that no outside means can
# cause, injected into the running server. "audit-writer:SECONDS" ends the audit writer
# thread that many seconds after READY=1, as an exception that escaped its loop would.
FAULT_ENV = "APPLIANCE_WATCHDOG_FAULT"


class InjectedFault(BaseException):
    """Raised in a thread by FAULT_ENV; a BaseException, so that no handler keeps the
    thread alive."""


def arm_fault(wake_audit_writer: Callable[[], object]) -> None:
    """Inert unless FAULT_ENV is set."""
    fault = os.environ.get(FAULT_ENV, "")
    if not fault:
        return
    name, _, after = fault.partition(":")
    if name != "audit-writer":
        raise ValueError(f"{FAULT_ENV}={fault!r}: the only fault is audit-writer:SECONDS")

    def inject() -> None:
        target = next(t for t in threading.enumerate() if t.name == "audit-writer")
        assert target.ident is not None
        notify(f"STATUS=fault injected: {name}")
        ctypes.pythonapi.PyThreadState_SetAsyncExc(
            ctypes.c_ulong(target.ident), ctypes.py_object(InjectedFault)
        )
        wake_audit_writer()  # it raises at its next Python instruction
        target.join(5)
        log.error("fault injected", extra={"fault": name, "thread_alive": target.is_alive()})

    timer = threading.Timer(float(after or 0), inject)
    timer.daemon = True
    timer.start()
