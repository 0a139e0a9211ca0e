"""The watchdog's real wiring: the real server under a real NOTIFY_SOCKET (WATCHDOG_USEC
1 s: a check and a ping every 0.5 s; stall_seconds 2), one of its parts made to fail
while the rest runs. Its engine loop and its HTTP loop are stopped from outside, one
thread of the process held in a ptrace stop (the others go on: the watchdog thread
keeps checking), then let go; its audit writer thread is ended by the one fault switch
(APPLIANCE_WATCHDOG_FAULT), which no outside means can cause. In each case WATCHDOG=1
stops within one interval of the part's failing (for a loop: of its having been still
for stall_seconds) and the unit's status says why; the pings resume when the loop turns
again, never once the audit writer is gone (only a restart brings it back)."""

from __future__ import annotations

import ctypes
import os
import platform
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from test_systemd import Listener

from appliance.systemd import FAULT_ENV

from helpers import (
    Server,
    ServerFactory,
    make_state,
    model_state,
    open_stream,
    start_server,
    wait_for,
)

pytestmark = pytest.mark.server

INTERVAL = 0.5  # half of WATCHDOG_USEC, as systemd advises
STALL = 2.0  # stall_seconds
SLACK = 1.0  # a busy 2-core machine's scheduling, on top of an exact bound
WATCH = {"WATCHDOG_USEC": "1000000", "APPLIANCE_STALL_SECONDS": str(int(STALL))}

# ptrace(2), through libc.
PTRACE_CONT, PTRACE_DETACH, PTRACE_SEIZE, PTRACE_INTERRUPT = 7, 17, 0x4206, 0x4207
PTRACE_EVENT_STOP = 128
WALL = 0x40000000  # __WALL: wait for a thread of another process that this one traces
EPOLL_WAITS = {"x86_64": {232, 281, 441}, "aarch64": {22, 441}}  # epoll_(p)wait(2)
FUTEX = {"x86_64": 202, "aarch64": 98}  # futex(2)
_libc = ctypes.CDLL(None, use_errno=True)
_libc.ptrace.restype = ctypes.c_long
_libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]


def ptrace(request: int, tid: int, data: int = 0) -> None:
    if _libc.ptrace(request, tid, None, ctypes.c_void_p(data)) == -1:
        errno = ctypes.get_errno()
        raise OSError(errno, f"ptrace({request:#x}, {tid}): {os.strerror(errno)}")


def where(pid: int, tid: int) -> tuple[int, int]:
    """A thread's system call (-1: none) and program counter, if it is stopped or asleep
    ((-2, 0) while it runs)."""
    fields = Path(f"/proc/{pid}/task/{tid}/syscall").read_text().split()
    if fields[0] == "running":
        return -2, 0
    return int(fields[0]), int(fields[-1], 16)


def mapped_file(pid: int, address: int) -> str:
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        span, *rest = line.split(maxsplit=5)
        low, high = (int(x, 16) for x in span.split("-"))
        if low <= address < high:
            return rest[4] if len(rest) == 5 else ""
    return ""


def thread_named(pid: int, prefix: str) -> int:
    """The thread of `pid` whose OS name (/proc/PID/task/TID/comm) starts with prefix;
    of several, the first started (threads it started later inherit its name: the
    model loop's are llama.cpp's compute threads)."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        if (task / "comm").read_text().startswith(prefix):
            stat = (task / "stat").read_text()
            started = int(stat[stat.rindex(")") + 2 :].split()[19])  # starttime, field 22
            found.append((started, int(task.name)))
    assert found, f"no thread named {prefix}*"
    return min(found)[1]


class Frozen:
    """One thread of another process held in a ptrace stop (PTRACE_SEIZE, then
    PTRACE_INTERRUPT) while its other threads run on, until thaw() (PTRACE_DETACH).

    Where it stops matters: a Python thread stopped while it holds the interpreter's
    lock would stop every Python thread with it, which proves nothing about the health
    check. So it is stopped, looked at, and let go on until it stops where it cannot
    hold that lock: `at(syscall, program counter)`. All calls from the thread that made
    it (ptrace is per thread)."""

    def __init__(self, pid: int, tid: int, at: Callable[[int, int], bool]) -> None:
        self.pid, self.tid = pid, tid
        ptrace(PTRACE_SEIZE, tid)
        deadline = time.monotonic() + 20
        while True:
            ptrace(PTRACE_INTERRUPT, tid)
            _, status = os.waitpid(tid, WALL)
            assert os.WIFSTOPPED(status), status
            signal = 0 if status >> 16 == PTRACE_EVENT_STOP else os.WSTOPSIG(status)
            if not signal and at(*where(pid, tid)):
                return
            if time.monotonic() > deadline:
                self.thaw()
                raise AssertionError(f"thread {tid} never stopped where asked")
            ptrace(PTRACE_CONT, tid, signal)  # a signal stop: deliver it
            time.sleep(0.001)

    def thaw(self) -> None:
        ptrace(PTRACE_DETACH, self.tid)


def in_engine(pid: int) -> Callable[[int, int], bool]:
    """Inside llama.cpp (ggml, its OpenMP runtime): a call from Python through ctypes,
    which holds no lock of the interpreter's."""

    def at(syscall: int, pc: int) -> bool:
        name = Path(mapped_file(pid, pc)).name
        return any(lib in name for lib in ("libggml", "libllama", "libgomp"))

    return at


