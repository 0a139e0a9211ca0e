"""The scheduler's promises on a fake engine (scheduling is what is tested here, not
what a model answers): slots run together and waiting requests take them oldest
first; past slots plus queue_depth a request is refused with a Retry-After estimated
from recent request times; a cancelled request ends as cancelled; one request's
failure never stops the worker; stopping ends every request with a clear failure; the
figures /readyz and the batch metrics read are kept as they happen."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from appliance.engines.base import Event, Failed, Finished, Generation, SamplingParams, TextDelta
from appliance.serving.scheduler import Admission, Job, ModelScheduler, QueueFull, Stopping

from fakes import FakeChatEngine
from helpers import wait_for

STOPPING = "the appliance is stopping"


def generation(tokens: int = 2, prompt: int = 3) -> Generation:
    return Generation(list(range(prompt)), SamplingParams(max_tokens=tokens))


def outcome(job: Job, timeout: float = 10) -> tuple[list[str], Finished | Failed]:
    """A job's text pieces and its last word."""
    texts: list[str] = []
    while True:
        event = job.events.get(timeout=timeout)
        if isinstance(event, TextDelta):
            texts.append(event.text)
        elif isinstance(event, Finished | Failed):
            return texts, event


class Recording(FakeChatEngine):
    """The fake engine, noting the order requests were admitted in; a prompt of 99
    tokens cannot be admitted, and ``hold`` keeps step() from returning."""

    def __init__(self, slots: int = 2) -> None:
        super().__init__(on_close=lambda: None, slots=slots)
        self.admitted: list[int] = []
        self.hold = threading.Event()
        self.hold.set()
        self.idle = threading.Event()  # cleared: a step that ends the last request hangs
        self.idle.set()
        self.fail_next_step = False

    def admit(
        self, generation: Generation, emit: Callable[[Event], None], cancelled: Callable[[], bool]
    ) -> None:
        if len(generation.prompt_tokens) == 99:
            raise RuntimeError("no room for this one")
        self.admitted.append(len(generation.prompt_tokens))
        super().admit(generation, emit, cancelled)

    def step(self) -> int:
        self.hold.wait(10)
        if self.fail_next_step:
            self.fail_next_step = False
            raise RuntimeError("the engine broke")
        tokens = super().step()
        if not self._runs:
            self.idle.wait(10)
        return tokens


class Cells(Recording):
    """An engine that says how many KV cells its requests hold, of how many."""

    def kv_cells(self) -> tuple[int, int]:
        return (1, 3)


@pytest.fixture
def engine() -> Recording:
    return Recording(slots=2)


@pytest.fixture
def scheduler(engine: Recording) -> Iterator[ModelScheduler]:
    scheduler = ModelScheduler("talk", engine, queue_depth=2)
    yield scheduler
    engine.hold.set()
    scheduler.stop()


def take_the_slots(engine: Recording, scheduler: ModelScheduler, tokens: int) -> list[Job]:
    """The scheduler started with the engine held mid-step, and a request of ``tokens``
    running in each of its slots."""
    engine.hold.clear()
    scheduler.start()
    running = [scheduler.submit(generation(tokens=tokens)) for _ in range(scheduler.slots)]
    assert all(job.started.wait(10) for job in running)
    return running


class Witnessed(queue.SimpleQueue[Event]):
    """A job's event queue that notes what the scheduler's snapshot said as each end
    was handed to the request thread."""

    def __init__(self, scheduler: ModelScheduler) -> None:
        self.scheduler = scheduler
        self.at_end: list[tuple[int, int]] = []

    def put(self, item: Event, block: bool = True, timeout: float | None = None) -> None:
        if isinstance(item, Finished | Failed):
            shown = self.scheduler.snapshot()
            self.at_end.append((shown["running"], self.scheduler.completed))
        super().put(item, block, timeout)


def test_a_request_is_counted_done_before_its_client_can_see_its_end(
    scheduler: ModelScheduler,
) -> None:
    """/readyz, /status and /metrics are never behind what a client saw: a request's
    slot is free in the snapshot by the time its end reaches its request thread."""
    jobs = [scheduler.submit(generation(tokens=2)) for _ in range(3)]
    queues = []
    for job in jobs:
        job.events = Witnessed(scheduler)
        queues.append(job.events)
    scheduler.start()
    for job in jobs:
        assert outcome(job)[1] == Finished("length", 3, 2)
    ends = [q.at_end for q in queues]
    # Two slots: the first two end in one step (one, then none, still running), the
    # third alone; each already counted among the completed.
    assert ends == [[(1, 1)], [(0, 2)], [(0, 3)]], ends


