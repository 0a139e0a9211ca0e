"""The audit log's durability, proven where it is decided: between the process and the
kernel. A kill -9 keeps whatever the kernel already holds, so a crash test passes even
with `PRAGMA synchronous=OFF`; these tests do not. An LD_PRELOAD shim
(tests/durability_shim.c, compiled here with gcc) journals, in order, every write to
the audit directory's files with its offset and bytes, every fsync/fdatasync of them
that returned, and the first bytes of everything handed to a client's TCP socket.

- The ordering: for a plain chat answer, a stream and a /v2 tensor inference, the WAL
  write holding the request's record is followed by an fsync of the WAL before the
  first byte of the answer goes to the client's socket.
- A power cut: under a bounded load the server is killed -9 at a random moment, and the
  audit files are rebuilt as the disk would hold them had the power gone instead: only
  the writes an fsync of their file covered. At that end, and at cut points taken
  inside the run (just before each answer's first byte, and at random), the rebuilt log
  verifies and holds the request record of every answer the server had begun to send
  (and the outcome too, for a plain answer).

The power cut's model is the harsh one (dm-flakey's drop_writes, without root): every
write no fsync covered is gone, none survives in part. It takes a file's creation as
durable, and an unlink as durable once the file or its directory is fsync'd.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import sqlite3
import struct
import subprocess
import threading
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from appliance.audit import chain, crypto

from helpers import REPO, Server, ServerFactory, audit_rows, run_cli, wait_for

pytestmark = pytest.mark.server

SHIM_SOURCE = REPO / "tests" / "durability_shim.c"
HEADER = struct.Struct("<4scIQqII")  # magic, type, tid, monotonic ns, offset, path, data
REQUEST_ID = re.compile(rb"\r\nX-Request-Id: ([0-9a-f]+)\r\n", re.IGNORECASE)
LINE = "line-anomaly"


@dataclass(frozen=True)
class Event:
    kind: str  # W write, S fsync/fdatasync done, T truncate, U unlink, N to a client
    ns: int  # CLOCK_MONOTONIC
    offset: int  # W: file offset; T: new length; N: the client's port
    path: str
    data: bytes


def read_journal(path: Path) -> list[Event]:
    raw = path.read_bytes()
    events, at = [], 0
    while at + HEADER.size <= len(raw):
        magic, kind, _tid, ns, offset, path_len, data_len = HEADER.unpack_from(raw, at)
        assert magic == b"DJ01", f"journal damaged at byte {at}"
        at += HEADER.size
        name = raw[at : at + path_len].decode()
        data = raw[at + path_len : at + path_len + data_len]
        at += path_len + data_len
        events.append(Event(kind.decode(), ns, offset, name, data))
    assert at == len(raw), "journal ends inside a record"
    return events


@pytest.fixture(scope="module")
def shim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    gcc = shutil.which("gcc")
    assert gcc, "gcc is missing (scripts/lib.sh installs build-essential)"
    out = tmp_path_factory.mktemp("shim") / "durability_shim.so"
    subprocess.run(
        [gcc, "-shared", "-fPIC", "-O2", "-Wall", "-o", str(out), str(SHIM_SOURCE), "-ldl"],
        check=True,
        capture_output=True,
        text=True,
    )
    return out


def journaled(
    factory: ServerFactory, state: Path, shim: Path, journal: Path, *flags: str
) -> Server:
    """The real server with the shim preloaded, journaling the audit directory."""
    audit_dir = (state / "audit").resolve()
    env = {
        "LD_PRELOAD": str(shim),
        "DURABILITY_JOURNAL": str(journal),
        "DURABILITY_TRACK": str(audit_dir),
    }
    return factory(state, *flags, env=env)


def answer_starts(events: list[Event]) -> Iterator[tuple[int, str, bool]]:
    """(index, request id, streamed) of each answer's first bytes to its client."""
    for i, e in enumerate(events):
        if e.kind == "N" and e.data.startswith(b"HTTP/1.1 "):
            found = REQUEST_ID.search(e.data)
            if found:
                yield i, found.group(1).decode(), b"text/event-stream" in e.data


# -- the ordering ----------------------------------------------------------------------