def in_poll(syscall: int, pc: int) -> bool:
    """Waiting in epoll_wait: the HTTP loop between turns, the interpreter's lock let go."""
    return syscall in EPOLL_WAITS[platform.machine()]


def in_futex(syscall: int, pc: int) -> bool:
    """Asleep on a lock: an idle model's loop waiting for work (the interpreter's lock
    let go, as for any wait on a lock)."""
    return syscall == FUTEX[platform.machine()]


def pings(listener: Listener, after: float, before: float = float("inf")) -> list[float]:
    return [t for t in listener.said("WATCHDOG=1") if after < t < before]


def said_after(listener: Listener, prefix: str, after: float) -> list[float]:
    return [t for t in listener.said(prefix) if t > after]


def timeline(listener: Listener, since: float) -> list[tuple[float, str]]:
    """What the service said, in seconds from `since`: for a failure's message."""
    return [(round(t - since, 3), m) for t, m in listener.messages if t > since - 2]


def withheld_then_resumed(
    listener: Listener, server: Server, frozen: Frozen, reason: str, then: Callable[[], None]
) -> None:
    """The promise for a loop held still (by `frozen`) with work to do from this call
    on: pings go on until it has been still for stall_seconds (the server runs on: only
    its check can stop them), stop within an interval of that with `reason` on the
    status line, and stay stopped; thawed, they resume once the loop has turned, the
    status line back to serving."""
    frozen_at = time.monotonic()
    try:
        withheld = "STATUS=watchdog withheld: "
        assert wait_for(lambda: said_after(listener, withheld, frozen_at), STALL + INTERVAL + 5)
        [stopped] = said_after(listener, withheld, frozen_at)
        status = next(m for t, m in listener.messages if t == stopped)
        assert reason in status, status
        seen = timeline(listener, frozen_at)
        assert stopped - frozen_at <= STALL + INTERVAL + SLACK, seen
        before = pings(listener, frozen_at, stopped)
        assert before, seen  # pinging while the loop had been still less than stall_seconds
        assert stopped - max(before) <= INTERVAL + SLACK, seen  # within the interval
        then()  # while still held
        assert not wait_for(lambda: pings(listener, stopped), 4 * INTERVAL)
    finally:
        thawed = time.monotonic()
        frozen.thaw()
    # The loop turns again (the engine ends the step it was in), and the next check pings.
    assert wait_for(lambda: pings(listener, thawed), 10), timeline(listener, thawed)
    assert said_after(listener, "STATUS=serving ", thawed)


@pytest.fixture(scope="module")
def watched(
    tmp_path_factory: pytest.TempPathFactory, model_file: Path
) -> Iterator[tuple[Server, Listener]]:
    work = tmp_path_factory.mktemp("watchdog")
    listener = Listener(work / "notify.sock")
    server = start_server(
        make_state(work / "state", model_file),
        env={**WATCH, "NOTIFY_SOCKET": str(work / "notify.sock")},
    )
    try:
        assert wait_for(lambda: len(listener.said("WATCHDOG=1")) >= 2, 10)
        yield server, listener
    finally:
        server.stop()
        listener.close()


