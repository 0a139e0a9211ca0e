"""The appliance's side of the balancer contract, on the real server and model:
/livez and /readyz while loading, draining (by an admin, and on SIGTERM: readiness flips
first, new requests still served during drain_seconds, streams finish), the conversation
key, and a conversation's next turn finding its beginning in the KV cache."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers import (
    Server,
    ServerFactory,
    admin_token,
    audit_pairs,
    free_port,
    metric,
    open_stream,
    server_state,
    wait_for,
)

pytestmark = pytest.mark.server

ASK = {
    "model": "smollm2-135m-instruct",
    "messages": [{"role": "user", "content": "Say hello."}],
    "max_tokens": 4,
    "temperature": 0,
}


def test_probes_while_the_models_load(state_dir: Path) -> None:
    """Bound first, then loading: /livez 200 and /readyz 503 "loading" (not a refused or
    hanging connection), then ready."""
    port = free_port()
    admin_token(state_dir)
    cmd = [sys.executable, "-m", "appliance", "serve", "--state-dir", str(state_dir)]
    log = state_dir / "serve.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [*cmd, "--port", str(port), "--host", "127.0.0.1"],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    seen: list[tuple[str, int, dict[str, Any]]] = []

    def probe() -> bool:
        for path in ("/readyz", "/livez"):
            try:
                resp = httpx.get(url + path, timeout=5)
            except httpx.TransportError:
                return False  # not bound yet
            seen.append((path, resp.status_code, resp.json()))
        return seen[-2][1] == 200  # ready

    try:
        assert wait_for(probe, 120, interval=0.02), log.read_text()[-3000:]
        loading = [body for path, status, body in seen if path == "/readyz" and status == 503]
        assert loading, seen[:4]  # the load was seen from outside
        assert all(b == {**b, "ready": False, "loading": True} for b in loading)
        assert all(s == 200 for p, s, _ in seen if p == "/livez")
        assert seen[-1] == ("/livez", 200, {"live": True, "problem": None})
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0


def test_an_admin_drains_and_undrains(shared_server: Server) -> None:
    server = shared_server
    assert server.http.get("/readyz").status_code == 200
    line = server.http.post("/admin/tokens", json={"name": "line-1", "role": "line"}).json()
    as_line = server.http.post(
        "/admin/drain",
        json={"draining": True},
        headers={"Authorization": f"Bearer {line['token']}"},
    )
    assert as_line.status_code == 403  # only an admin drains a box
    bad = server.http.post("/admin/drain", json={"draining": "yes"})
    assert bad.status_code == 400 and "draining" in bad.text
    try:
        began = server.http.post("/admin/drain", json={"draining": True, "reason": "kernel update"})
        assert began.status_code == 200
        assert began.json() | {"since": None} == {
            "draining": True,
            "reason": "kernel update",
            "since": None,
            "changed": True,
        }
        ready = server.http.get("/readyz")
        assert ready.status_code == 404  # HAProxy: disable-on-404, no new work
        assert ready.json()["drain"]["reason"] == "kernel update"
        assert ready.json()["reasons"][0] == "draining: kernel update"
        assert server.http.get("/v2/health/ready").status_code == 503
        assert server.http.get("/livez").status_code == 200  # alive: don't restart it
        assert metric(server, "appliance_draining") == 1.0
        # Work that still comes is served, and its connection closed after the answer.
        answer = server.http.post("/v1/chat/completions", json=ASK)
        assert answer.status_code == 200 and answer.headers["Connection"] == "close"
        again = server.http.post("/admin/drain", json={"draining": True})
        assert again.json()["changed"] is False
    finally:
        ended = server.http.post("/admin/drain", json={"draining": False})
    assert ended.status_code == 200 and ended.json()["changed"] is True
    assert server.http.get("/readyz").status_code == 200
    assert metric(server, "appliance_draining") == 0.0
    answer = server.http.post("/v1/chat/completions", json=ASK)
    assert answer.headers.get("Connection") != "close"
    # Both drain calls are on record, with who asked and what was said.
    export = server.http.get("/audit/export").text
    drains = [r for r in map(json.loads, export.splitlines()) if r["route"] == "/admin/drain"]
    assert [r["content"]["input"]["draining"] for r in drains if r["kind"] == "event"][-2:] == [
        True,
        False,
    ]


def test_sigterm_flips_readiness_first_then_stops_accepting(
    server_factory: ServerFactory, state_dir: Path
) -> None:
    server = server_factory(
        state_dir, env={"APPLIANCE_DRAIN_SECONDS": "6", "APPLIANCE_SHUTDOWN_GRACE": "120"}
    )
    client = httpx.Client(
        headers={"Authorization": f"Bearer {server.token}"}, timeout=60
    )  # its own connections: the stream keeps one busy
    body = {**ASK, "max_tokens": 48, "messages": [{"role": "user", "content": "Count to 30."}]}
    ctx, lines = open_stream(server, client, body)
    server.proc.send_signal(signal.SIGTERM)
    assert wait_for(lambda: httpx.get(f"{server.url}/readyz").status_code == 404, 2)
    # During drain_seconds, work a balancer had already sent is answered.
    late = httpx.post(
        f"{server.url}/v1/chat/completions",
        json=ASK,
        headers={"Authorization": f"Bearer {server.token}"},
        timeout=60,
    )
    assert late.status_code == 200 and late.headers["Connection"] == "close"
    # (Accepted: once drain_seconds are over, a new connection is refused.)
    rest = [line for line in lines if line.startswith("data: ")]
    ctx.__exit__(None, None, None)
    assert rest[-1] == "data: [DONE]", server.stderr[-5:]  # the stream in flight finished
    assert server.wait(60) == 0
    said = [r.get("msg") for r in server.log_records()]
    assert said.index("draining: /readyz answers 404") < said.index(
        "stopping: finishing the requests in flight"
    )
    stopping = next(
        r for r in server.log_records() if r.get("msg") == "draining: /readyz answers 404"
    )
    assert stopping["drain_seconds"] == 6
    ids = [late.headers["X-Request-Id"]]
    audit_pairs(server_state(server), ids)


def test_the_conversation_key_follows_a_conversation(shared_server: Server) -> None:
    server = shared_server
    system = {"role": "system", "content": "You are a maintenance assistant for press 4."}
    first = [system, {"role": "user", "content": "What does error E12 mean?"}]
    one = server.http.post("/v1/chat/completions", json={**ASK, "messages": first})
    key = one.headers["X-Conversation-Id"]
    turn = [*first, one.json()["choices"][0]["message"], {"role": "user", "content": "And E13?"}]
    two = server.http.post("/v1/chat/completions", json={**ASK, "messages": turn})
    assert two.headers["X-Conversation-Id"] == key
    other = [system, {"role": "user", "content": "How often is the oil changed?"}]
    three = server.http.post("/v1/chat/completions", json={**ASK, "messages": other})
    assert three.headers["X-Conversation-Id"] != key
    # A key the client chose is kept, on streams too; a malformed one is refused.
    own = {"X-Conversation-Id": "ward-7:bed-12"}
    mine = server.http.post("/v1/chat/completions", json={**ASK, "stream": True}, headers=own)
    assert mine.status_code == 200 and mine.headers["X-Conversation-Id"] == "ward-7:bed-12"
    bad = server.http.post(
        "/v1/chat/completions", json=ASK, headers={"X-Conversation-Id": "x" * 129}
    )
    assert bad.status_code == 400
    assert (
        bad.json()["error"]["param"] == "X-Conversation-Id"
        and "129" in bad.json()["error"]["message"]
    )
    text = server.http.post(
        "/v1/completions", json={"model": ASK["model"], "prompt": "Hi", "max_tokens": 2}
    )
    assert text.headers["X-Conversation-Id"].startswith("c-")
    # The key is in the audit record of the request: an auditor can follow a conversation.
    rows = audit_pairs(
        server_state(server), [one.headers["X-Request-Id"], mine.headers["X-Request-Id"]]
    )
    assert rows[one.headers["X-Request-Id"]][0]["content"]["conversation"] == key
    assert rows[mine.headers["X-Request-Id"]][0]["content"]["conversation"] == "ward-7:bed-12"


def test_conversations_keep_their_caches_side_by_side(shared_server: Server) -> None:
    """Conversation A, then B, then A's next turn: A's beginning is still in the KV cache
    (B took another slot instead of overwriting A's), and /metrics counts the reuse."""
    server = shared_server

    def ask(messages: list[dict[str, str]]) -> dict[str, Any]:
        resp = server.http.post(
            "/v1/chat/completions", json={**ASK, "messages": messages, "max_tokens": 8}
        )
        assert resp.status_code == 200
        out: dict[str, Any] = resp.json()
        return out

    system = {"role": "system", "content": "You help the night shift of ward 3. " * 6}
    a1 = [system, {"role": "user", "content": "Patient in bed 4 has a fever of 39.2."}]
    b1 = [
        {"role": "system", "content": "You check torque settings. " * 6},
        {"role": "user", "content": "Line 2 torque is 41 Nm."},
    ]
    cached_before = metric(server, "appliance_prompt_tokens_cached_total")
    first = ask(a1)
    ask(b1)
    ask([{"role": "user", "content": "Something else entirely, number three."}])
    a2 = [*a1, first["choices"][0]["message"], {"role": "user", "content": "And now 39.8?"}]
    follow = ask(a2)
    reused = follow["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert reused >= first["usage"]["prompt_tokens"] - 2, follow["usage"]
    assert metric(server, "appliance_prompt_tokens_cached_total") - cached_before >= reused
    assert 0.0 <= metric(server, "appliance_kv_cache_usage_ratio") <= 1.0


def test_kv_cache_use_is_reported_while_requests_run(shared_server: Server) -> None:
    server = shared_server
    body = {**ASK, "max_tokens": 64, "messages": [{"role": "user", "content": "Count to 50."}]}
    client = httpx.Client(headers={"Authorization": f"Bearer {server.token}"}, timeout=60)
    seen: list[float] = []
    ctx, lines = open_stream(server, client, body)
    try:
        seen.append(metric(server, "appliance_kv_cache_usage_ratio"))
        depth = metric(server, "appliance_queue_depth")
    finally:
        done = threading.Thread(target=lambda: [*lines], daemon=True)
        done.start()
        done.join(60)
        ctx.__exit__(None, None, None)
    # One running request holds its prompt and answer so far: more than nothing, a small
    # share of 4 slots x the context.
    assert 0.0 < seen[0] < 0.25, seen
    assert depth == 0.0
    assert wait_for(lambda: metric(server, "appliance_kv_cache_usage_ratio") == 0.0, 10)
