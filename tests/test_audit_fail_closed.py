"""Fail closed, through the real server, with faults no mount is needed for: the audit
database locked by another process past ``audit_write_timeout``, made read-only (the
immutable attribute: that takes root, as CI runs), and its directory moved away or
removed. Each time: 503 ``audit_unavailable`` in the
protocol's error shape (a plain answer, a stream, a /v2 inference), /readyz not ready
with the audit log as the reason, no answer without its request and outcome records
(read back afterwards by the product's reader and `audit verify`), and, where the
fault can clear, the server ready and answering again by itself, with no request to
wake it and no restart; and a record whose request was refused for lateness is not
written when the lock clears. (A full disk, which needs a small tmpfs, is in
test_audit_server.py.)"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from helpers import Server, ServerFactory, audit_pairs, run_cli, wait_for

LINE = "line-anomaly"
READINGS = {
    "name": "readings",
    "shape": [1, 4],
    "datatype": "FP32",
    "data": [2.0, 50.0, 55.0, 12.0],
}
WRITE_TIMEOUT = 1  # seconds (the setting's minimum): a refusal under a lock takes this long


@dataclass
class Ledger:
    """What the clients saw: the request ids of answers and of refusals."""

    answered: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)


def start(server_factory: ServerFactory, state: Path) -> Server:
    return server_factory(state, "--audit-write-timeout", str(WRITE_TIMEOUT))


def chat(server: Server, model: str, stream: bool = False) -> httpx.Response:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "Hi."}],
        "max_tokens": 2,
        "temperature": 0,
        "stream": stream,
    }
    if not stream:
        return server.http.post("/v1/chat/completions", json=body, timeout=60)
    with server.http.stream("POST", "/v1/chat/completions", json=body, timeout=60) as resp:
        resp.read()
        return resp


def infer(server: Server) -> httpx.Response:
    return server.http.post(f"/v2/models/{LINE}/infer", json={"inputs": [READINGS]}, timeout=60)


def answered(resp: httpx.Response, ledger: Ledger) -> None:
    assert resp.status_code == 200, resp.text
    ledger.answered.append(resp.headers["X-Request-Id"])


def refused(resp: httpx.Response, ledger: Ledger, v2: bool = False) -> str:
    """A 503 in place of the answer, in the protocol's shape; its message."""
    assert resp.status_code == 503, resp.text
    assert resp.headers["Retry-After"]
    ledger.refused.append(resp.headers["X-Request-Id"])
    body = resp.json()  # JSON, even for a stream: not one event of an answer left
    if v2:  # the Open Inference Protocol's shape
        assert set(body) == {"error"} and isinstance(body["error"], str)
        message = str(body["error"])
    else:  # OpenAI's
        error = body["error"]
        assert (error["code"], error["type"]) == ("audit_unavailable", "service_unavailable")
        assert "choices" not in body
        message = str(error["message"])
    assert "audit" in message and "not served" in message, message
    return message


def readiness(server: Server) -> tuple[int, list[str]]:
    resp = server.http.get("/readyz")
    return resp.status_code, list(resp.json()["reasons"])


def refused_everywhere(server: Server, model: str, ledger: Ledger) -> str:
    """Under the fault: a plain answer, a stream and a /v2 inference all refused, and
    the box not ready, naming the audit log. The readiness reason."""
    refused(chat(server, model), ledger)
    streamed = chat(server, model, stream=True)
    assert "data:" not in streamed.text
    refused(streamed, ledger)
    refused(infer(server), ledger, v2=True)
    status, reasons = readiness(server)
    assert status == 503, reasons
    [reason] = [r for r in reasons if "audit log cannot be written" in r]
    v2_ready = server.http.get("/v2/health/ready")
    assert v2_ready.status_code == 503 and "audit log" in v2_ready.json()["error"]
    return reason


def recovers(server: Server, model: str, ledger: Ledger) -> None:
    """Ready again with no request to notice the fault has gone, then answering."""
    assert wait_for(lambda: readiness(server)[0] == 200, 15), readiness(server)
    answered(chat(server, model), ledger)
    answered(infer(server), ledger)


def every_answer_audited(state: Path, ledger: Ledger, **overrides: Any) -> None:
    """Each answer a client got has its request and outcome records (the product's
    reader); no refusal is recorded as answered; the chain verifies."""
    from appliance.audit.reader import records
    from appliance.audit.store import AuditStore
    from appliance.config import load_settings

    audit_pairs(state, ledger.answered, **overrides)
    settings = load_settings(env={}, overrides={"state_dir": state, **overrides})
    store = AuditStore(settings, create_keys=False)
    try:
        refusals = set(ledger.refused)
        rows = [r for r in records(store) if r["request_id"] in refusals]
    finally:
        store.close()
    assert not [r for r in rows if r["kind"] == "outcome" and r["status"] == 200], rows
    flags = [f"--{name.replace('_', '-')}={value}" for name, value in overrides.items()]
    result = run_cli("audit", "verify", "--json", *flags, state=state)
    report = json.loads(result.stdout)
    assert report["ok"], report