def test_a_stalled_engine_loop_stops_the_pings_until_it_steps_again(
    watched: tuple[Server, Listener], model_name: str
) -> None:
    server, listener = watched
    pid = server.proc.pid
    engine = thread_named(pid, "model-")  # its OS name, as top -H and gdb show it
    body = {
        "model": model_name,
        "messages": [{"role": "user", "content": "Count from 1 to 400, one number a line."}],
        "max_tokens": 400,
        "temperature": 0,
        "ignore_eos": True,  # still decoding when frozen, whatever this CPU's kernels say
    }
    with server.client() as client:
        ctx, lines = open_stream(server, client, body)  # an answer on its way
        frozen = Frozen(pid, engine, in_engine(pid))

        def while_held() -> None:
            live = httpx.get(f"{server.url}/livez", timeout=5)  # the HTTP loop still serves
            assert live.status_code == 503 and "no progress" in live.json()["problem"]

        withheld_then_resumed(
            listener, server, frozen, f"model {model_name!r} has made no progress", while_held
        )
        assert any('"content":"' in line for line in lines)  # and the answer goes on
        ctx.__exit__(None, None, None)
    assert httpx.get(f"{server.url}/livez", timeout=5).status_code == 200


def test_an_engine_loop_stopped_while_idle_is_stalled_once_a_request_waits(
    watched: tuple[Server, Listener], model_name: str
) -> None:
    """A loop that never takes the request waiting for it is as wedged as one stuck in a
    step; idle, with nothing waiting, it is not."""
    server, listener = watched
    pid = server.proc.pid
    engine = thread_named(pid, "model-")
    assert wait_for(lambda: where(pid, engine)[0] == FUTEX[platform.machine()], 5)
    frozen = Frozen(pid, engine, in_futex)
    answers: list[httpx.Response] = []

    def ask() -> None:
        body = {
            "model": model_name,
            "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 4,
        }
        answers.append(server.client(timeout=30).post("/v1/chat/completions", json=body))

    try:
        frozen_at = time.monotonic()
        assert not wait_for(lambda: said_after(listener, "STATUS=watchdog", frozen_at), STALL)
    except BaseException:
        frozen.thaw()
        raise
    asking = threading.Thread(target=ask, daemon=True)
    asking.start()
    # The stall is counted from the request's arrival: the bounds below, from here.
    try:
        assert wait_for(lambda: model_state(server.url, model_name)["queued"] == 1, 10)
    except BaseException:
        frozen.thaw()
        raise
    withheld_then_resumed(
        listener, server, frozen, f"model {model_name!r} has made no progress", lambda: None
    )
    asking.join(30)
    assert [a.status_code for a in answers] == [200]  # taken once the loop turned


def test_a_blocked_http_loop_stops_the_pings_until_it_turns_again(
    watched: tuple[Server, Listener],
) -> None:
    server, listener = watched
    pid = server.proc.pid  # the main thread runs the HTTP loop
    frozen = Frozen(pid, pid, in_poll)

    def while_held() -> None:
        with pytest.raises(httpx.TimeoutException):
            httpx.get(f"{server.url}/healthz", timeout=1)  # nobody accepts it

    withheld_then_resumed(listener, server, frozen, "the HTTP loop has not turned", while_held)
    assert httpx.get(f"{server.url}/healthz", timeout=5).status_code == 200


def test_a_dead_audit_writer_stops_the_pings_for_good(
    server_factory: ServerFactory, state_dir: Path, tmp_path: Path, model_name: str
) -> None:
    listener = Listener(tmp_path / "notify.sock")
    try:
        server = server_factory(
            state_dir,
            env={
                **WATCH,
                "NOTIFY_SOCKET": str(tmp_path / "notify.sock"),
                FAULT_ENV: "audit-writer:1",
            },
        )
        assert wait_for(lambda: listener.said("STATUS=fault injected: audit-writer"), 10)
        [killed] = listener.said("STATUS=fault injected")
        assert pings(listener, 0, killed)  # healthy until then
        withheld = "STATUS=watchdog withheld: the audit writer has stopped"
        assert wait_for(lambda: listener.said(withheld), INTERVAL + 5)
        [stopped] = listener.said(withheld)
        assert stopped - killed <= INTERVAL + SLACK, stopped - killed
        assert all(t < stopped for t in listener.said("WATCHDOG=1"))
        answer = server.http.post(
            "/v1/chat/completions",
            json={"model": model_name, "messages": [{"role": "user", "content": "Hi"}]},
        )
        assert answer.status_code == 503, answer.text  # fail closed: nothing unaudited
        assert answer.json()["error"]["code"] == "audit_unavailable"
        # Nothing brings it back: the pings stay stopped until systemd restarts it.
        assert not wait_for(lambda: pings(listener, stopped), 4 * INTERVAL)
        assert not listener.said("STATUS=serving")
        assert any(r.get("msg") == "fault injected" for r in server.log_records())
    finally:
        listener.close()
