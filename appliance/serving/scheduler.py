"""Bounded admission per model and the loop that runs a language model.

A language model has a fixed number of slots (parallel streams) that run together,
a bounded line of requests that wait, and a clear refusal (503 with Retry-After) past
that. One worker thread per model owns the engine, the only thread that touches the
model's context. Each turn of its loop admits waiting requests into free slots, oldest
first (continuous batching: a request starts as soon as a slot frees, not when the
batch ends), then runs one engine step, which advances every slot by one token. A
request is a Job whose events the request thread reads from a queue.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from appliance.engines.base import Event, Failed, Finished, Generation, TextEngine
from appliance.problems import Unavailable

log = logging.getLogger(__name__)
ENDS = (Finished, Failed)  # a job's last event

PR_SET_NAME = 15


def name_os_thread(name: str) -> None:
    """Give the calling thread `name` where the OS shows threads (top -H, gdb, ps -L,
    /proc/PID/task/TID/comm: 15 bytes). Python names its threads for itself alone."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(PR_SET_NAME, name.encode()[:15], 0, 0, 0)


class QueueFull(Unavailable):
    def __init__(self, model: str, waiting: int, depth: int, slots: int, retry_after: int) -> None:
        super().__init__(
            f"model {model!r} is busy: {waiting} request(s) already waiting for its "
            f"{slots} slot(s) (queue_depth {depth}); retry in {retry_after} s",
            code="queue_full",
            retry_after=retry_after,
        )
        self.waiting, self.depth = waiting, depth


class Stopping(Unavailable):
    def __init__(self, model: str) -> None:
        super().__init__(
            f"model {model!r} is stopping with the appliance; retry in a few seconds",
            code="stopping",
            retry_after=5,
        )