def test_slots_run_together_and_the_oldest_waiting_request_goes_first(
    engine: Recording, scheduler: ModelScheduler
) -> None:
    jobs = [scheduler.submit(generation(tokens=3, prompt=n)) for n in (1, 2, 3, 4)]
    assert scheduler.snapshot()["queued"] == 4
    scheduler.start()
    for job in jobs:
        texts, last = outcome(job)
        assert last == Finished("length", len(job.generation.prompt_tokens), 3)
        assert texts == ["alpha ", "beta ", "gamma "]
    assert engine.admitted == [1, 2, 3, 4]
    # Two at a time, three steps each: 6 steps of 2 sequences, one token each.
    assert scheduler.snapshot() == {
        "busy": False,
        "running": 0,
        "queued": 0,
        "slots": 2,
        "queue_depth": 2,
        "completed": 4,
        "alive": True,
        "steps": 6,
        "batch_tokens": 12,
        "batch_sequences": 12,
    }


def test_no_more_run_at_once_than_the_model_has_slots(
    engine: Recording, scheduler: ModelScheduler
) -> None:
    engine.hold.clear()
    jobs = [scheduler.submit(generation(tokens=1)) for _ in range(3)]
    scheduler.start()
    assert jobs[0].started.wait(10) and jobs[1].started.wait(10)
    snapshot = scheduler.snapshot()
    assert (snapshot["busy"], snapshot["running"], snapshot["queued"]) == (True, 2, 1)
    assert not jobs[2].started.is_set()
    engine.hold.set()
    for job in jobs:
        assert outcome(job)[1] == Finished("length", 3, 1)


def test_a_request_that_comes_mid_answer_joins_the_batch_at_once(
    engine: Recording, scheduler: ModelScheduler
) -> None:
    """A free slot is taken at the next step, not when the running answers end (the
    loop takes no lock mid-answer: it must still see the newcomer)."""
    scheduler.start()
    long = scheduler.submit(generation(tokens=10**9))
    assert long.started.wait(10)
    short = scheduler.submit(generation(tokens=2))
    assert outcome(short)[1] == Finished("length", 3, 2)
    # The long answer still runs beside it (the short one's slot was counted free before
    # its last event was handed over).
    assert scheduler.snapshot()["running"] == 1
    long.cancel()
    assert outcome(long, timeout=60)[1].reason == "cancelled"


def test_the_worker_is_a_named_daemon_thread(scheduler: ModelScheduler) -> None:
    """Named for the model in thread dumps, log records and where the OS lists threads
    (top -H, ps -L: 15 bytes); a daemon, so a model stuck in a step never keeps the
    process from exiting."""
    scheduler.start()
    worker = next(t for t in threading.enumerate() if t.name == "model-talk")
    assert worker.daemon and worker.is_alive()
    comm = Path(f"/proc/self/task/{worker.native_id}/comm")
    deadline = time.monotonic() + 10
    while comm.read_text() != "model-talk\n":
        assert time.monotonic() < deadline, comm.read_text()
        time.sleep(0.01)
    long = ModelScheduler("a-model-with-a-long-name", Recording(), queue_depth=1)
    long.start()
    try:
        worker = next(t for t in threading.enumerate() if t.name.startswith("model-a-model"))
        comm = Path(f"/proc/self/task/{worker.native_id}/comm")
        while comm.read_text() != "model-a-model-w\n":
            assert time.monotonic() < deadline, comm.read_text()
            time.sleep(0.01)
    finally:
        long.stop()


def test_kv_cache_use_is_reported_when_the_engine_tells_it() -> None:
    scheduler = ModelScheduler("cells", Cells(), queue_depth=1)
    scheduler.start()
    try:
        outcome(scheduler.submit(generation(tokens=1)))
        assert scheduler.snapshot()["kv_cache_usage"] == 0.3333  # held / all, 4 places
    finally:
        scheduler.stop()
    plain = ModelScheduler("plain", Recording(), queue_depth=1)
    plain.start()
    try:
        outcome(plain.submit(generation(tokens=1)))
        assert "kv_cache_usage" not in plain.snapshot()  # an engine that cannot tell
    finally:
        plain.stop()


def test_a_request_the_loop_never_takes_is_a_stall(
    engine: Recording, scheduler: ModelScheduler
) -> None:
    """Nothing running, one waiting, and the loop not turning: wedged, not idle."""
    engine.idle.clear()
    scheduler.start()
    outcome(scheduler.submit(generation(tokens=1)))  # its last step now hangs
    waiting = scheduler.submit(generation(tokens=1))
    assert scheduler.snapshot()["running"] == 0
    assert scheduler.stalled(1000) is None
    assert stall_reason(scheduler).startswith("model 'talk' has made no progress for ")
    engine.idle.set()
    assert outcome(waiting)[1] == Finished("length", 3, 1)