@pytest.mark.server
def test_locked_past_the_write_timeout(
    server_factory: ServerFactory, state_dir: Path, model_name: str
) -> None:
    server = start(server_factory, state_dir)
    ledger = Ledger()
    answered(chat(server, model_name), ledger)
    # Another process's write transaction, as the CLI's would be, held for longer
    # than a request may wait for its record.
    holder = sqlite3.connect(state_dir / "audit" / "audit.db", timeout=10, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        reason = refused_everywhere(server, model_name, ledger)
        assert "locked" in reason or f"within {WRITE_TIMEOUT} s" in reason, reason
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    recovers(server, model_name, ledger)
    assert server.stop() == 0
    every_answer_audited(state_dir, ledger)


@contextmanager
def immutable(*paths: Path) -> Iterator[None]:
    """The files made read-only for everyone, root included, and for the descriptors
    already open on them: the immutable attribute, which the kernel checks on every
    write. (Mode bits would not do: root ignores them, and an open descriptor keeps
    the access it was opened with.)"""
    result = subprocess.run(["chattr", "+i", *map(str, paths)], capture_output=True, text=True)
    try:
        # As root, a filesystem without the attribute is a broken test machine.
        assert result.returncode == 0, f"chattr +i: {result.stderr.strip()}"
        yield
    finally:
        subprocess.run(["chattr", "-i", *map(str, paths)], capture_output=True, check=False)


@pytest.mark.server
def test_read_only(server_factory: ServerFactory, state_dir: Path, model_name: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: chattr +i takes CAP_LINUX_IMMUTABLE")
    server = start(server_factory, state_dir)
    ledger = Ledger()
    answered(chat(server, model_name), ledger)
    db = state_dir / "audit" / "audit.db"
    # The database and its WAL, which SQLite writes with write(2); not the -shm index,
    # which it writes through a shared mapping (a fault there is SIGBUS, not an error).
    with immutable(db, db.with_name("audit.db-wal")):
        reason = refused_everywhere(server, model_name, ledger)
        assert "disk I/O error" in reason, reason
    recovers(server, model_name, ledger)
    assert server.stop() == 0
    every_answer_audited(state_dir, ledger)


@pytest.mark.server
def test_directory_moved_away_and_back_then_removed(
    server_factory: ServerFactory, state_dir: Path, model_name: str
) -> None:
    server = start(server_factory, state_dir)
    ledger = Ledger()
    answered(chat(server, model_name), ledger)
    audit_dir = state_dir / "audit"
    away = state_dir / "audit.moved"
    # SQLite would write on into the moved file through its open descriptors, where
    # nothing reads it: the server must refuse instead.
    audit_dir.rename(away)
    try:
        reason = refused_everywhere(server, model_name, ledger)
        assert "is not there" in reason, reason
    finally:
        away.rename(audit_dir)
    recovers(server, model_name, ledger)

    # Second names for the files the server holds open, out of its sight: whatever it
    # writes after the removal can be read afterwards.
    kept = state_dir / "kept"
    kept.mkdir()
    for f in ("audit.db", "audit.db-wal", "checkpoints.jsonl"):
        os.link(audit_dir / f, kept / f)
    shutil.rmtree(audit_dir)
    reason = refused_everywhere(server, model_name, ledger)
    assert "is not there" in reason, reason
    # An empty directory in its place is not the log: no new chain is begun in it.
    audit_dir.mkdir()
    refused(infer(server), ledger, v2=True)
    status, reasons = readiness(server)
    assert status == 503 and any("is not there" in r for r in reasons), reasons
    assert list(audit_dir.iterdir()) == []
    assert server.stop() == 0
    every_answer_audited(
        state_dir, ledger, audit_db=kept / "audit.db", checkpoint_file=kept / "checkpoints.jsonl"
    )


def test_a_record_given_up_on_is_not_written_when_the_lock_clears(tmp_path: Path) -> None:
    """A request refused because its record was late (503) must not have the record
    written afterwards, once the lock clears: the log would say it was served."""
    from appliance.audit.reader import records
    from appliance.audit.records import Entry
    from appliance.audit.store import AuditStore, AuditUnavailable
    from appliance.config import load_settings

    # The writer waits up to 5 s for the lock (busy_timeout): the lock is let go
    # long before, while the writer still holds the record it was given.
    settings = load_settings(env={}, overrides={"state_dir": tmp_path, "audit_write_timeout": 5})
    store = AuditStore(settings)
    holder = sqlite3.connect(settings.audit_db_path, timeout=10, isolation_level=None)
    try:
        holder.execute("BEGIN EXCLUSIVE")
        late = store.submit(Entry(kind="request", request_id="late", status=200))
        with pytest.raises(AuditUnavailable, match=r"not durable within 0\.2 s"):
            store.wait(late, timeout=0.2)
        holder.execute("ROLLBACK")
        after = store.submit(Entry(kind="event", request_id="after", status=200))
        assert store.wait(after) > 0
        written = [r["request_id"] for r in records(store)]
    finally:
        holder.close()
        store.close()
    assert "after" in written and "late" not in written, written


def test_writable_again_is_noticed_without_a_request(tmp_path: Path) -> None:
    """A request that fails writing its own records (an idle log) is the last to
    touch the log: the writer must try again by itself, long before its next
    checkpoint is due, so that the log is seen writable (and /readyz ready) again."""
    from appliance.audit.records import Entry
    from appliance.audit.store import AuditStore, AuditUnavailable
    from appliance.config import load_settings

    settings = load_settings(
        env={},
        overrides={"state_dir": tmp_path, "audit_write_timeout": 1, "checkpoint_seconds": 300},
    )
    store = AuditStore(settings)
    holder = sqlite3.connect(settings.audit_db_path, timeout=10, isolation_level=None)
    try:
        holder.execute("BEGIN EXCLUSIVE")
        with pytest.raises(AuditUnavailable, match="locked"):
            store.commit([Entry(kind="event", request_id="refused", status=200)])
        assert not store.healthy
        holder.execute("ROLLBACK")
        assert wait_for(lambda: store.healthy, 10), store.last_error
    finally:
        holder.close()
        store.close()