def sync_before_answer(events: list[Event], request_id: str) -> int:
    """Check that the request's record went to the WAL and was fsync'd there before the
    answer's first byte left; the microseconds from that fsync to the first byte."""
    needle = request_id.encode()
    written = next(
        (
            i
            for i, e in enumerate(events)
            if e.kind == "W" and e.path.endswith("audit.db-wal") and needle in e.data
        ),
        None,
    )
    assert written is not None, f"{request_id}: no WAL write holds its request record"
    first = next((i for i, rid, _ in answer_starts(events) if rid == request_id), None)
    assert first is not None, f"{request_id}: its answer never reached the socket"
    port = events[first].offset
    earlier = [i for i, e in enumerate(events[:first]) if e.kind == "N" and e.offset == port]
    assert not earlier, f"{request_id}: bytes went to its client before the answer began"
    assert written < first, f"{request_id}: the answer began before its record was written"
    wal = events[written].path
    synced = [
        i for i in range(written + 1, first) if events[i].kind == "S" and events[i].path == wal
    ]
    assert synced, (
        f"{request_id}: no fsync/fdatasync of {Path(wal).name} between the write of its "
        "request record and the first byte of its answer"
    )
    return (events[first].ns - events[synced[-1]].ns) // 1000


def test_request_record_is_on_disk_before_the_first_byte(
    server_factory: ServerFactory,
    state_dir: Path,
    model_name: str,
    shim: Path,
    tmp_path: Path,
) -> None:
    journal = tmp_path / "journal"
    server = journaled(server_factory, state_dir, shim, journal)
    chat = {
        "model": model_name,
        "messages": [{"role": "user", "content": "Name a colour."}],
        "max_tokens": 4,
        "temperature": 0,
    }
    ids: dict[str, str] = {}
    with server.client() as c:  # a new connection for each answer: its first byte is ours
        plain = c.post("/v1/chat/completions", json=chat)
        assert plain.status_code == 200, plain.text
        ids["chat"] = plain.headers["X-Request-Id"]
    with (
        server.client() as c,
        c.stream("POST", "/v1/chat/completions", json={**chat, "stream": True}) as streamed,
    ):
        assert streamed.status_code == 200
        ids["stream"] = streamed.headers["X-Request-Id"]
        assert any(line.startswith("data: [DONE]") for line in streamed.iter_lines())
    with server.client() as c:
        tensor = c.post(
            f"/v2/models/{LINE}/infer",
            json={
                "inputs": [
                    {
                        "name": "readings",
                        "shape": [1, 4],
                        "datatype": "FP32",
                        "data": [2, 50, 55, 12],
                    }
                ]
            },
        )
        assert tensor.status_code == 200, tensor.text
        ids["tensor"] = tensor.headers["X-Request-Id"]
    # The shim journals a send before it happens: every answer is in the journal now.
    events = read_journal(journal)
    gaps = {what: sync_before_answer(events, rid) for what, rid in ids.items()}
    print(f"fsync of the WAL to the answer's first byte (us): {gaps}")


# -- a power cut -----------------------------------------------------------------------


def power_cut(events: list[Event], cut: int) -> dict[str, bytes]:
    """The tracked files (none before the run) as the disk holds them after a power cut
    just before events[cut]: file by file, the writes and truncations that a later
    fsync of that file covered, and the unlinks that a later fsync of the file or of its
    directory covered. The -shm index is memory, rebuilt from the WAL on open: left
    out."""
    last_sync: dict[str, int] = {}
    for i, e in enumerate(events[:cut]):
        if e.kind == "S":
            last_sync[e.path] = i
    files: dict[str, bytearray] = {}
    for i, e in enumerate(events[:cut]):
        if e.kind not in "WTU":
            continue
        covered = last_sync.get(e.path, -1)
        if e.kind == "U":
            covered = max(covered, last_sync.get(str(Path(e.path).parent), -1))
        if i >= covered:
            continue
        content = files.setdefault(e.path, bytearray())
        if e.kind == "W":
            end = e.offset + len(e.data)
            if len(content) < end:
                content.extend(bytes(end - len(content)))
            content[e.offset : end] = e.data
        elif e.kind == "T":
            del content[e.offset :]
            content.extend(bytes(max(0, e.offset - len(content))))
        else:
            content.clear()
    return {p: bytes(c) for p, c in files.items() if not p.endswith("-shm")}


def lay_down(files: dict[str, bytes], source: Path, target: Path) -> None:
    """Write the rebuilt files of audit directory ``source`` into ``target`` (emptied)."""
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True, mode=0o700)
    for path, data in files.items():
        (target / Path(path).relative_to(source)).write_bytes(data)


def kinds_by_request(db: Path) -> dict[str, list[str]]:
    """What a restarted server would read: sqlite opens the log read-write, as the
    audit store does, recovering the WAL."""
    kinds: dict[str, list[str]] = {}
    if not db.is_file():
        return kinds
    with closing(sqlite3.connect(db)) as conn:
        for request_id, kind in conn.execute(
            "SELECT request_id, kind FROM audit_records ORDER BY seq"
        ):
            kinds.setdefault(str(request_id), []).append(str(kind))
    return kinds


