"""The audit trail through the real server: a record pair per inference, one record
per refusal, nothing in clear at rest, kill -9 under load, a full disk, bad keys."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest

from helpers import Server, ServerFactory, audit_pairs, audit_rows, run_cli, wait_for

pytestmark = pytest.mark.server

SECRET = "Zebulon Quartermaine, ward 7, bed 14"


def verified(state: Path) -> dict[str, Any]:
    result = run_cli("audit", "verify", "--json", state=state)
    report: dict[str, Any] = json.loads(result.stdout)
    assert result.returncode == (0 if report["ok"] else 1)
    return report


def by_request(rows: list[dict[str, Any]], request_id: str) -> list[dict[str, Any]]:
    return [r for r in rows if r["request_id"] == request_id]


def chat(server: Server, model: str, **extra: Any) -> httpx.Response:
    return server.http.post(
        "/v1/chat/completions",
        timeout=60,
        json={
            "model": model,
            "messages": [{"role": "user", "content": SECRET}],
            "max_tokens": 8,
            "temperature": 0,
            **extra,
        },
    )


def test_every_request_leaves_its_records(
    server_factory: ServerFactory, state_dir: Path, model_name: str, default_model: Any
) -> None:
    server = server_factory(state_dir)
    answered = chat(server, model_name)
    assert answered.status_code == 200
    with server.http.stream(
        "POST",
        "/v1/chat/completions",
        timeout=60,
        json={
            "model": model_name,
            "messages": [{"role": "user", "content": SECRET}],
            "max_tokens": 8,
            "stream": True,
        },
    ) as streamed:
        stream_id = streamed.headers["X-Request-Id"]
        text = "".join(
            json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
            for line in streamed.iter_lines()
            if line.startswith("data: {") and '"choices":[{' in line
        )
    refused = chat(server, model_name, temperature="hot")
    missing = server.http.get("/v1/nowhere")
    models = server.http.get("/v1/models")
    server.http.get("/healthz")
    server.stop()

    rows = audit_rows(state_dir)
    pair = by_request(rows, answered.headers["X-Request-Id"])
    assert [r["kind"] for r in pair] == ["request", "outcome"]
    request, outcome = pair
    assert request["model_sha256"] == default_model.sha256
    assert request["content"]["input"]["messages"][0]["content"] == SECRET
    assert outcome["status"] == 200 and outcome["latency_us"] > 0
    assert outcome["completion_tokens"] == answered.json()["usage"]["completion_tokens"]
    assert outcome["content"]["output"] == answered.json()["choices"][0]["message"]["content"]
    assert (request["actor_name"], request["actor_role"]) == ("tests", "admin")
    assert request["actor_id"].startswith("token:") and request["client"] == "127.0.0.1"

    stream_pair = by_request(rows, stream_id)
    assert [r["kind"] for r in stream_pair] == ["request", "outcome"]
    assert stream_pair[1]["content"]["output"] == text

    [bad] = by_request(rows, refused.headers["X-Request-Id"])
    assert (bad["kind"], bad["status"], bad["error_type"]) == ("event", 400, "invalid_value")
    assert bad["content"]["input"]["temperature"] == "hot"
    [nowhere] = by_request(rows, missing.headers["X-Request-Id"])
    assert nowhere["status"] == 404
    assert by_request(rows, models.headers["X-Request-Id"])[0]["route"] == "/v1/models"
    assert not any(r["route"] == "/healthz" for r in rows)
    assert any(r["kind"] == "admin" and r["content"]["action"] == "start" for r in rows)
    assert rows[-1]["kind"] == "admin" and rows[-1]["content"]["action"] == "audit export"

    report = verified(state_dir)
    assert report["ok"] and report["incomplete"] == []

    # Nothing in clear: not in the database, its WAL, the checkpoints, nor the log.
    blobs = b"".join(p.read_bytes() for p in (state_dir / "audit").iterdir())
    assert b"Quartermaine" not in blobs
    answer = answered.json()["choices"][0]["message"]["content"]
    if len(answer) >= 12:
        assert answer.encode() not in blobs
    assert "Quartermaine" not in "\n".join(server.stderr + server.stdout)


def test_request_record_is_durable_before_the_first_byte(
    server_factory: ServerFactory, state_dir: Path, model_name: str
) -> None:
    server = server_factory(state_dir)
    db = state_dir / "audit" / "audit.db"
    with server.http.stream(
        "POST",
        "/v1/chat/completions",
        timeout=60,
        json={
            "model": model_name,
            "messages": [{"role": "user", "content": SECRET}],
            "max_tokens": 400,
            "ignore_eos": True,
            "stream": True,
        },
    ) as resp:
        request_id = resp.headers["X-Request-Id"]
        first = next(line for line in resp.iter_lines() if line.startswith("data: "))
        assert first
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
            kinds = [
                k
                for (k,) in conn.execute(
                    "SELECT kind FROM audit_records WHERE request_id = ?", (request_id,)
                )
            ]
        assert kinds == ["request"]  # durable already; the outcome comes at the end


def _load_then_kill(server: Server, model: str, answered: list[str], streaming: list[str]) -> None:
    """Four clients asking short questions, then a long stream; once the stream's first
    token is out, kill -9 the whole server."""
    stop = threading.Event()

    def client() -> None:
        with server.client(timeout=30) as c:
            for _ in range(200):  # bounded
                if stop.is_set():
                    return
                try:
                    r = c.post(
                        f"{server.url}/v1/completions",
                        json={"model": model, "prompt": f"{SECRET} note", "max_tokens": 2},
                    )
                except httpx.HTTPError:
                    return
                if r.status_code == 200:
                    answered.append(r.headers["X-Request-Id"])

    def streamer() -> None:
        body = {
            "model": model,
            "prompt": SECRET,
            "max_tokens": 2000,
            "ignore_eos": True,
            "stream": True,
        }
        try:
            with server.http.stream("POST", "/v1/completions", timeout=30, json=body) as resp:
                lines = resp.iter_lines()
                for line in lines:
                    if line.startswith("data: {"):
                        streaming.append(resp.headers["X-Request-Id"])
                        break
                for _ in lines:
                    pass
        except httpx.HTTPError:
            pass

    threads = [threading.Thread(target=client) for _ in range(4)]
    answered_before, streaming_before = len(answered), len(streaming)
    for t in threads:
        t.start()
    assert wait_for(lambda: len(answered) >= answered_before + 8, 60)
    threads.append(threading.Thread(target=streamer))
    threads[-1].start()
    assert wait_for(lambda: len(streaming) > streaming_before, 60)
    server.kill()
    stop.set()
    for t in threads:
        t.join(30)


def test_kill_9_under_load_keeps_every_answered_record(
    server_factory: ServerFactory, state_dir: Path, model_name: str
) -> None:
    answered: list[str] = []
    streaming: list[str] = []
    for _ in range(3):
        server = server_factory(state_dir, "--queue-depth", "16")
        _load_then_kill(server, model_name, answered, streaming)

    report = verified(state_dir)
    assert report["ok"], report["problem"]
    rows = audit_rows(state_dir)
    kinds: dict[str, list[str]] = {}
    for r in rows:
        kinds.setdefault(r["request_id"], []).append(r["kind"])
    for request_id in answered:  # every answer a client got has both records
        assert kinds.get(request_id) == ["request", "outcome"], request_id
    for request_id in streaming:  # cut mid-stream: shown as incomplete, not tampering
        assert kinds.get(request_id) == ["request"]
        assert request_id in report["incomplete"]


@pytest.fixture
def small_disk(tmp_path: Path) -> Any:
    if os.geteuid() != 0:
        pytest.skip("needs root: mounts a small tmpfs (CI runs as root)")
    mount = tmp_path / "small"
    mount.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    # As root, a mount that fails is a broken machine, not a reason to skip.
    assert result.returncode == 0, f"cannot mount a small tmpfs: {result.stderr.strip()}"
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_full_disk_gives_503_and_not_ready_until_it_recovers(
    server_factory: ServerFactory, state_dir: Path, model_name: str, small_disk: Path
) -> None:
    server = server_factory(state_dir, "--audit-db", str(small_disk / "audit.db"))
    assert chat(server, model_name).status_code == 200
    filler = small_disk / "filler"
    with filler.open("wb") as fh:
        try:
            while True:
                fh.write(b"\0" * (1 << 16))
                fh.flush()
        except OSError:
            pass
    refused = chat(server, model_name)
    assert refused.status_code == 503
    error = refused.json()["error"]
    assert error["code"] == "audit_unavailable" and "not served" in error["message"]
    assert "choices" not in refused.json()
    ready = server.http.get("/readyz")
    assert ready.status_code == 503
    assert any("audit log cannot be written" in r for r in ready.json()["reasons"])

    filler.unlink()
    assert wait_for(lambda: chat(server, model_name).status_code == 200, 20)
    assert server.http.get("/readyz").status_code == 200
    server.stop()


def test_master_key_readable_by_others_stops_the_start(state_dir: Path) -> None:
    key = state_dir / "keys" / "audit-master.key"
    key.parent.mkdir(mode=0o700)
    key.write_text(os.urandom(32).hex())
    os.chmod(key, 0o644)
    result = run_cli("serve", "--port", "1", state=state_dir)
    assert result.returncode != 0
    assert "refusing to start" in result.stderr
    assert str(key) in result.stderr and "chmod 600" in result.stderr


def test_audit_cli_round_trip(
    server_factory: ServerFactory, state_dir: Path, model_name: str, tmp_path: Path
) -> None:
    server = server_factory(state_dir)
    first = chat(server, model_name)
    rotated = run_cli("audit", "rotate-key", "--json", state=state_dir)
    assert rotated.returncode == 0, rotated.stderr
    new_key = json.loads(rotated.stdout)["key_id"]
    second = chat(server, model_name)  # the running server takes the new key
    backup = tmp_path / "copy.db"
    assert run_cli("audit", "backup", str(backup), state=state_dir).returncode == 0
    server.stop()

    rows = audit_rows(state_dir)
    [later] = [
        r for r in by_request(rows, second.headers["X-Request-Id"]) if r["kind"] == "request"
    ]
    assert later["key_id"] == new_key
    [earlier] = [
        r for r in by_request(rows, first.headers["X-Request-Id"]) if r["kind"] == "request"
    ]
    assert earlier["key_id"] != new_key and earlier["content"]["input"]["messages"]

    shown = run_cli("audit", "show", str(later["seq"]), "--json", state=state_dir)
    assert json.loads(shown.stdout)["request_id"] == second.headers["X-Request-Id"]
    csv_out = run_cli("audit", "export", "--format", "csv", "--model", model_name, state=state_dir)
    assert csv_out.stdout.splitlines()[0].startswith("seq,ts,kind")
    kinds = [line.split(",")[2] for line in csv_out.stdout.splitlines()[1:]]
    # Two pairs of this model, and its load (at start) and unload (at stop) records.
    assert sorted(kinds) == ["admin", "admin", "outcome", "outcome", "request", "request"]

    purged = run_cli("audit", "purge", "--before", later["ts"], "--json", state=state_dir)
    assert json.loads(purged.stdout)["purged_through"] == later["seq"] - 1
    assert verified(state_dir)["ok"]

    def verify_backup() -> subprocess.CompletedProcess[str]:
        """`audit verify` of the backup file itself (its --audit-db), not the live log;
        without the external checkpoints, which run past the copy's head."""
        return run_cli(
            "audit",
            "verify",
            "--audit-db",
            str(backup),
            "--checkpoints",
            str(tmp_path / "none.jsonl"),
            "--without-external",
            "--json",
            state=state_dir,
        )

    backup_check = verify_backup()
    assert backup_check.returncode == 0, backup_check.stdout + backup_check.stderr
    copied = json.loads(backup_check.stdout)
    assert copied["ok"] and any("cannot be caught without it" in n for n in copied["notes"])
    # The copy ends where the log stood when it was taken (with the backup's own admin
    # record), not where the live log, purged and extended since, stands now; and both
    # answered requests' pairs are in it, readable with the keys.
    with sqlite3.connect(backup) as conn:
        [(head,)] = conn.execute("SELECT MAX(seq) FROM audit_records")
    assert copied["head_seq"] == head and copied["first_seq"] == 1
    assert copied["head_seq"] != verified(state_dir)["head_seq"]
    pairs = audit_pairs(
        state_dir,
        [first.headers["X-Request-Id"], second.headers["X-Request-Id"]],
        audit_db=backup,
        checkpoint_file=tmp_path / "scratch.jsonl",  # opening it seals one: not in the live file
    )
    assert pairs[second.headers["X-Request-Id"]][0]["key_id"] == new_key
    # A change to the copy is caught in the copy.
    with sqlite3.connect(backup) as conn:
        conn.execute("UPDATE audit_records SET status = 299 WHERE seq = 2")
    tampered = verify_backup()
    assert tampered.returncode == 1 and json.loads(tampered.stdout)["problem"]["seq"] == 2
    assert verified(state_dir)["ok"]  # the live log is untouched by all that

    with sqlite3.connect(state_dir / "audit" / "audit.db") as conn:
        conn.execute("UPDATE audit_records SET status = 201 WHERE seq = ?", (later["seq"],))
    failed = run_cli("audit", "verify", state=state_dir)
    assert failed.returncode == 1
    assert f"FAILED at {later['seq']}: modified" in failed.stdout