@dataclass
class Job:
    generation: Generation
    events: queue.SimpleQueue[Event] = field(default_factory=queue.SimpleQueue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    started: threading.Event = field(default_factory=threading.Event)
    submitted_at: float = field(default_factory=time.monotonic)
    # Takes the job out of its model's queue if it still waits there (set on submit).
    withdraw: Callable[[], None] | None = field(default=None, repr=False, compare=False)

    def cancel(self) -> None:
        """Stop the job: at its next token if it runs; at once if it still waits for a
        slot (it ends as cancelled, and its place in the queue is free)."""
        self.cancelled.set()
        if self.withdraw is not None:
            self.withdraw()

    def cancel_and_settle(self, timeout: float = 2.0) -> Finished | Failed | None:
        """Cancel, then wait for the worker's last word (it stops at the next token) so
        that what the request cost is known; None if the worker did not answer."""
        self.cancel()
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                event = self.events.get(timeout=left)
            except queue.Empty:
                return None
            if isinstance(event, Finished | Failed):
                return event
        return None


class ModelScheduler:
    def __init__(self, name: str, engine: TextEngine, queue_depth: int):
        self.name = name
        self.engine = engine
        self.queue_depth = queue_depth
        self.slots = engine.free_slots()
        self._waiting: deque[Job] = deque()
        self._running = 0
        self._cond = threading.Condition()
        self._stopping = False
        self._avg_seconds = 2.0  # first guess for Retry-After; then a moving average
        self.completed = 0
        self.steps = 0  # engine steps, and what they carried: for the batch metrics
        self.batch_tokens = 0
        self.batch_sequences = 0
        self._progress = time.monotonic()  # last step of the engine
        self._thread = threading.Thread(target=self._work, name=f"model-{name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, generation: Generation) -> Job:
        job = Job(generation)
        job.withdraw = lambda: self._withdraw(job)
        with self._cond:
            if self._stopping:
                raise Stopping(self.name)
            if self._running + len(self._waiting) >= self.slots + self.queue_depth:
                raise QueueFull(
                    self.name,
                    len(self._waiting),
                    self.queue_depth,
                    self.slots,
                    self._retry_after(),
                )
            self._waiting.append(job)
            self._cond.notify()
        return job

    def _withdraw(self, job: Job) -> None:
        """A cancelled job that still waits leaves the queue and ends now, instead of
        holding its place (and its request thread) until a slot frees."""
        with self._cond:
            for i, waiting in enumerate(self._waiting):
                if waiting is job:
                    del self._waiting[i]
                    break
            else:
                return  # taken by the worker (it sees the cancel), or already gone
        job.events.put(Finished("cancelled", len(job.generation.prompt_tokens), 0))

    def _retry_after(self) -> int:
        ahead = len(self._waiting) + self._running
        return max(1, min(600, math.ceil(self._avg_seconds * ahead / self.slots)))

    def snapshot(self) -> dict[str, int | bool | float]:
        # KV cells held by running requests, and all of them, if the engine says: read
        # here, when asked, not counted every step.
        cells = getattr(self.engine, "kv_cells", None)
        held, total = cells() if cells is not None else (0, 0)
        with self._cond:
            return {
                "busy": self._running > 0,
                "running": self._running,
                "queued": len(self._waiting),
                "slots": self.slots,
                "queue_depth": self.queue_depth,
                "completed": self.completed,
                "alive": self._thread.is_alive(),
                "steps": self.steps,
                "batch_tokens": self.batch_tokens,
                "batch_sequences": self.batch_sequences,
                **({"kv_cache_usage": round(held / total, 4)} if total else {}),
            }

    def stalled(self, limit: float) -> str | None:
        """Why this model looks wedged (its worker died, or it has had work and has not
        turned its loop for `limit` seconds: a running request without an engine step, or
        a waiting one it never took), or None. Takes no lock: the watchdog's check must
        not wait on the loop it watches."""
        if not self._thread.is_alive():
            return f"the worker of model {self.name!r} has stopped"
        since = self._progress
        if not self._running:
            try:
                since = max(since, self._waiting[0].submitted_at)
            except IndexError:
                return None  # nothing to do: idle is not wedged
        quiet = time.monotonic() - since
        if quiet > limit:
            return f"model {self.name!r} has made no progress for {quiet:.0f} s"
        return None

    def running(self) -> bool:
        """Whether the worker thread is still alive (after stop: still in a step)."""
        return self._thread.is_alive()

    def stop(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _admit(self) -> list[Job] | None:
        """Waiting jobs for the free slots (oldest first); waits while there is nothing
        at all to do; None when stopping."""
        if self._running and not self._waiting and not self._stopping:
            # Mid-answer with nobody waiting, the common case, costs no lock: only this
            # thread changes _running, and a request that comes now is taken next step.
            return []
        with self._cond:
            while not self._waiting and not self._running and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return None
            taken = []
            self._progress = time.monotonic()  # the loop turned
            while self._waiting and self._running < self.slots:
                taken.append(self._waiting.popleft())
                self._running += 1
            return taken

    def _emitter(self, job: Job) -> Callable[[Event], None]:
        def emit(event: Event) -> None:
            if isinstance(event, ENDS):
                # Counted done before its request thread can see the end, so that the
                # snapshot (/readyz, /status, /metrics) is never behind what a client saw.
                self._done(job)
            job.events.put(event)

        return emit

    def _start(self, taken: list[Job]) -> None:
        for job in taken:
            emit = self._emitter(job)
            if job.cancelled.is_set():
                emit(Finished("cancelled", len(job.generation.prompt_tokens), 0))
                continue
            job.started.set()
            try:
                self.engine.admit(job.generation, emit, job.cancelled.is_set)
            except Exception as exc:
                log.exception("request could not be admitted")
                emit(Failed(f"the model could not take the request: {exc}"))

    def _done(self, job: Job) -> None:
        elapsed = time.monotonic() - job.submitted_at
        with self._cond:
            self._running -= 1
            self.completed += 1
            self._avg_seconds = 0.8 * self._avg_seconds + 0.2 * elapsed

    def _work(self) -> None:
        name_os_thread(self._thread.name)
        while (taken := self._admit()) is not None:
            try:
                if taken:
                    self._start(taken)
                    self._progress = time.monotonic()
                sequences = self.engine.busy_slots()
                tokens = self.engine.step()
                self._progress = time.monotonic()
                if tokens:
                    self.steps += 1
                    self.batch_tokens += tokens
                    self.batch_sequences += sequences
            except Exception as exc:  # never let one request kill the worker
                log.exception("model worker error")
                self.engine.fail_all(f"internal error in the model worker: {exc}")
        # Stopping: the requests still waiting for a slot and those in one end now, so
        # that no request thread waits for an answer that will not come.
        with self._cond:
            waiting, self._waiting = list(self._waiting), deque()
        for job in waiting:
            job.events.put(Failed("the appliance is stopping"))
        self.engine.fail_all("the appliance is stopping")


class Admission:
    """A bound for models whose runs may overlap (onnxruntime sessions): `slots` run at
    once, `depth` more wait, past that QueueFull."""

    def __init__(self, name: str, slots: int, depth: int) -> None:
        self.name, self.slots, self.depth = name, slots, depth
        self._running = threading.Semaphore(slots)
        self._lock = threading.Lock()
        self._inside = 0
        self.completed = 0

    def __enter__(self) -> Admission:
        with self._lock:
            if self._inside >= self.slots + self.depth:
                waiting = self._inside - min(self._inside, self.slots)
                raise QueueFull(self.name, waiting, self.depth, self.slots, 1)
            self._inside += 1
        self._running.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self._running.release()
        with self._lock:
            self._inside -= 1
            self.completed += 1

    def snapshot(self) -> dict[str, int | bool | float]:
        with self._lock:
            inside = self._inside
        running = min(inside, self.slots)
        return {
            "busy": inside > 0,
            "running": running,
            "queued": inside - running,
            "slots": self.slots,
            "queue_depth": self.depth,
            "completed": self.completed,
            "alive": True,
        }
