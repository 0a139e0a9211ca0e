"""The model garden's scheduling and the pipeline, on fake engines (tests/fakes.py):
load on demand, keep-alive, least-recently-used eviction within the memory budget,
pinned and busy models kept, one load for many waiting requests, refusals. Seconds,
no GGUF; the real models go through the same paths in test_garden.py."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import text

from appliance.app import close_app, create_app
from appliance.audit.reader import records
from appliance.audit.store import AuditStore, AuditUnavailable
from appliance.config import Settings
from appliance.context import RequestContext
from appliance.engines.base import Generation, SamplingParams
from appliance.inference import get_pipeline
from appliance.inference.pipeline import ChatAsk
from appliance.problems import Unavailable
from appliance.serving.models import ChatModel
from appliance.serving.pool import (
    Lease,
    ModelPool,
    ModelUnavailable,
    NoRoom,
    UnknownModel,
    WrongKind,
)
from appliance.serving.scheduler import ModelScheduler, QueueFull

from fakes import FakeChatEngine, FakeLoader, file_sha256, garden
from helpers import admin_token, wait_for

CHAT = {"kind": "chat"}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def open_pool(settings: Settings, loader: FakeLoader, clock: Clock | None = None) -> ModelPool:
    pool = ModelPool(settings, loader, clock or time.monotonic)
    pool.open()
    return pool


def states(pool: ModelPool) -> dict[str, str]:
    return {row["name"]: row["state"] for row in pool.state()}


def use(pool: ModelPool, name: str, kind: str | None = None) -> None:
    pool.acquire(name, kind).release()


@pytest.fixture
def three(tmp_path: Path) -> tuple[Settings, FakeLoader]:
    """Three chat models of 40 MiB each in a 100 MiB budget: two fit at once."""
    settings = garden(tmp_path, {"a": CHAT, "b": CHAT, "c": CHAT}, memory_limit_mb=100)
    return settings, FakeLoader({"a": 40, "b": 40, "c": 40})


def test_a_model_loads_on_its_first_request(three: tuple[Settings, FakeLoader]) -> None:
    settings, loader = three
    pool = open_pool(settings, loader)
    try:
        assert states(pool) == {"a": "unloaded", "b": "unloaded", "c": "unloaded"}
        assert loader.loads == []
        lease = pool.acquire("a", "chat")
        assert lease.loaded_now and states(pool)["a"] == "ready"
        lease.release()
        again = pool.acquire("a", "chat")
        assert not again.loaded_now and loader.loads == ["a"]  # loaded once
        again.release()
        assert pool.budget_state()["used_bytes"] == 40 << 20
    finally:
        pool.close()


def test_the_least_recently_used_idle_model_makes_room(
    three: tuple[Settings, FakeLoader],
) -> None:
    settings, loader = three
    clock = Clock()
    pool = open_pool(settings, loader, clock)
    try:
        use(pool, "a")
        clock.now += 1
        use(pool, "b")
        clock.now += 1
        use(pool, "a")  # a is now more recent than b
        clock.now += 1
        use(pool, "c")  # needs room: b goes, not a
        assert states(pool) == {"a": "ready", "b": "unloaded", "c": "ready"}
        assert loader.closed == ["b"]
        clock.now += 1
        use(pool, "b")  # and back: a is now the least recent
        assert states(pool) == {"a": "unloaded", "b": "ready", "c": "ready"}
        assert loader.loads == ["a", "b", "c", "b"]
        rows = {r["name"]: r for r in pool.state()}
        assert rows["b"]["loads"] == 2 and rows["b"]["unloads"] == 1
    finally:
        pool.close()


def test_a_busy_model_is_not_unloaded_for_another(three: tuple[Settings, FakeLoader]) -> None:
    settings, loader = three
    pool = open_pool(settings, loader)
    try:
        held_a = pool.acquire("a")
        held_b = pool.acquire("b")
        with pytest.raises(NoRoom) as refused:
            pool.acquire("c", wait=0.5)
        problem = refused.value
        assert problem.retry_after == 5 and problem.code == "insufficient_memory"
        assert "needs about 40 MiB" in problem.message
        assert "a (40 MiB, 1 request(s))" in problem.message
        assert states(pool)["c"] == "unloaded"  # nothing lost: it may load later
        held_a.release()
        use(pool, "c")  # a is idle now: it makes room
        assert states(pool) == {"a": "unloaded", "b": "ready", "c": "ready"}
        held_b.release()
    finally:
        pool.close()


def test_a_pinned_model_stays_and_loads_at_start(tmp_path: Path) -> None:
    settings = garden(
        tmp_path,
        {"p": {"kind": "chat", "serve": {"pinned": True}}, "a": CHAT},
        memory_limit_mb=100,
    )
    loader = FakeLoader({"p": 60, "a": 50})
    clock = Clock()
    pool = open_pool(settings, loader, clock)
    try:
        assert loader.loads == ["p"] and states(pool)["p"] == "ready" and pool.ready
        with pytest.raises(NoRoom, match=r"p \(60 MiB, pinned\)"):
            pool.acquire("a")
        clock.now += 10_000  # far past any keep-alive
        assert pool.reap() == [] and states(pool)["p"] == "ready"
    finally:
        pool.close()


def test_keep_alive_unloads_an_idle_model(tmp_path: Path) -> None:
    settings = garden(
        tmp_path,
        {
            "short": {"kind": "chat", "serve": {"keep_alive": 10}},
            "forever": {"kind": "chat", "serve": {"keep_alive": -1}},
            "pinned": {"kind": "chat", "serve": {"pinned": True, "keep_alive": 1}},
        },
        memory_limit_mb=1000,
    )
    clock = Clock()
    pool = open_pool(settings, FakeLoader({}), clock)
    try:
        use(pool, "short")
        use(pool, "forever")
        held = pool.acquire("short")
        clock.now += 11
        assert pool.reap() == []  # in use: kept however long it has been
        held.release()
        clock.now += 9
        assert pool.reap() == []  # idle 9 s of 10
        clock.now += 2
        assert pool.reap() == ["short"]
        clock.now += 10_000
        assert pool.reap() == []
        assert states(pool) == {"forever": "ready", "pinned": "ready", "short": "unloaded"}
    finally:
        pool.close()


def test_keep_alive_zero_unloads_after_each_request(tmp_path: Path) -> None:
    settings = garden(tmp_path, {"once": {"kind": "chat", "serve": {"keep_alive": 0}}})
    loader = FakeLoader({})
    pool = open_pool(settings, loader)
    try:
        use(pool, "once")
        assert states(pool)["once"] == "unloaded" and loader.closed == ["once"]
    finally:
        pool.close()


def test_many_first_requests_share_one_load(three: tuple[Settings, FakeLoader]) -> None:
    settings, _ = three
    loader = FakeLoader({"a": 40}, delay=1.0)  # long enough for all six to be waiting
    pool = open_pool(settings, loader)
    leases: list[Lease] = []
    try:
        threads = [
            threading.Thread(target=lambda: leases.append(pool.acquire("a"))) for _ in range(6)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        assert loader.loads == ["a"] and len(leases) == 6
        assert all(lease.loaded_now for lease in leases)  # each waited for the load
        assert next(r for r in pool.state() if r["name"] == "a")["in_use"] == 6
    finally:
        for lease in leases:
            lease.release()
        pool.close()


def test_a_request_waits_for_a_load_no_longer_than_asked(
    three: tuple[Settings, FakeLoader],
) -> None:
    settings, _ = three
    pool = open_pool(settings, FakeLoader({"a": 40}, delay=1.0))
    try:
        loading = threading.Thread(target=lambda: use(pool, "a"))
        loading.start()
        assert wait_for(lambda: states(pool)["a"] == "loading", 5)
        with pytest.raises(ModelUnavailable, match=r"not ready yet \(loading\)") as waited:
            pool.acquire("a", wait=0.1)
        assert waited.value.retry_after == 5
        loading.join(5)
        use(pool, "a")
    finally:
        pool.close()


def test_a_model_that_fails_to_load_is_refused_with_its_reason(tmp_path: Path) -> None:
    settings = garden(tmp_path, {"bad": CHAT, "good": CHAT})
    pool = open_pool(settings, FakeLoader({}, fail=frozenset({"bad"})))
    try:
        with pytest.raises(ModelUnavailable, match="failed to load: the fake file is corrupt"):
            pool.acquire("bad")
        assert states(pool)["bad"] == "refused" and pool.budget_state()["used_bytes"] == 0
        with pytest.raises(ModelUnavailable, match="failed to load"):
            pool.acquire("bad")  # refused stays refused
        use(pool, "good")  # the others are unaffected
    finally:
        pool.close()


def test_lookup_refusals_name_the_model_and_its_kind(tmp_path: Path) -> None:
    settings = garden(tmp_path, {"talk": CHAT, "vec": {"kind": "embedding"}})
    pool = open_pool(settings, FakeLoader({}))
    try:
        with pytest.raises(UnknownModel, match="'ghost' does not exist; available: talk, vec"):
            pool.acquire("ghost")
        with pytest.raises(WrongKind) as wrong:
            pool.acquire("vec", "chat")
        assert "is an embedding model (kind embedding)" in wrong.value.message
        assert "/v1/embeddings" in wrong.value.message
        with pytest.raises(WrongKind, match="is a chat model"):
            pool.acquire("talk", "embedding")
        assert pool.state() and all(r["state"] == "unloaded" for r in pool.state())
    finally:
        pool.close()


def test_a_model_that_can_never_fit_is_refused_at_start(tmp_path: Path) -> None:
    settings = garden(tmp_path, {"huge": CHAT}, memory_limit_mb=100)
    pool = open_pool(settings, FakeLoader({"huge": 150}))
    try:
        reason = pool.refused()["huge"]
        assert "needs about 150 MiB" in reason and "memory_limit_mb 100" in reason
    finally:
        pool.close()


def test_a_file_changed_after_verification_is_hashed_again(tmp_path: Path) -> None:
    settings = garden(tmp_path, {"a": CHAT})
    pool = open_pool(settings, FakeLoader({}))
    try:
        path = settings.models_path / "a.gguf"
        path.write_bytes(b"swapped in after the start")
        with pytest.raises(ModelUnavailable, match=r"has sha256 .*, expected"):
            pool.acquire("a")
        assert states(pool)["a"] == "refused"
    finally:
        pool.close()


def test_a_missing_catalogue_model_is_not_listed_and_not_fatal(tmp_path: Path) -> None:
    settings = garden(tmp_path, {"p": {"kind": "chat", "serve": {"pinned": True}}, "gone": CHAT})
    (settings.models_path / "gone.gguf").unlink()
    pool = open_pool(settings, FakeLoader({}))
    try:
        assert pool.ready and pool.names() == ["p"]
        assert "is missing" in pool.refused()["gone"]
        (settings.models_path / "p.gguf").write_bytes(b"tampered")
        tampered = open_pool(settings, FakeLoader({}))
        assert not tampered.ready and "has sha256" in tampered.not_ready_reasons()[0]
        tampered.close()
    finally:
        pool.close()


# -- the pipeline, through the real Flask app and a real audit log on fakes --------


@pytest.fixture
def fake_app(tmp_path: Path) -> Iterator[tuple[Flask, FakeLoader]]:
    settings = garden(
        tmp_path,
        {
            "talk": {"kind": "chat", "serve": {"pinned": True}},
            "other": CHAT,
            "vec": {"kind": "embedding"},
        },
        memory_limit_mb=100,
    )
    loader = FakeLoader({"talk": 40, "other": 40, "vec": 40})
    app = create_app(settings, loader)
    yield app, loader
    close_app(app)


def post_stream(client: FlaskClient, model: str, content: str = "a", **extra: Any) -> Any:
    """A streamed chat completion, unbuffered: its chunks are read as they come."""
    return client.post(
        "/v1/chat/completions",
        json={
            "model": model,
            "messages": [{"role": "user", "content": content}],
            "stream": True,
            **extra,
        },
        buffered=False,
    )


def client_of(app: Flask) -> FlaskClient:
    settings: Settings = app.config["APPLIANCE_SETTINGS"]
    client = app.test_client()
    client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {admin_token(settings.state_dir)}"
    return client


def audit_rows(app: Flask) -> list[dict[str, Any]]:
    store: AuditStore = app.extensions["appliance.audit"]
    with store.engine.connect() as conn:
        rows = conn.execute(text("SELECT * FROM audit_records ORDER BY seq"))
        return [dict(r._mapping) for r in rows]


def test_chat_loads_on_demand_and_is_audited(fake_app: tuple[Flask, FakeLoader]) -> None:
    app, loader = fake_app
    client = client_of(app)
    assert client.get("/readyz").status_code == 200  # the pinned one is ready
    resp = client.post(
        "/v1/chat/completions",
        json={
            "model": "other",
            "messages": [{"role": "user", "content": "a b c"}],
            "max_tokens": 3,
        },
    )
    assert resp.status_code == 200, resp.data
    assert resp.get_json()["choices"][0]["message"]["content"] == "alpha beta gamma "
    assert loader.loads == ["talk", "other"]
    rows = audit_rows(app)
    loads = [r for r in rows if r["route"] == "models" and r["method"] == "LOAD"]
    assert [r["model"] for r in loads] == ["talk", "other"]
    request_id = resp.headers["X-Request-Id"]
    pair = [r["kind"] for r in rows if r["request_id"] == request_id]
    assert pair == ["request", "outcome"]
    outcome = next(r for r in rows if r["request_id"] == request_id and r["kind"] == "outcome")
    assert outcome["completion_tokens"] == 3 and outcome["finish_reason"] == "length"
    metrics = client.get("/metrics").get_data(as_text=True)
    assert 'appliance_model_loads_total{model="other"} 1.0' in metrics
    assert 'appliance_model_state{kind="chat",model="other",state="ready"} 1.0' in metrics
    assert 'appliance_model_memory_bytes{model="other"} 4.194304e+07' in metrics


def test_wrong_kind_is_400_naming_the_kind(fake_app: tuple[Flask, FakeLoader]) -> None:
    app, loader = fake_app
    client = client_of(app)
    chat = client.post(
        "/v1/chat/completions",
        json={"model": "vec", "messages": [{"role": "user", "content": "x"}]},
    )
    assert chat.status_code == 400
    error = chat.get_json()["error"]
    assert error["code"] == "wrong_model_kind" and "embedding model" in error["message"]
    embed = client.post("/v1/embeddings", json={"model": "talk", "input": "x"})
    assert embed.status_code == 400 and "is a chat model" in embed.get_json()["error"]["message"]
    v2 = client.post("/v2/models/talk/infer", json={"inputs": []})
    assert v2.status_code == 400 and "chat model" in v2.get_json()["error"]
    assert loader.loads == ["talk"]  # nothing loaded for a request of the wrong kind


def test_no_room_is_503_with_retry_after(fake_app: tuple[Flask, FakeLoader]) -> None:
    app, _ = fake_app
    client = client_of(app)
    pool = app.extensions["appliance.models"]
    held = pool.acquire("other")  # talk (pinned) + other (busy) fill the 100 MiB
    try:
        resp = client.post("/v1/embeddings", json={"model": "vec", "input": "x"})
        assert resp.status_code == 503 and resp.headers["Retry-After"] == "5"
        assert resp.get_json()["error"]["code"] == "insufficient_memory"
    finally:
        held.release()
    resp = client.post("/v1/embeddings", json={"model": "vec", "input": "x"})
    assert resp.status_code == 200
    assert {r["name"]: r["state"] for r in pool.state()}["other"] == "unloaded"


def test_a_stream_holds_its_model_until_it_ends(fake_app: tuple[Flask, FakeLoader]) -> None:
    app, _ = fake_app
    client = client_of(app)
    pool = app.extensions["appliance.models"]
    resp = post_stream(client, "other", max_tokens=5)
    chunks = iter(resp.response)
    while not next(chunks).startswith(b"data: "):  # past the loading comments: under way
        pass
    in_use = {r["name"]: r["in_use"] for r in pool.state()}
    assert in_use["other"] == 1
    with pytest.raises(NoRoom):  # other is busy: vec cannot push it out
        pool.acquire("vec", wait=0.2)
    body = b"".join(chunks)
    resp.close()
    assert body.endswith(b"data: [DONE]\n\n")
    assert {r["name"]: r["in_use"] for r in pool.state()}["other"] == 0


def test_a_stage_plugs_in_between_resolve_and_prepare(
    fake_app: tuple[Flask, FakeLoader],
) -> None:
    """Grounding is a stage: it sees the resolved model and the ask, gives the ask on
    (changed), and can refuse, without a blueprint knowing."""
    app, _ = fake_app
    seen: list[tuple[str | None, str]] = []

    def stage(ctx: RequestContext, ask: ChatAsk, lease: Lease) -> ChatAsk:
        seen.append((ctx.model, lease.manifest.kind))
        assert ask.messages is not None
        if ask.messages[0]["content"] == "refuse":
            raise Unavailable("the stage refused", code="stage_refused")
        # What it gives on is what the model reads (grounding adds its sources so).
        added = {"role": "system", "content": "one two three"}
        return replace(ask, messages=[added, *ask.messages])

    get_pipeline(app).stages.append(stage)
    client = client_of(app)
    ok = client.post(
        "/v1/chat/completions",
        json={"model": "talk", "messages": [{"role": "user", "content": "a"}], "max_tokens": 1},
    )
    assert ok.status_code == 200 and seen == [("talk", "chat")]
    assert ok.get_json()["usage"]["prompt_tokens"] == 4  # "one two three" and "a"
    refused = client.post(
        "/v1/chat/completions",
        json={"model": "talk", "messages": [{"role": "user", "content": "refuse"}]},
    )
    assert refused.status_code == 503 and refused.get_json()["error"]["code"] == "stage_refused"


def test_embedding_limits_are_clear_400s(fake_app: tuple[Flask, FakeLoader]) -> None:
    app, _ = fake_app
    client = client_of(app)

    def error(body: dict[str, Any]) -> dict[str, Any]:
        resp = client.post("/v1/embeddings", json={"model": "vec", **body})
        assert resp.status_code == 400, resp.data
        return dict(resp.get_json()["error"])

    long = error({"input": ["ok", "x " * 20]})
    assert long["param"] == "input[1]" and "22 tokens" in long["message"]
    assert "at most 16 tokens" in long["message"]
    many = error({"input": ["x"] * 257})
    assert "257 items" in many["message"] and "at most 256" in many["message"]
    ids = error({"input": [5, 1000]})
    assert "token id 1000" in ids["message"] and "0 to 999" in ids["message"]
    dims = error({"input": "x", "dimensions": 4})
    assert dims["param"] == "dimensions" and "8-dimensional" in dims["message"]
    assert error({"input": []})["param"] == "input"
    assert error({"input": "x", "encoding_format": "int8"})["param"] == "encoding_format"


# -- a stream whose model must load first ------------------------------------------


@pytest.fixture
def slow_app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Flask, FakeLoader]]:
    from appliance.api import streams

    monkeypatch.setattr(streams, "LOADING_KEEPALIVE_SECONDS", 0.1)
    settings = garden(tmp_path, {"talk": {"kind": "chat", "serve": {"pinned": True}}, "slow": CHAT})
    loader = FakeLoader({}, delay=0.6)
    app = create_app(settings, loader)
    yield app, loader
    close_app(app)


def stream_lines(client: FlaskClient, content: str) -> tuple[Any, list[bytes]]:
    resp = post_stream(client, "slow", content, max_tokens=2)
    assert resp.status_code == 200
    return resp, list(resp.response)


def test_a_stream_keeps_the_client_company_while_its_model_loads(
    slow_app: tuple[Flask, FakeLoader],
) -> None:
    app, _ = slow_app
    client = client_of(app)
    resp, chunks = stream_lines(client, "a b")
    resp.close()
    body = b"".join(chunks)
    assert body.startswith(b": loading model slow\n\n")
    assert body.count(b": loading model slow") >= 3  # one every 0.1 s of a 0.6 s load
    assert b'"content":"alpha "' in body and body.endswith(b"data: [DONE]\n\n")
    rows = [r for r in audit_rows(app) if r["request_id"] == resp.headers["X-Request-Id"]]
    assert [(r["kind"], r["status"]) for r in rows] == [("request", None), ("outcome", 200)]
    assert rows[1]["completion_tokens"] == 2


def test_a_problem_found_after_the_load_ends_the_stream_in_openai_shape(
    slow_app: tuple[Flask, FakeLoader],
) -> None:
    app, _ = slow_app
    client = client_of(app)
    resp, chunks = stream_lines(client, "word " * 70)  # the fake's window is 64 tokens
    resp.close()
    body = b"".join(chunks)
    last = json.loads(body.strip().split(b"\n\n")[-1].removeprefix(b"data: "))
    assert last["error"]["code"] == "context_length_exceeded"
    assert "70 tokens" in last["error"]["message"]
    [event] = [r for r in audit_rows(app) if r["request_id"] == resp.headers["X-Request-Id"]]
    assert event["kind"] == "event" and event["status"] == 400
    assert event["error_type"] == "context_length_exceeded"
    metrics = client.get("/metrics").get_data(as_text=True)
    assert 'route="/v1/chat/completions",status="400"' in metrics


def test_a_client_that_leaves_during_the_load_frees_the_model(
    slow_app: tuple[Flask, FakeLoader],
) -> None:
    app, _ = slow_app
    client = client_of(app)
    resp = post_stream(client, "slow", max_tokens=50)
    first = next(iter(resp.response))
    assert first.startswith(b": loading")
    resp.close()  # the client hangs up while the model loads
    pool = app.extensions["appliance.models"]
    row = next(r for r in pool.state() if r["name"] == "slow")
    assert row["state"] == "ready" and row["in_use"] == 0
    rows = [r for r in audit_rows(app) if r["request_id"] == resp.headers["X-Request-Id"]]
    assert [r["kind"] for r in rows] == ["request", "outcome"]
    assert rows[1]["error_type"] == "client_disconnected"
    assert rows[1]["finish_reason"] == "cancelled"


# -- what went wrong once: the review's cases ---------------------------------------


def test_an_unload_that_fails_still_makes_room(three: tuple[Settings, FakeLoader]) -> None:
    settings, loader = three
    clock = Clock()
    pool = open_pool(settings, loader, clock)
    try:
        use(pool, "a")
        clock.now += 1
        use(pool, "b")
        broken = pool.loaded()["a"]
        assert isinstance(broken, ChatModel)

        def fail() -> None:
            raise RuntimeError("the engine would not close")

        broken.engine.close = fail  # type: ignore[method-assign]
        clock.now += 1
        use(pool, "c")  # a must go; its close fails; c loads all the same
        assert states(pool) == {"a": "unloaded", "b": "ready", "c": "ready"}
        assert pool.budget_state()["used_bytes"] == 80 << 20
    finally:
        pool.close()


def test_an_answer_that_cannot_be_recorded_lets_its_model_go(
    fake_app: tuple[Flask, FakeLoader], monkeypatch: pytest.MonkeyPatch
) -> None:
    app, _ = fake_app
    client = client_of(app)
    store: AuditStore = app.extensions["appliance.audit"]
    real_commit = store.commit
    assert client.post("/v1/embeddings", json={"model": "vec", "input": "x"}).status_code == 200

    def down_once(records: list[Any], timeout: float | None = None) -> list[int]:
        monkeypatch.setattr(store, "commit", real_commit)
        raise AuditUnavailable("the disk is full")

    monkeypatch.setattr(store, "commit", down_once)
    refused = client.post("/v1/embeddings", json={"model": "vec", "input": "x"})
    assert refused.status_code == 503
    assert refused.get_json()["error"]["code"] == "audit_unavailable"
    pool = app.extensions["appliance.models"]
    assert {r["name"]: r["in_use"] for r in pool.state()}["vec"] == 0
    assert client.post("/v1/embeddings", json={"model": "vec", "input": "x"}).status_code == 200


def test_a_stream_refused_after_its_record_was_queued_gets_its_outcome(
    slow_app: tuple[Flask, FakeLoader], monkeypatch: pytest.MonkeyPatch
) -> None:
    app, _ = slow_app

    def full(self: ModelScheduler, generation: Any) -> Any:
        raise QueueFull(self.name, 0, 7, 2, 7)

    monkeypatch.setattr(ModelScheduler, "submit", full)
    resp, chunks = stream_lines(client_of(app), "a")
    resp.close()
    last = json.loads(b"".join(chunks).strip().split(b"\n\n")[-1].removeprefix(b"data: "))
    assert last["error"]["code"] == "queue_full"
    rows = [r for r in audit_rows(app) if r["request_id"] == resp.headers["X-Request-Id"]]
    assert [(r["kind"], r["status"]) for r in rows] == [("request", None), ("outcome", 503)]


def test_a_stream_that_cannot_get_room_is_a_plain_503(fake_app: tuple[Flask, FakeLoader]) -> None:
    app, _ = fake_app
    client = client_of(app)
    pool = app.extensions["appliance.models"]
    held = pool.acquire("vec")  # talk (pinned) + vec (busy) hold 80 of 100 MiB
    try:
        resp = client.post(
            "/v1/chat/completions",
            json={"model": "other", "messages": [{"role": "user", "content": "a"}], "stream": True},
        )
        assert resp.status_code == 503 and resp.headers["Retry-After"] == "5"
        assert resp.get_json()["error"]["code"] == "insufficient_memory"
    finally:
        held.release()


def test_a_plain_mistake_loads_nothing(fake_app: tuple[Flask, FakeLoader]) -> None:
    app, loader = fake_app
    client = client_of(app)
    assert client.post("/v1/embeddings", json={"model": "vec", "input": []}).status_code == 400
    assert (
        client.post("/v1/embeddings", json={"model": "vec", "input": ["a", ""]}).status_code == 400
    )
    chat = client.post(
        "/v1/chat/completions",
        json={
            "model": "other",
            "messages": [{"role": "user", "content": "a"}],
            "max_tokens": 10**6,
            "stream": True,
        },
    )
    assert chat.status_code == 400 and chat.get_json()["error"]["param"] == "max_tokens"
    assert loader.loads == ["talk"]  # only the pinned one, at start


def test_deeply_nested_json_is_a_400(fake_app: tuple[Flask, FakeLoader]) -> None:
    app, _ = fake_app
    client = client_of(app)
    deep = "[" * 100_000 + "]" * 100_000
    for path in ("/v1/embeddings", "/v1/chat/completions", "/v2/models/talk/infer"):
        resp = client.post(path, data=deep, content_type="application/json")
        assert resp.status_code == 400, (path, resp.status_code, resp.data[:200])
    nested = '{"model": "vec", "input": ' + "[" * 900 + "]" * 900 + "}"
    resp = client.post("/v1/embeddings", data=nested, content_type="application/json")
    assert resp.status_code == 400, resp.data[:300]


# -- specialists: a base chat model with adapters ----------------------------------


def specialist_toml(name: str, base: str, adapters: str = "", extra: str = "") -> str:
    return f'name = "{name}"\nkind = "specialist"\nbase = "{base}"\n{extra}\n{adapters}\n'


def adapter_fields(base: str, base_sha: str | None = None) -> dict[str, Any]:
    sha = base_sha or file_sha256(base)
    return {
        "kind": "adapter",
        "toml": f'[adapter]\nbase = "{base}"\nbase_sha256 = "{sha}"\nrank = 4\nalpha = 8\n',
    }


WARD = '[[adapters]]\nname = "ward-lora"\nscale = 0.5\n'


@pytest.fixture
def ward_app(tmp_path: Path) -> Iterator[tuple[Flask, FakeLoader]]:
    settings = garden(
        tmp_path,
        {
            "talk": {"kind": "chat", "serve": {"pinned": True}},
            "ward-lora": adapter_fields("talk"),
            "ward": {
                "kind": "specialist",
                "toml": specialist_toml(
                    "ward",
                    "talk",
                    WARD,
                    'system_prompt = "you are on the ward"\nroles = ["admin", "clinician"]\n'
                    "[sampling]\ntemperature = 0.2\nmax_tokens = 3",
                ),
            },
            "line-only": {
                "kind": "specialist",
                "toml": specialist_toml("line-only", "talk", WARD, 'roles = ["line"]'),
            },
        },
        memory_limit_mb=100,
    )
    loader = FakeLoader({"talk": 40, "ward": 10, "line-only": 10})
    app = create_app(settings, loader)
    yield app, loader
    close_app(app)


def test_a_specialist_holds_its_base_and_answers_with_its_own_engine(
    ward_app: tuple[Flask, FakeLoader],
) -> None:
    app, _ = ward_app
    client = client_of(app)
    pool = app.extensions["appliance.models"]
    resp = client.post(
        "/v1/chat/completions",
        json={"model": "ward", "messages": [{"role": "user", "content": "a b"}]},
    )
    assert resp.status_code == 200, resp.data
    # Its own engine (the fake's specialist words run backwards), its sampling default
    # (max_tokens 3), its system prompt read before the question (5 + 2 tokens).
    assert resp.get_json()["choices"][0]["message"]["content"] == "theta eta zeta "
    assert resp.get_json()["usage"]["prompt_tokens"] == 7
    rows = {r["name"]: r for r in pool.state()}
    assert rows["ward"]["state"] == "ready" and rows["talk"]["in_use"] == 1  # held by ward
    assert rows["ward"]["adapters"] == [
        {"name": "ward-lora", "sha256": file_sha256("ward-lora", "adapter"), "scale": 0.5}
    ]
    # The audit record names the specialist, its base and each adapter by hash and scale.
    [request] = [
        r
        for r in audit_rows(app)
        if r["request_id"] == resp.headers["X-Request-Id"] and r["kind"] == "request"
    ]
    assert request["model"] == "ward" and len(request["model_sha256"]) == 64
    assert request["model_sha256"] != file_sha256("talk")  # the recipe's, not the base's
    store: AuditStore = app.extensions["appliance.audit"]
    [decrypted] = [r for r in records(store) if r["seq"] == request["seq"]]
    served = decrypted["content"]["served_by"]
    assert served["base_sha256"] == file_sha256("talk")
    assert served["adapters"][0]["scale"] == 0.5 and served["sha256"] == request["model_sha256"]
    # What the model is given beside the request is part of what answered.
    assert served["system_prompt_sha256"] == hashlib.sha256(b"you are on the ward").hexdigest()
    assert served["sampling"] == {"temperature": 0.2, "top_p": None, "max_tokens": 3}
    pool.reap()  # nothing due yet; then unloading the specialist lets its base go
    lease = pool.acquire("ward")
    lease.release()
    with pool._lock:  # the test makes it due without waiting its 300 s
        pool._entries["ward"].last_used -= 10_000
    assert pool.reap() == ["ward"]
    assert {r["name"]: r["in_use"] for r in pool.state()}["talk"] == 0


def test_a_specialist_is_only_for_its_roles(ward_app: tuple[Flask, FakeLoader]) -> None:
    app, loader = ward_app
    client = client_of(app)  # an admin: ward yes, line-only no
    listed = [m["id"] for m in client.get("/v1/models").get_json()["data"]]
    assert "ward" in listed and "line-only" not in listed and "ward-lora" not in listed
    resp = client.post(
        "/v1/chat/completions",
        json={"model": "line-only", "messages": [{"role": "user", "content": "a"}]},
    )
    assert resp.status_code == 403
    assert "role 'admin' may not use specialist 'line-only'" in resp.get_json()["error"]["message"]
    assert client.get("/v1/models/line-only").status_code == 403
    streamed = post_stream(client, "line-only")
    assert streamed.status_code == 403  # a plain 403, never an event inside a 200 stream
    assert "line-only" not in loader.loads  # refused before anything loaded
    adapter = client.post(
        "/v1/chat/completions",
        json={"model": "ward-lora", "messages": [{"role": "user", "content": "a"}]},
    )
    assert (
        adapter.status_code == 400 and "is a LoRA adapter" in adapter.get_json()["error"]["message"]
    )


def test_a_specialist_whose_adapter_was_made_for_another_base_file_is_refused(
    tmp_path: Path,
) -> None:
    wrong = "ab" * 32
    settings = garden(
        tmp_path,
        {
            "talk": CHAT,
            "lora": adapter_fields("talk", wrong),
            "bad": {
                "kind": "specialist",
                "toml": specialist_toml("bad", "talk", '[[adapters]]\nname = "lora"'),
            },
            "orphan": {"kind": "specialist", "toml": specialist_toml("orphan", "nobody")},
        },
    )
    pool = open_pool(settings, FakeLoader({}))
    try:
        reason = pool.refused()["bad"]
        assert f"made for base 'talk' with sha256 {wrong}" in reason
        assert f"has sha256 {file_sha256('talk')}" in reason
        assert "its base 'nobody' does not exist" in pool.refused()["orphan"]
        with pytest.raises(ModelUnavailable, match="made for base"):
            pool.acquire("bad", "chat")
    finally:
        pool.close()


def test_an_idle_specialist_and_its_base_make_room_together(tmp_path: Path) -> None:
    """A base held only by idle specialists is unloaded with them (they first) when
    another model needs the memory; before, the specialist's hold kept it for good."""
    settings = garden(
        tmp_path,
        {
            "talk": CHAT,
            "ward-lora": adapter_fields("talk"),
            "ward": {"kind": "specialist", "toml": specialist_toml("ward", "talk", WARD)},
            "big": CHAT,
        },
        memory_limit_mb=100,
    )
    loader = FakeLoader({"talk": 40, "ward": 10, "big": 70})
    pool = open_pool(settings, loader)
    try:
        use(pool, "ward", "chat")  # loads talk, then ward over it
        assert loader.loads == ["talk", "ward"]
        use(pool, "big")
        assert states(pool) == {
            "big": "ready",
            "talk": "unloaded",
            "ward": "unloaded",
            "ward-lora": "unloaded",
        }
        assert loader.closed == ["ward", "talk"]  # the specialist before its base
        assert pool.budget_state()["used_bytes"] == 70 << 20
        held = pool.acquire("big")
        with pytest.raises(NoRoom):  # with big busy, ward and its base cannot come back
            pool.acquire("ward", "chat", wait=0.5)
        held.release()
    finally:
        pool.close()


def test_the_queue_full_message_names_the_setting_not_the_count() -> None:
    """It printed the requests waiting twice, once as 'queue_depth'."""
    engine = FakeChatEngine(on_close=lambda: None, slots=2)
    scheduler = ModelScheduler("talk", engine, queue_depth=3)  # not started: nothing runs
    for _ in range(5):
        scheduler.submit(Generation([1], SamplingParams(max_tokens=1)))
    with pytest.raises(QueueFull) as refused:
        scheduler.submit(Generation([1], SamplingParams(max_tokens=1)))
    message = str(refused.value)
    assert "5 request(s) already waiting for its 2 slot(s) (queue_depth 3)" in message
    scheduler.stop(0)
    with pytest.raises(Unavailable, match="stopping with the appliance"):
        scheduler.submit(Generation([1], SamplingParams(max_tokens=1)))