def stall_reason(scheduler: ModelScheduler) -> str:
    """What stalled() says once 0.05 s pass without progress (waited on, at most 10 s)."""
    why: list[str | None] = [None]

    def stalled() -> bool:
        why[0] = scheduler.stalled(0.05)
        return why[0] is not None

    assert wait_for(stalled, 10)
    assert why[0] is not None
    return why[0]


def test_past_slots_and_queue_a_request_is_refused_with_retry_after() -> None:
    # Not started: nothing runs, so every request waits. The first guess is 2 s a
    # request: requests ahead x 2 s / slots.
    one = ModelScheduler("one", Recording(slots=1), queue_depth=3)
    for _ in range(4):
        one.submit(generation())
    with pytest.raises(QueueFull) as refused:
        one.submit(generation())
    assert (refused.value.waiting, refused.value.depth, refused.value.retry_after) == (4, 3, 8)
    assert refused.value.code == "queue_full"
    two = ModelScheduler("two", Recording(slots=2), queue_depth=2)
    for _ in range(4):
        two.submit(generation())
    with pytest.raises(QueueFull) as refused:
        two.submit(generation())
    assert refused.value.retry_after == 4  # twice the slots: half the wait
    assert str(refused.value) == (
        "model 'two' is busy: 4 request(s) already waiting for its 2 slot(s) "
        "(queue_depth 2); retry in 4 s"
    )
    one.stop(0)
    two.stop(0)


def test_running_requests_count_as_ahead_in_retry_after(
    engine: Recording, scheduler: ModelScheduler
) -> None:
    running = take_the_slots(engine, scheduler, tokens=1)
    waiting = [scheduler.submit(generation(tokens=1)) for _ in range(2)]
    snapshot = scheduler.snapshot()
    assert (snapshot["running"], snapshot["queued"]) == (2, 2)
    with pytest.raises(QueueFull) as refused:
        scheduler.submit(generation())
    assert refused.value.retry_after == 4  # 2 running + 2 waiting, x 2 s / 2 slots
    engine.hold.set()
    for job in [*running, *waiting]:
        outcome(job)


def test_a_cancelled_request_still_waiting_leaves_the_queue_at_once(
    engine: Recording, scheduler: ModelScheduler
) -> None:
    """Its client gone, a request waiting for a slot ends now (not when a slot frees),
    and its place in the queue is free for another."""
    running = take_the_slots(engine, scheduler, tokens=3)  # held mid-step: no slot frees
    waiting = [scheduler.submit(generation(tokens=1, prompt=5)) for _ in range(2)]
    with pytest.raises(QueueFull):
        scheduler.submit(generation())
    waiting[0].cancel()
    assert waiting[0].events.get(timeout=1) == Finished("cancelled", 5, 0)
    assert scheduler.snapshot()["queued"] == 1
    again = scheduler.submit(generation(tokens=1))  # the freed place
    engine.hold.set()
    for job in [*running, waiting[1], again]:
        assert outcome(job)[1].reason == "length"
    assert engine.admitted == [3, 3, 5, 3]  # the cancelled one never reached the engine


def test_retry_after_follows_recent_request_times_down_to_one_second(
    engine: Recording, scheduler: ModelScheduler
) -> None:
    scheduler.start()
    for _ in range(20):  # quick requests: the estimate falls from its first guess
        outcome(scheduler.submit(generation(tokens=1)))
    engine.hold.clear()
    held = [scheduler.submit(generation(tokens=1)) for _ in range(4)]
    with pytest.raises(QueueFull) as refused:
        scheduler.submit(generation())
    assert refused.value.retry_after == 1
    engine.hold.set()
    for job in held:
        outcome(job)
    assert scheduler.snapshot()["completed"] == 24


def test_a_request_cancelled_before_it_starts_ends_as_cancelled(
    engine: Recording, scheduler: ModelScheduler
) -> None:
    cancelled = scheduler.submit(generation(prompt=5))
    cancelled.cancel()
    after = scheduler.submit(generation(tokens=1, prompt=2))
    scheduler.start()
    assert outcome(cancelled) == ([], Finished("cancelled", 5, 0))
    assert not cancelled.started.is_set()
    assert outcome(after)[1] == Finished("length", 2, 1)  # the next one still runs
    assert engine.admitted == [2]


def test_cancel_and_settle_waits_for_the_workers_last_word(
    engine: Recording, scheduler: ModelScheduler
) -> None:
    scheduler.start()
    job = scheduler.submit(generation(tokens=10_000))
    assert job.started.wait(10)
    job.events.get(timeout=10)  # it is under way
    last = job.cancel_and_settle(timeout=0.9)
    assert isinstance(last, Finished) and last.reason == "cancelled"


@pytest.mark.timeout(10)
def test_cancel_and_settle_gives_up_when_the_worker_does_not_answer(
    engine: Recording, scheduler: ModelScheduler
) -> None:
    job, _ = take_the_slots(engine, scheduler, tokens=3)  # held mid-step: it cannot answer
    began = time.monotonic()
    assert job.cancel_and_settle(timeout=0.2) is None
    assert 0.15 < time.monotonic() - began < 2
    engine.hold.set()


