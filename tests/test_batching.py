"""Many streams at once on the real server: continuous batching gives each request the
same answer it gets alone, keeps its own sampling and grammar, reuses shared prompt
beginnings, frees a slot when its client leaves, lets a short answer pass a long one,
and refuses past the queue."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
from openai import OpenAI

from helpers import (
    Server,
    audit_pairs,
    audit_rows,
    give_up,
    make_state,
    metric,
    model_state,
    open_stream,
    start_server,
    wait_for,
)

pytestmark = pytest.mark.server

SLOTS = 4
SYSTEM = "You are a careful assistant on a hospital ward. Answer in plain words."
QUESTIONS = [
    "Tell me about the sea.",
    "How do I check a patient's pulse?",
    "Name three kinds of clouds.",
    "What is a thermometer for?",
    "Describe a quiet night shift.",
    "Why do we wash hands?",
]
LONG = {"max_tokens": 1500, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def state(tmp_path_factory: pytest.TempPathFactory, model_file: Path) -> Path:
    return make_state(tmp_path_factory.mktemp("batching") / "state", model_file)


@pytest.fixture(scope="module")
def server(state: Path) -> Iterator[Server]:
    server = start_server(state, "--parallel-streams", str(SLOTS), "--queue-depth", "2")
    yield server
    server.stop()


def sdk(server: Server) -> OpenAI:
    return OpenAI(base_url=f"{server.url}/v1", api_key=server.token, max_retries=0, timeout=120)


def messages(question: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]


def ask(server: Server, model: str, question: str, **params: Any) -> tuple[str, Any]:
    """One streamed answer through the SDK: its text and its usage."""
    chunks = list(
        sdk(server).chat.completions.create(
            model=model,
            messages=messages(question),  # type: ignore[arg-type]
            stream=True,
            stream_options={"include_usage": True},
            **params,
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks[-1].usage


def together(calls: list[Any]) -> list[Any]:
    """Run the calls at the same moment, one thread each; their results in order."""
    results: list[Any] = [None] * len(calls)
    errors: list[BaseException] = []
    gate = threading.Barrier(len(calls))

    def run(i: int) -> None:
        try:
            gate.wait(30)
            results[i] = calls[i]()
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    return results


def test_models_report_per_stream_context(server: Server, model_name: str) -> None:
    card = sdk(server).models.retrieve(model_name).model_dump()
    assert card["parallel_streams"] == SLOTS
    assert card["n_ctx"] == 2048  # context_size is per stream, whatever the load


def test_kv_cache_is_not_resident_until_used(server: Server, model_name: str) -> None:
    """llama.cpp clears the whole KV cache at start (every page resident); the engine
    gives the zero pages back, so memory follows the text the streams hold."""
    loaded = [
        json.loads(line)
        for line in server.stderr
        if '"model loaded"' in line and f'"model": "{model_name}"' in line
    ]
    assert loaded, server.stderr[-20:]
    # SmolLM2-135M: 30 layers, K and V of 192 f16 values per cell each.
    kv_mib = SLOTS * 2048 * 30 * 2 * 192 * 2 >> 20
    assert loaded[-1]["zero_pages_released_mib"] >= kv_mib


def test_batched_answers_equal_answers_alone(server: Server, model_name: str) -> None:
    batched_equals_alone(server, model_name)


@pytest.mark.parametrize("variant", ["haswell", "sse42"])
def test_batched_answers_equal_answers_alone_on_older_cpus_kernels(
    tmp_path: Path, model_file: Path, model_name: str, variant: str
) -> None:
    """The same promise on the kernels llama.cpp picks for older CPUs (AVX2 without
    AVX-512; SSE4.2 without AVX), whose dot products and batched products are other
    code than this CPU's: this CPU runs them too, chosen by cpu_kernels."""
    server = start_server(
        make_state(tmp_path / "state", model_file),
        "--parallel-streams",
        str(SLOTS),
        env={"APPLIANCE_CPU_KERNELS": variant},
    )
    try:
        described = server.http.get(f"/v1/models/{model_name}").json()
        assert described["kernels"]["variant"] == variant
        batched_equals_alone(server, model_name)
    finally:
        server.stop()


def batched_equals_alone(server: Server, model_name: str) -> None:
    greedy = {"max_tokens": 40, "temperature": 0}
    seeded = {"max_tokens": 40, "temperature": 0.9, "top_p": 0.9, "seed": 7}
    jobs = [(q, greedy if i % 2 == 0 else seeded) for i, q in enumerate(QUESTIONS)]
    alone = [ask(server, model_name, q, **p)[0] for q, p in jobs]
    steps_before = metric(server, "appliance_batch_steps_total", model=model_name)
    tokens_before = metric(server, "appliance_batch_tokens_total", model=model_name)
    sequences_before = metric(server, "appliance_batch_sequences_total", model=model_name)
    batched = together([lambda q=q, p=p: ask(server, model_name, q, **p)[0] for q, p in jobs])
    assert batched == alone
    assert all(alone)
    # Six requests on four slots: the steps carried more than one token each.
    steps = metric(server, "appliance_batch_steps_total", model=model_name) - steps_before
    tokens = metric(server, "appliance_batch_tokens_total", model=model_name) - tokens_before
    assert steps > 0 and tokens / steps > 1.5
    # And as many requests as ran in each step, never more than the slots.
    sequences = metric(server, "appliance_batch_sequences_total", model=model_name)
    sequences -= sequences_before
    assert 1.5 < sequences / steps <= SLOTS


