"""The real server (gunicorn subprocess on a free port) driven by the `openai` SDK and
httpx: answers, streams, admission, disconnects, refusal of a tampered model, logs,
graceful stop."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from openai import OpenAI

from appliance.config import load_settings
from appliance.registry import Manifest, import_model

from helpers import (
    Server,
    ServerFactory,
    free_port,
    model_state,
    open_stream,
    run_cli,
    wait_for,
)

pytestmark = pytest.mark.server

USER = [{"role": "user", "content": "Tell me about the sea."}]
LONG = {"max_tokens": 2000, "temperature": 0, "ignore_eos": True}


def sdk(server: Server) -> OpenAI:
    return OpenAI(base_url=f"{server.url}/v1", api_key=server.token, max_retries=0, timeout=60)


def test_sdk_chat(shared_server: Server, model_name: str) -> None:
    answer = sdk(shared_server).chat.completions.create(
        model=model_name,
        messages=USER,
        max_tokens=16,
        temperature=0,  # type: ignore[arg-type]
    )
    assert answer.choices[0].message.content
    assert answer.usage is not None and 0 < answer.usage.completion_tokens <= 16


def test_sdk_chat_stream_matches_non_stream(shared_server: Server, model_name: str) -> None:
    client = sdk(shared_server)
    whole = client.chat.completions.create(
        model=model_name,
        messages=USER,
        max_tokens=24,
        temperature=0,  # type: ignore[arg-type]
    )
    chunks = list(
        client.chat.completions.create(
            model=model_name,
            messages=USER,
            max_tokens=24,
            temperature=0,  # type: ignore[arg-type]
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    content_chunks = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content_chunks) > 3  # token by token, not one lump
    assert chunks[-2].choices[0].finish_reason in ("stop", "length")
    streamed, first = chunks[-1].usage, whole.usage
    assert chunks[-1].choices == [] and streamed is not None and first is not None
    assert (streamed.prompt_tokens, streamed.completion_tokens) == (
        first.prompt_tokens,
        first.completion_tokens,
    )
    # The same prompt again: all of it but the last token comes from the KV cache.
    assert streamed.prompt_tokens_details is not None
    assert streamed.prompt_tokens_details.cached_tokens == streamed.prompt_tokens - 1
    assert len({c.id for c in chunks}) == 1


def test_sdk_completions_stream_and_not(shared_server: Server, model_name: str) -> None:
    client = sdk(shared_server)
    whole = client.completions.create(
        model=model_name, prompt="The harbour at dawn", max_tokens=12, temperature=0
    )
    streamed = list(
        client.completions.create(
            model=model_name,
            prompt="The harbour at dawn",
            max_tokens=12,
            temperature=0,
            stream=True,
        )
    )
    assert "".join(c.choices[0].text for c in streamed) == whole.choices[0].text
    assert whole.usage is not None and whole.usage.completion_tokens <= 12


def test_sdk_json_schema(shared_server: Server, model_name: str) -> None:
    schema = {
        "type": "object",
        "additionalProperties": False,
        "required": ["sea", "depth_m"],
        "properties": {"sea": {"type": "string", "maxLength": 30}, "depth_m": {"type": "integer"}},
    }
    answer = sdk(shared_server).chat.completions.create(
        model=model_name,
        messages=USER,
        max_tokens=80,
        temperature=0,  # type: ignore[arg-type]
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "sea", "schema": schema, "strict": True},
        },
    )
    jsonschema.validate(json.loads(answer.choices[0].message.content or ""), schema)


def test_sdk_models_list_and_errors(shared_server: Server, model_name: str) -> None:
    client = sdk(shared_server)
    models = client.models.list().data
    assert [m.id for m in models] == [model_name]
    assert models[0].model_extra and models[0].model_extra["sha256"]
    with pytest.raises(openai.NotFoundError) as nf:
        client.chat.completions.create(model="ghost", messages=USER)  # type: ignore[arg-type]
    assert "ghost" in str(nf.value)
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=model_name, messages=USER, n=3)  # type: ignore[arg-type]
    assert "n is 3" in str(bad.value)


def test_request_log_lines_carry_ids_and_never_content(
    shared_server: Server, model_name: str
) -> None:
    secret = "patient Zebulon Quartermaine has a fever"
    resp = shared_server.http.post(
        "/v1/chat/completions",
        timeout=60,
        json={
            "model": model_name,
            "max_tokens": 8,
            "temperature": 0,
            "messages": [{"role": "user", "content": secret}],
        },
    )
    request_id = resp.headers["X-Request-Id"]
    answer = resp.json()["choices"][0]["message"]["content"]
    assert wait_for(
        lambda: any(r.get("request_id") == request_id for r in shared_server.request_logs()), 5
    )
    line = next(r for r in shared_server.request_logs() if r["request_id"] == request_id)
    assert line["route"] == "/v1/chat/completions" and line["status"] == 200
    assert line["model"] == model_name and isinstance(line["latency_ms"], float)
    assert line["completion_tokens"] == resp.json()["usage"]["completion_tokens"]
    everything = "\n".join(shared_server.stderr + shared_server.stdout)
    assert "Zebulon" not in everything
    assert answer.strip() == "" or answer not in everything


def _open_stream(server: Server, client: httpx.Client, model: str) -> Any:
    """A long stream, once its first token has arrived (see helpers.open_stream)."""
    return open_stream(server, client, {"model": model, "messages": USER, **LONG})


def test_queue_full_gives_503_with_retry_after(
    server_factory: ServerFactory, state_dir: Path, model_name: str
) -> None:
    server = server_factory(state_dir, "--queue-depth", "1", "--parallel-streams", "2")
    with server.client() as a, server.client() as a2, server.client() as b:
        running, _lines = _open_stream(server, a, model_name)
        running2, _lines2 = _open_stream(server, a2, model_name)
        waiting = b.stream(  # both slots are taken: this one waits in the queue
            "POST",
            f"{server.url}/v1/chat/completions",
            json={"model": model_name, "messages": USER, "stream": True, **LONG},
        )
        queued = waiting.__enter__()
        assert queued.status_code == 200
        state = model_state(server.url, model_name)
        assert (state["slots"], state["running"], state["queued"]) == (2, 2, 1)
        refused = server.http.post(
            "/v1/chat/completions",
            timeout=10,
            json={"model": model_name, "messages": USER, "max_tokens": 4},
        )
        assert refused.status_code == 503
        assert int(refused.headers["Retry-After"]) >= 1
        error = refused.json()["error"]
        assert error["code"] == "queue_full" and "queue_depth 1" in error["message"]
        with pytest.raises(openai.APIStatusError) as sdk_refused:
            sdk(server).chat.completions.create(model=model_name, messages=USER)  # type: ignore[arg-type]
        assert sdk_refused.value.status_code == 503
        running.__exit__(None, None, None)
        running2.__exit__(None, None, None)
        waiting.__exit__(None, None, None)
    assert wait_for(lambda: model_state(server.url, model_name)["busy"] is False, 15)


def test_disconnect_frees_the_model(
    server_factory: ServerFactory, state_dir: Path, model_name: str
) -> None:
    server = server_factory(state_dir)
    with server.client() as client:
        ctx, _lines = _open_stream(server, client, model_name)
        assert model_state(server.url, model_name)["busy"] is True
        ctx.__exit__(None, None, None)  # the client goes away mid-answer
    # 2000 tokens take many seconds; a freed model is idle within a token or two.
    assert wait_for(lambda: model_state(server.url, model_name)["busy"] is False, 5)
    started = time.monotonic()
    answer = sdk(server).chat.completions.create(
        model=model_name,
        messages=USER,
        max_tokens=4,  # type: ignore[arg-type]
    )
    assert answer.choices[0].message.content is not None
    assert time.monotonic() - started < 10
    assert wait_for(
        lambda: any(r.get("finish_reason") == "cancelled" for r in server.request_logs()), 5
    )
    cancelled = next(r for r in server.request_logs() if r.get("finish_reason") == "cancelled")
    assert isinstance(cancelled["completion_tokens"], int) and cancelled["completion_tokens"] < 2000


def test_tampered_model_refused_while_another_serves(
    server_factory: ServerFactory, tmp_path: Path, model_file: Path, default_model: Manifest
) -> None:
    state = tmp_path / "state"
    (state / "models").mkdir(parents=True)
    backup_source = tmp_path / "backup.gguf"
    shutil.copyfile(model_file, backup_source)
    import_model(
        load_settings(env={}, overrides={"state_dir": state}),
        backup_source,
        "backup-model",
        domain="general",
        description="the fallback",
    )
    tampered = bytearray(model_file.read_bytes())
    tampered[len(tampered) // 2] ^= 0x01
    (state / "models" / default_model.file).write_bytes(bytes(tampered))

    server = server_factory(state)
    client = sdk(server)
    assert [m.id for m in client.models.list().data] == ["backup-model"]
    ok = client.chat.completions.create(model="backup-model", messages=USER, max_tokens=4)  # type: ignore[arg-type]
    assert ok.choices[0].message.content is not None

    refused = server.http.post(
        "/v1/chat/completions",
        timeout=10,
        json={"model": default_model.name, "messages": USER},
    )
    assert refused.status_code == 503
    message = refused.json()["error"]["message"]
    assert default_model.file in message and default_model.sha256 in message
    assert "expected" in message

    ready = server.http.get("/readyz")
    assert ready.status_code == 503
    assert any(default_model.sha256 in reason for reason in ready.json()["reasons"])
    assert any("refused" in line and default_model.file in line for line in server.stderr)


def test_sigterm_finishes_the_stream_in_flight_then_exits_0(
    server_factory: ServerFactory, state_dir: Path, model_name: str
) -> None:
    server = server_factory(state_dir)
    with (
        server.client() as client,
        client.stream(
            "POST",
            f"{server.url}/v1/chat/completions",
            json={
                "model": model_name,
                "messages": USER,
                "stream": True,
                "max_tokens": 150,
                "temperature": 0,
                "ignore_eos": True,
            },
        ) as resp,
    ):
        lines = resp.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        assert first
        server.proc.send_signal(signal.SIGTERM)
        rest = list(lines)
    assert rest[-1] == "data: [DONE]" or rest[-2:] == ["data: [DONE]", ""]
    finals = [json.loads(line[6:]) for line in rest if line.startswith("data: {")]
    assert finals[-1]["choices"][0]["finish_reason"] == "length"
    assert server.wait(30) == 0
    with pytest.raises(httpx.ConnectError):
        server.http.get("/healthz", timeout=2)


def test_past_the_grace_period_the_stream_is_cut_and_the_process_exits_0(
    server_factory: ServerFactory, state_dir: Path, model_name: str
) -> None:
    """A stream that outlasts `shutdown_grace` ends with an error event, its audit pair
    is complete, and the process leaves (no thread left waiting keeps it alive)."""
    server = server_factory(state_dir, "--shutdown-grace", "1")
    body = {
        "model": model_name,
        "messages": USER,
        "stream": True,
        "max_tokens": 1500,
        "temperature": 0,
        "ignore_eos": True,
    }
    with (
        server.client() as client,
        client.stream("POST", f"{server.url}/v1/chat/completions", json=body) as resp,
    ):
        lines = resp.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
        server.proc.send_signal(signal.SIGTERM)
        rest = list(lines)
    assert any("the appliance is stopping" in line for line in rest), rest[-3:]
    assert server.wait(30) == 0
    report = json.loads(run_cli("audit", "verify", "--json", state=state_dir).stdout)
    assert report["ok"] and not report["incomplete"], report
    # The stop is told: what was in flight, how long it waited, the audit log's seal.
    said = {r["msg"]: r for r in server.log_records() if r.get("logger") == "appliance.stop"}
    assert said["stopping: finishing the requests in flight"]["in_flight"] == 1
    assert said["stopping: finishing the requests in flight"]["grace_seconds"] == 1
    drained = said["drained"]
    assert 1 <= drained["waited_seconds"] < 10 and drained["cut_off"] == 1
    sealed = said["audit log sealed"]
    checkpoints = (state_dir / "audit" / "checkpoints.jsonl").read_text().splitlines()
    assert sealed["records"] == json.loads(checkpoints[-1])["size"] > 0


def test_sighup_stops_gracefully(server_factory: ServerFactory, state_dir: Path) -> None:
    """A closed terminal stops it as SIGTERM does: exit 0, the audit log sealed by a
    last checkpoint over its head."""
    server = server_factory(state_dir)
    server.proc.send_signal(signal.SIGHUP)
    assert server.wait(30) == 0
    report = json.loads(run_cli("audit", "verify", "--json", state=state_dir).stdout)
    checkpoints = (state_dir / "audit" / "checkpoints.jsonl").read_text().splitlines()
    last = json.loads(checkpoints[-1])
    assert report["ok"] and last["head"] == report["head_hash"]


def test_outlives_the_shell_that_started_it(state_dir: Path) -> None:
    """No arbiter: the server does not stop when the process that started it ends
    (`appliance serve &` from a shell that then exits)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
    shell = subprocess.Popen(
        [
            "sh",
            "-c",
            f'"{sys.executable}" -m appliance serve --state-dir "{state_dir}" '
            f"--port {port} >/dev/null 2>&1 & echo $!; read line",  # waits for stdin
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert shell.stdout is not None and shell.stdin is not None
    pid = int(shell.stdout.readline())
    try:
        url = f"http://127.0.0.1:{port}/healthz"

        def up() -> bool:
            try:
                return httpx.get(url, timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        assert wait_for(up, 60)  # serving, its parent the shell
        shell.stdin.close()  # the shell ends: the server is re-parented
        shell.wait(10)  # (read, at end of input, fails: exit 1)

        def parent() -> int:
            status = Path(f"/proc/{pid}/status").read_text()
            return int(next(ln for ln in status.splitlines() if ln.startswith("PPid:")).split()[1])

        assert wait_for(lambda: parent() != shell.pid, 10)  # re-parented now
        # gthread looks at its parent every second: through three such looks it must
        # keep serving (a check each tenth of a second, failing at the first refusal).
        assert not wait_for(lambda: not up(), 3, interval=0.1)
    finally:
        os.kill(pid, signal.SIGTERM)
        assert wait_for(lambda: not Path(f"/proc/{pid}").exists(), 30)


def test_readyz_without_a_model(
    server_factory: ServerFactory, tmp_path: Path, default_model: Manifest
) -> None:
    server = server_factory(tmp_path / "empty")
    ready = server.http.get("/readyz")
    assert ready.status_code == 503
    assert any("missing" in r and default_model.file in r for r in ready.json()["reasons"])
    assert server.http.get("/healthz").status_code == 200
    assert any("fetch-default" in line for line in server.stdout)
