"""systemd: the unit passes systemd-analyze (no warning at all, exposure <= 1.5), and the
server speaks the notify protocol over a real unix datagram socket: READY=1 only once
the models are loaded, WATCHDOG=1 while healthy and not when wedged, STOPPING=1."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from appliance.engines.base import Generation, SamplingParams
from appliance.serving.scheduler import ModelScheduler
from appliance.systemd import Watchdog

from helpers import REPO, ServerFactory, wait_for

UNIT = REPO / "systemd" / "appliance.service"


def staged_unit(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this checkout's appliance (verify wants the
    executable to exist)."""
    text = UNIT.read_text().replace(
        "/opt/appliance/venv/bin/appliance", str(REPO / ".venv" / "bin" / "appliance")
    )
    path = tmp_path / "appliance.service"
    path.write_text(text)
    return path


def test_unit_verifies_without_a_single_warning(tmp_path: Path) -> None:
    result = subprocess.run(
        ["systemd-analyze", "verify", str(staged_unit(tmp_path))],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0 and result.stderr == "" and result.stdout == ""


def test_unit_exposure_is_at_most_1_5(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            "systemd-analyze",
            "security",
            "--offline=true",
            "--threshold=15",
            str(staged_unit(tmp_path)),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout[-2000:]
    level = re.search(r"Overall exposure level for appliance.service: (\d+\.\d)", result.stdout)
    assert level is not None and float(level[1]) <= 1.5


class Listener:
    """A notify socket like systemd's, collecting what the service says."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []
        self._stop = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            self.messages.append((time.monotonic(), data.decode()))

    def said(self, prefix: str) -> list[float]:
        return [t for t, m in self.messages if m.startswith(prefix)]

    def close(self) -> None:
        self._stop.set()
        self.sock.close()


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[Listener]:
    listening = Listener(tmp_path / "notify.sock")
    yield listening
    listening.close()


@pytest.mark.server
def test_ready_watchdog_and_stopping(
    server_factory: ServerFactory,
    state_dir: Path,
    tmp_path: Path,
    listener: Listener,
    model_name: str,
) -> None:
    server = server_factory(
        state_dir, env={"NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "1000000"}
    )
    assert wait_for(lambda: listener.said("READY=1"), 10)
    [ready] = listener.said("READY=1")  # one, the appliance's: not gunicorn's early one
    assert not any("Gunicorn arbiter booted" in m for _, m in listener.messages)
    state = httpx.get(f"{server.url}/readyz").json()
    models = {m["name"]: m["state"] for m in state["models"]}
    assert state["ready"] and models["smollm2-135m-instruct"] == "ready"
    assert wait_for(lambda: len(listener.said("WATCHDOG=1")) >= 2, 5)
    assert min(listener.said("WATCHDOG=1")) > ready
    server.proc.send_signal(signal.SIGTERM)
    assert wait_for(lambda: listener.said("STOPPING=1"), 10)
    assert server.wait(30) == 0


def test_watchdog_pings_only_while_healthy(
    tmp_path: Path, listener: Listener, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify.sock"))
    problem: list[str | None] = [None]
    dog = Watchdog(lambda: problem[0], 0.05, lambda: "serving x")
    dog.start()
    assert wait_for(lambda: len(listener.said("WATCHDOG=1")) >= 3, 3)
    problem[0] = "model 'x' has made no progress for 90 s"
    withheld = "STATUS=watchdog withheld: model 'x' has made no progress for 90 s"
    assert wait_for(lambda: listener.said(withheld), 3)  # the unit's status says why
    [stopped] = listener.said(withheld)
    # Withheld: systemd will restart it (six intervals without a ping).
    assert not wait_for(lambda: any(t > stopped for t in listener.said("WATCHDOG=1")), 0.3)
    problem[0] = None
    assert wait_for(lambda: any(t > stopped for t in listener.said("WATCHDOG=1")), 3)
    [back] = listener.said("STATUS=serving x")
    assert back > stopped and len(listener.said("STATUS=watchdog withheld")) == 1
    dog.stop()


class HangingEngine:
    """Named fake: an engine whose step hangs mid-answer (a wedge cannot be caused
    otherwise)."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.admitted = 0

    def free_slots(self) -> int:
        return 1 - self.admitted

    def busy_slots(self) -> int:
        return self.admitted

    def admit(self, generation: Generation, emit: Any, cancelled: Any) -> None:
        self.admitted += 1

    def step(self) -> int:
        self.release.wait(10)
        return 0

    def fail_all(self, message: str) -> None:
        self.admitted = 0


def test_a_hanging_engine_is_reported_as_stalled() -> None:
    engine = HangingEngine()
    scheduler = ModelScheduler("hang", engine, queue_depth=1)  # type: ignore[arg-type]
    scheduler.start()
    scheduler.submit(Generation([1], SamplingParams(max_tokens=1)))
    assert wait_for(lambda: scheduler.snapshot()["running"] == 1, 2)
    assert scheduler.stalled(60) is None
    time.sleep(0.3)
    assert "no progress" in (scheduler.stalled(0.2) or "")
    engine.release.set()
    scheduler.stop()


def test_gpu_variant_verifies_and_stays_under_1_5(tmp_path: Path) -> None:
    base = staged_unit(tmp_path)
    drop_in = (REPO / "systemd" / "appliance-gpu.conf").read_text()
    settings = [
        line
        for line in drop_in.splitlines()
        if line and not line.startswith("#") and line != "[Service]"
    ]
    merged = base.read_text().replace("PrivateDevices=yes\n", "")
    merged = merged.replace("[Install]", "\n".join(settings) + "\n\n[Install]")
    base.write_text(merged)
    verify = subprocess.run(
        ["systemd-analyze", "verify", str(base)], capture_output=True, text=True, timeout=60
    )
    assert verify.returncode == 0 and verify.stderr == ""
    security = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--threshold=15", str(base)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert security.returncode == 0, security.stdout[-2000:]