def test_json_schema_batched_beside_free_text(server: Server, model_name: str) -> None:
    schema = {
        "type": "object",
        "properties": {"ward": {"type": "string"}, "beds": {"type": "integer"}},
        "required": ["ward", "beds"],
        "additionalProperties": False,
    }

    def structured() -> str:
        answer = sdk(server).chat.completions.create(
            model=model_name,
            messages=messages("Give the ward name and its number of beds as JSON."),  # type: ignore[arg-type]
            max_tokens=80,
            temperature=0.7,
            seed=3,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "ward", "schema": schema},
            },
        )
        return answer.choices[0].message.content or ""

    free = [
        lambda q=q: ask(server, model_name, q, max_tokens=60, temperature=0)[0]
        for q in QUESTIONS[:3]
    ]
    results = together([structured, *free])
    jsonschema.validate(json.loads(results[0]), schema)
    assert all(results[1:]) and not any(r.lstrip().startswith("{") for r in results[1:])


def test_shared_system_prompt_is_reused(server: Server, model_name: str) -> None:
    long_system = SYSTEM + " " + "Keep to the facts of the ward. " * 40
    first = sdk(server).chat.completions.create(
        model=model_name,
        messages=[
            {"role": "system", "content": long_system},
            {"role": "user", "content": "Hello."},
        ],
        max_tokens=4,
        temperature=0,
    )
    second = sdk(server).chat.completions.create(
        model=model_name,
        messages=[
            {"role": "system", "content": long_system},
            {"role": "user", "content": "Where is the pharmacy?"},
        ],
        max_tokens=4,
        temperature=0,
    )
    assert first.usage is not None and second.usage is not None
    assert second.usage.prompt_tokens_details is not None
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached is not None and cached > 200  # the system prompt, not read again
    assert cached < second.usage.prompt_tokens  # the new question is read


def _open_long_stream(
    server: Server, client: httpx.Client, model: str, system: str = SYSTEM
) -> Any:
    chat = [{"role": "system", "content": system}, {"role": "user", "content": "A story."}]
    return open_stream(server, client, {"model": model, "messages": chat, **LONG})


def test_beginning_held_by_a_busy_slot_is_copied(server: Server, model_name: str) -> None:
    system = "You answer questions from the night pharmacy. " + "Name the dose. " * 60
    with server.client() as client:
        ctx, _lines = _open_long_stream(server, client, model_name, system)
        answer = sdk(server).chat.completions.create(
            model=model_name,
            messages=[
                {"role": "system", "content": system},
                {"role": "user", "content": "Is the pharmacy open?"},
            ],
            max_tokens=4,
            temperature=0,
        )
        assert model_state(server.url, model_name)["running"] == 1  # the long one goes on
        ctx.__exit__(None, None, None)
    assert answer.usage is not None and answer.usage.prompt_tokens_details is not None
    assert (answer.usage.prompt_tokens_details.cached_tokens or 0) > 200


def test_short_answer_passes_a_long_one(server: Server, model_name: str) -> None:
    with server.client() as client:
        ctx, lines = _open_long_stream(server, client, model_name)
        started = time.monotonic()
        text, usage = ask(server, model_name, QUESTIONS[2], max_tokens=8, temperature=0)
        assert text and usage.completion_tokens <= 8
        # The long answer is still running: the short one did not wait for it.
        assert model_state(server.url, model_name)["running"] == 1
        assert time.monotonic() - started < 30
        next(lines)  # and the long one still streams
        ctx.__exit__(None, None, None)
    assert wait_for(lambda: model_state(server.url, model_name)["running"] == 0, 10)


def test_disconnect_frees_its_slot_for_a_waiting_request(server: Server, model_name: str) -> None:
    clients = [server.client() for _ in range(SLOTS)]
    try:
        streams = [_open_long_stream(server, c, model_name) for c in clients]
        assert model_state(server.url, model_name)["running"] == SLOTS
        waiting: list[Any] = []
        waiter = threading.Thread(
            target=lambda: waiting.append(
                ask(server, model_name, QUESTIONS[3], max_tokens=6, temperature=0)
            )
        )
        waiter.start()
        assert wait_for(lambda: model_state(server.url, model_name)["queued"] == 1, 10)
        streams[0][0].__exit__(None, None, None)  # one client goes away
        waiter.join(60)  # its slot goes to the waiting request, the others keep theirs
        assert waiting and waiting[0][0]
        assert model_state(server.url, model_name)["running"] == SLOTS - 1
        for ctx, lines in streams[1:]:
            next(lines)
            ctx.__exit__(None, None, None)
    finally:
        for c in clients:
            c.close()
    assert wait_for(lambda: model_state(server.url, model_name)["running"] == 0, 10)