def test_a_request_that_cannot_be_admitted_fails_alone(
    scheduler: ModelScheduler, caplog: pytest.LogCaptureFixture
) -> None:
    bad = scheduler.submit(generation(prompt=99))
    good = scheduler.submit(generation(tokens=1))
    with caplog.at_level(logging.ERROR, logger="appliance.serving.scheduler"):
        scheduler.start()
        assert outcome(bad) == (
            [],
            Failed("the model could not take the request: no room for this one"),
        )
        assert outcome(good)[1] == Finished("length", 3, 1)
    assert [r.getMessage() for r in caplog.records] == ["request could not be admitted"]
    assert scheduler.snapshot()["completed"] == 2


def test_an_engine_error_fails_the_running_requests_and_the_worker_goes_on(
    engine: Recording, scheduler: ModelScheduler, caplog: pytest.LogCaptureFixture
) -> None:
    engine.fail_next_step = True
    first = scheduler.submit(generation(tokens=5))
    with caplog.at_level(logging.ERROR, logger="appliance.serving.scheduler"):
        scheduler.start()
        assert outcome(first) == (
            [],
            Failed("internal error in the model worker: the engine broke"),
        )
    assert [r.getMessage() for r in caplog.records] == ["model worker error"]
    assert outcome(scheduler.submit(generation(tokens=1)))[1] == Finished("length", 3, 1)
    assert scheduler.snapshot()["alive"]


def test_stopping_ends_running_and_waiting_requests(
    engine: Recording, scheduler: ModelScheduler
) -> None:
    running = take_the_slots(engine, scheduler, tokens=5)
    waiting = scheduler.submit(generation(tokens=5))
    stopper = threading.Thread(target=scheduler.stop)
    stopper.start()
    engine.hold.set()
    stopper.join(10)
    for job in [*running, waiting]:
        events: list[Event] = []
        while True:
            try:
                events.append(job.events.get(timeout=1))
            except queue.Empty:
                break
        assert events[-1] == Failed(STOPPING)
    assert not waiting.started.is_set()
    assert not scheduler.running()
    assert not scheduler.snapshot()["alive"]
    with pytest.raises(Stopping) as refused:  # 503 with Retry-After, not a queue that hangs
        scheduler.submit(generation())
    assert (refused.value.code, refused.value.retry_after) == ("stopping", 5)
    assert str(refused.value) == (
        "model 'talk' is stopping with the appliance; retry in a few seconds"
    )


def test_stalled_names_a_dead_worker_and_a_request_without_progress(
    engine: Recording, scheduler: ModelScheduler
) -> None:
    assert scheduler.stalled(0) == "the worker of model 'talk' has stopped"  # never started
    scheduler.start()
    time.sleep(0.02)
    assert scheduler.stalled(0) is None  # idle is not stalled, however long
    engine.hold.clear()
    job = scheduler.submit(generation(tokens=3))
    assert job.started.wait(10)
    assert scheduler.snapshot()["busy"]  # one request running is busy
    assert scheduler.stalled(1000) is None  # busy, within the limit
    assert stall_reason(scheduler).startswith("model 'talk' has made no progress for ")
    engine.hold.set()
    outcome(job)
    assert scheduler.stalled(1000) is None  # progress noted after the step too


def test_admission_runs_slots_at_once_and_queues_depth_more() -> None:
    admission = Admission("embed", slots=1, depth=1)
    assert admission.snapshot() == {
        "busy": False,
        "running": 0,
        "queued": 0,
        "slots": 1,
        "queue_depth": 1,
        "completed": 0,
        "alive": True,
    }
    waited = threading.Event()

    def second() -> None:
        with admission:
            waited.set()

    with admission:
        snap = admission.snapshot()
        assert (snap["busy"], snap["running"], snap["queued"]) == (True, 1, 0)
        waiter = threading.Thread(target=second)
        waiter.start()
        deadline = time.monotonic() + 10
        while admission.snapshot()["queued"] != 1:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        assert not waited.is_set()  # one slot: the second waits for it
        snap = admission.snapshot()
        assert (snap["busy"], snap["running"], snap["queued"]) == (True, 1, 1)
        with pytest.raises(QueueFull) as refused:
            admission.__enter__()
        assert str(refused.value) == (
            "model 'embed' is busy: 1 request(s) already waiting for its 1 slot(s) "
            "(queue_depth 1); retry in 1 s"
        )
    waiter.join(10)
    assert waited.is_set()
    assert admission.snapshot() == {
        "busy": False,
        "running": 0,
        "queued": 0,
        "slots": 1,
        "queue_depth": 1,
        "completed": 2,
        "alive": True,
    }