def lost_answers(events: list[Event], cut: int, kinds: dict[str, list[str]]) -> list[str]:
    """The answers begun before the cut whose records the rebuilt log lacks."""
    lost = []
    for i, request_id, streamed in answer_starts(events):
        if i >= cut:
            break
        have = kinds.get(request_id, [])
        if have[:1] != ["request"] or (not streamed and have != ["request", "outcome"]):
            lost.append(f"{request_id} ({'stream' if streamed else 'plain'}: has {have})")
    return lost


def load_until(server: Server, model: str, answers: int) -> list[tuple[str, bool]]:
    """Two clients asking short completions and one streaming chats, until `answers`
    answers have begun to arrive; then kill -9 the server. The answers (request id,
    streamed) whose first bytes the clients had."""
    got: list[tuple[str, bool]] = []
    stop = threading.Event()

    def plain() -> None:
        with server.client(timeout=30) as c:
            for n in range(200):  # bounded
                if stop.is_set():
                    return
                body = {"model": model, "prompt": f"Note {n}:", "max_tokens": 2}
                try:
                    r = c.post("/v1/completions", json=body)
                except httpx.HTTPError:
                    return
                if r.status_code == 200:
                    got.append((r.headers["X-Request-Id"], False))

    def streamer() -> None:
        body = {
            "model": model,
            "messages": [{"role": "user", "content": "Count to ten."}],
            "max_tokens": 12,
            "stream": True,
        }
        with server.client(timeout=30) as c:
            for _ in range(50):  # bounded
                if stop.is_set():
                    return
                try:
                    with c.stream("POST", "/v1/chat/completions", json=body) as r:
                        if r.status_code == 200:
                            got.append((r.headers["X-Request-Id"], True))
                        for _ in r.iter_lines():
                            pass
                except httpx.HTTPError:
                    return

    threads = [threading.Thread(target=plain) for _ in range(2)]
    threads.append(threading.Thread(target=streamer))
    for t in threads:
        t.start()
    try:
        assert wait_for(lambda: len(got) >= answers, 60), f"only {len(got)} answers in 60 s"
        server.kill()  # the power goes: whatever is in flight stays in flight
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    return got


def test_power_cut_loses_no_answered_request(
    server_factory: ServerFactory,
    state_dir: Path,
    model_name: str,
    shim: Path,
    tmp_path: Path,
) -> None:
    seed = random.randrange(1 << 32)
    rng = random.Random(seed)
    audit_dir = (state_dir / "audit").resolve()
    journal = tmp_path / "journal"
    assert not audit_dir.exists()  # the log starts in the run: nothing on disk before it
    server = journaled(server_factory, state_dir, shim, journal, "--queue-depth", "16")
    received = load_until(server, model_name, rng.randint(6, 14))

    events = read_journal(journal)
    starts = list(answer_starts(events))
    sent = {request_id for _, request_id, _ in starts}
    assert {request_id for request_id, _ in received} <= sent
    public_key = crypto.load_public_key(state_dir / "keys" / "audit-signing.pub")
    # Power cuts inside the run, each on its own copy: just before each answer's first
    # byte (the latest its record may reach the disk), and at random events after the
    # first answer; the rebuilt log verifies and holds every answer begun before.
    cuts = sorted(
        {i for i, _, _ in starts}
        | set(rng.sample(range(starts[0][0], len(events)), min(8, len(events) - starts[0][0])))
    )
    for n, cut in enumerate(cuts):
        copy = tmp_path / "cuts" / str(n)
        lay_down(power_cut(events, cut), audit_dir, copy)
        report = chain.verify(copy / "audit.db", public_key, copy / "checkpoints.jsonl")
        assert report.ok, f"seed {seed}, power cut before event {cut}: {report.problem}"
        lost = lost_answers(events, cut, kinds_by_request(copy / "audit.db"))
        assert not lost, f"seed {seed}, power cut before event {cut}: lost {lost}"

    # And the kill -9 itself as a power cut: the rebuilt files replace the real ones, and
    # the product's own reader (appliance audit verify / export) checks them.
    lay_down(power_cut(events, len(events)), audit_dir, audit_dir)
    verified = run_cli("audit", "verify", "--json", state=state_dir)
    report = json.loads(verified.stdout)
    assert verified.returncode == 0 and report["ok"], (seed, report["problem"])
    kinds: dict[str, list[str]] = {}
    for row in audit_rows(state_dir):
        kinds.setdefault(row["request_id"], []).append(row["kind"])
    lost = lost_answers(events, len(events), kinds)
    assert not lost, f"seed {seed}: the power cut lost {lost}"
    print(
        f"seed {seed}: {len(received)} answers received, {len(starts)} begun, "
        f"{len(events)} journal events, {len(cuts)} power cuts checked"
    )