def test_a_plain_answer_stops_when_its_client_hangs_up(
    server: Server, state: Path, model_name: str
) -> None:
    """A non-streamed answer is written only when whole, so its client's leaving is
    seen on the connection, not by a failed write: the model stops (its slot is free
    long before 1500 tokens would be), and the request is recorded as 499
    client_disconnected, with what was made, in its audit record, log line and metrics."""
    body = {"model": model_name, "messages": messages(QUESTIONS[0]), **LONG}
    before = metric(
        server, "appliance_requests_total", 0.0, route="/v1/chat/completions", status="499"
    )
    give_up(server, body)
    # 1500 tokens take a 2-core box over ten seconds (the client leaves at 2 s): freed in
    # five, the model stopped. (A box that makes them in 2 s needs a longer answer here.)
    assert wait_for(lambda: model_state(server.url, model_name)["running"] == 0, 5)
    assert wait_for(lambda: any(r.get("status") == 499 for r in server.request_logs()), 10)
    line = next(r for r in server.request_logs() if r.get("status") == 499)
    assert line["client_disconnected"] is True and line["finish_reason"] == "cancelled", line
    made = line["completion_tokens"]
    assert isinstance(made, int) and 0 < made < LONG["max_tokens"], line
    rid = str(line["request_id"])
    _, outcome = audit_pairs(state, [rid])[rid]
    assert outcome["status"] == 499 and outcome["error_type"] == "client_disconnected", outcome
    assert outcome["finish_reason"] == "cancelled" and outcome["content"]["output"], outcome
    after = metric(server, "appliance_requests_total", route="/v1/chat/completions", status="499")
    assert after == before + 1


def test_past_slots_and_queue_gives_503(server: Server, model_name: str) -> None:
    clients = [server.client() for _ in range(SLOTS + 2)]
    try:
        streams = [_open_long_stream(server, c, model_name) for c in clients[:SLOTS]]
        queued = [
            c.stream(
                "POST",
                f"{server.url}/v1/chat/completions",
                json={"model": model_name, "messages": messages("Hi."), "stream": True, **LONG},
            )
            for c in clients[SLOTS:]
        ]
        for q in queued:
            assert q.__enter__().status_code == 200
        state = model_state(server.url, model_name)
        assert (state["running"], state["queued"]) == (SLOTS, 2)
        refused = server.http.post(
            "/v1/chat/completions",
            timeout=10,
            json={"model": model_name, "messages": messages("Hi."), "max_tokens": 4},
        )
        assert refused.status_code == 503 and int(refused.headers["Retry-After"]) >= 1
        assert refused.json()["error"]["code"] == "queue_full"
        assert metric(server, "appliance_busy_slots", model=model_name) == SLOTS
        for ctx, _ in streams:
            ctx.__exit__(None, None, None)
        for q in queued:
            q.__exit__(None, None, None)
    finally:
        for c in clients:
            c.close()
    assert wait_for(lambda: model_state(server.url, model_name)["busy"] is False, 15)


def test_every_batched_stream_has_its_audit_pair(
    server: Server, state: Path, model_name: str
) -> None:
    def streamed(question: str) -> tuple[str, str]:
        with server.http.stream(
            "POST",
            "/v1/chat/completions",
            timeout=120,
            json={
                "model": model_name,
                "messages": messages(question),
                "max_tokens": 24,
                "temperature": 0,
                "stream": True,
            },
        ) as resp:
            text = "".join(
                json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
                for line in resp.iter_lines()
                if line.startswith("data: {") and '"choices":[{' in line
            )
            return resp.headers["X-Request-Id"], text

    answers = together([lambda q=q: streamed(q) for q in QUESTIONS[:SLOTS]])
    rows: list[dict[str, Any]] = []

    def exported_all() -> bool:
        # A stream's outcome record is written as it closes, after its last byte.
        rows[:] = audit_rows(state)
        done = {r["request_id"] for r in rows if r["kind"] == "outcome"}
        return all(request_id in done for request_id, _ in answers)

    assert wait_for(exported_all, 30, interval=0.5)
    for request_id, text in answers:
        pair = [r for r in rows if r["request_id"] == request_id]
        assert [r["kind"] for r in pair] == ["request", "outcome"]
        assert pair[1]["status"] == 200 and pair[1]["content"]["output"] == text
