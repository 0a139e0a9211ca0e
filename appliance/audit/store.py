"""The audit store: one writer thread fed by a queue. It commits the waiting records
in one transaction (group commit), numbering, sealing and chaining them inside that
transaction, and seals signed checkpoints every N records or T seconds, idle or not.
Request threads wait for their own commit; a failed write fails their requests. When
nothing is queued and nobody is writing, a request thread commits its own records
itself, under the same lock and in the same way: an idle log costs a request one
commit, not two thread hand-offs around it.

The head of the chain is read inside each write transaction (BEGIN IMMEDIATE), so a
second process (the CLI recording an administrative action) can append safely.

The writer's own path is lean, because a request waits on it: plain SQL on its
sqlite3 connection (opened by appliance.db with WAL and synchronous=FULL, so every
commit is fsync'd), and the WAL copied back into the database (a checkpoint) by the
writer itself after it has released the waiting requests, never inside a commit. A
checkpointed WAL is then reused from its start, so a commit overwrites blocks the file
already has: its fdatasync needs no journal commit of the file's size, which on a busy
disk costs milliseconds.
"""

from __future__ import annotations

import getpass
import hmac
import logging
import os
import queue
import secrets
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import Connection, select
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import PoolProxiedConnection

from appliance.audit import crypto, witness
from appliance.audit.chain import Checkpoint, append_to_file
from appliance.audit.records import (
    FIELDS,
    GENESIS,
    Actor,
    Entry,
    aad,
    content_bytes,
    record_hash,
    storable,
)
from appliance.audit.schema import checkpoints, data_keys, open_engine, records
from appliance.clock import utc_second
from appliance.config import Settings
from appliance.db import upgrade

log = logging.getLogger(__name__)
MAX_BATCH = 512
# `digest` content: an HMAC-SHA256 under a key derived from the master key (records
# written before it hold a bare SHA-256 hex digest, which verifies the same way).
DIGEST_PREFIX = "hmac-sha256:"
# New records are sealed by a signed checkpoint at most this long after they are written.
SEAL_WITHIN_SECONDS = 2.0
# Checkpoint the WAL (off the commit path) after about this many pages were written to
# it: ~1 MiB, which then stays allocated and is overwritten, never grown, by commits.
WAL_CHECKPOINT_PAGES = 256
# After a failed write the writer tries again (an empty checkpoint) this often, idle or
# not, so that the log is found writable again, and /readyz ready, once the fault clears.
RETRY_SECONDS = 1.0
# How long a request whose records the writer has taken into a commit waits for that
# commit past audit_write_timeout: the lock is held by then, only the fsync is left.
CLAIMED_GRACE_SECONDS = 30.0


class AuditUnavailable(Exception):
    """The audit log cannot take a record now; the request must not be served."""


def _file_id(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def utc_now() -> str:
    """The time as records carry it: %Y-%m-%dT%H:%M:%S.%fZ."""
    second, micros = divmod(time.time_ns() // 1000, 1_000_000)
    return f"{utc_second(second)}.{micros:06d}Z"


# The newest migration in migrations/versions (a test keeps them equal). A database
# already there is not handed to Alembic, whose import costs the service ~11 MiB.
SCHEMA_HEAD = "0001"


def migrate(engine: Any) -> None:
    """Bring the schema to the newest version (Alembic); an upgrade keeps every row."""
    upgrade(engine, Path(__file__).parent / "migrations", SCHEMA_HEAD)


COLUMNS = (*FIELDS, "hash")
CIPHERTEXT = COLUMNS.index("ciphertext")
NONCE = COLUMNS.index("nonce")
assert CIPHERTEXT == NONCE + 1  # _seal_entry swaps both for their hex at once
INSERT_RECORD = (
    f"INSERT INTO audit_records ({', '.join(COLUMNS)}) VALUES ({', '.join('?' for _ in COLUMNS)})"
)
COUNT_USES = "UPDATE audit_data_keys SET uses = uses + ? WHERE key_id = ?"
SELECT_HEAD = "SELECT seq, hash, ts FROM audit_records ORDER BY seq DESC LIMIT 1"
SELECT_META = "SELECT name, value FROM audit_meta"
INSERT_META = "INSERT INTO audit_meta (name, value) VALUES (?, ?)"
DELETE_META = "DELETE FROM audit_meta WHERE name = ?"
SELECT_PRIMARY = "SELECT key_id, uses FROM audit_data_keys WHERE is_primary = 1"
SELECT_WRAPPED = "SELECT wrapped FROM audit_data_keys WHERE key_id = ?"
UNSET_PRIMARY = "UPDATE audit_data_keys SET is_primary = 0"
INSERT_KEY = (
    "INSERT INTO audit_data_keys (key_id, wrapped, created, is_primary, uses) "
    "VALUES (?, ?, ?, 1, 0)"
)
INSERT_CHECKPOINT = (
    "INSERT INTO audit_checkpoints (origin, size, head, ts, key, signature) "
    "VALUES (?, ?, ?, ?, ?, ?)"
)

# Runs one SQL statement with its parameters: a sqlite3 connection's execute (the
# writer's) or an SQLAlchemy connection's exec_driver_sql (everything else).
Execute = Callable[..., Any]


def _sa(conn: Connection) -> Execute:
    return conn.exec_driver_sql


def _meta(execute: Execute) -> dict[str, str]:
    return {str(k): str(v) for k, v in execute(SELECT_META).fetchall()}


@dataclass
class _WriterState:
    version: int
    seq: int
    head: str
    ts: str
    key_id: str | None
    uses: int


class _Done:
    """Set once by the writer; waited on by the request threads. A bare lock, held
    until set: the cheapest hand-off between two threads Python has."""

    __slots__ = ("_lock", "_set", "abandoned", "claimed")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lock.acquire()
        self._set = False
        # Under AuditStore._claims: the waiter gave up (its request was refused), or the
        # writer took the records into a commit first (the waiter waits for its end).
        self.abandoned = False
        self.claimed = False

    def set(self) -> None:
        if not self._set:
            self._set = True
            self._lock.release()

    def wait(self, timeout: float) -> bool:
        if self._set:
            return True
        if self._lock.acquire(True, timeout):
            self._lock.release()  # let any other waiter through too
            return True
        return self._set


class _Pending:
    """A record on its way to the log; its seq (or error) is set before `done` is."""

    __slots__ = ("done", "entry", "error", "seq")

    def __init__(self, entry: Entry | None, done: _Done | None = None) -> None:
        self.entry = entry  # None: seal a checkpoint now
        self.done = done or _Done()
        self.seq: int | None = None
        self.error: str | None = None


Ticket = _Pending


class AuditStore:
    def __init__(self, settings: Settings, *, create_keys: bool = True) -> None:
        self.settings = settings
        self.policy = settings.audit_content
        self.path = settings.audit_db_path
        self.engine = open_engine(self.path)
        self.reader = open_engine(self.path, immediate=False)  # reads never hold the lock
        migrate(self.engine)
        # The file the connections hold open. SQLite goes on writing to it when it is
        # moved or deleted (its directory too), where nobody reads it: each write checks
        # that the path still names it.
        self._file = _file_id(self.path)
        self._data_keys: dict[str, bytes] = {}
        self._aead: dict[str, AESGCM] = {}  # the writer's cipher per data key
        self.master: bytes | None = None
        self._open_keys(create_keys)
        self._queue: queue.SimpleQueue[_Pending | list[_Pending] | None] = queue.SimpleQueue()
        self.healthy = True
        self.last_error: str | None = None
        self.checkpoint_error: str | None = None
        self._since_checkpoint = self._records_since_checkpoint()
        self._proxied: PoolProxiedConnection | None = None  # the writer thread's own
        self._db: sqlite3.Connection | None = None  # ... and its sqlite3 connection
        self._cached: _WriterState | None = None
        self._wal_pages = 0  # written to the WAL since the writer last checkpointed it
        # Who writes holds this: the writer thread, or a request thread writing its own.
        self._lock = threading.Lock()
        self._claims = threading.Lock()  # a record is abandoned or committed, never both
        self._closed = False
        self._wal_asked = False  # a request thread asked the writer to copy the WAL back
        self._unflushed_uses: dict[str, int] = {}
        self._next_seal = time.monotonic() + settings.checkpoint_seconds
        self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
        self._thread.start()

    # -- keys and identity ---------------------------------------------------------

    def _open_keys(self, create: bool) -> None:
        with self.engine.begin() as conn:
            info = _meta(_sa(conn))
            n_keys = len(conn.execute(select(data_keys.c.key_id)).all())
            n_checkpoints = len(conn.execute(select(checkpoints.c.id).limit(1)).all())
            if self.policy in ("full", "digest") or n_keys:
                try:
                    self.master = crypto.load_master_key(
                        self.settings.master_key_path, create=create and n_keys == 0
                    )
                except crypto.AuditKeyError as exc:
                    if n_keys:
                        raise crypto.AuditKeyError(
                            f"{exc}; the audit log {self.path} holds records encrypted under "
                            "it: restore the key file (or its systemd credential)"
                        ) from None
                    raise
            self.signing_key: Ed25519PrivateKey = crypto.load_signing_key(
                self.settings.signing_key_path, create=create and n_checkpoints == 0
            )
            public = self.signing_key.public_key()
            self.key_fingerprint = crypto.fingerprint(public)
            pub_hex = crypto.public_raw(public).hex()
            if "signing_public_key" in info and info["signing_public_key"] != pub_hex:
                raise crypto.AuditKeyError(
                    f"signing key {self.settings.signing_key_path} is not the key that seals "
                    f"the audit log {self.path}"
                )
            if "origin" not in info:
                info["origin"] = str(uuid.uuid4())
                conn.exec_driver_sql(INSERT_META, ("origin", info["origin"]))
                conn.exec_driver_sql(INSERT_META, ("signing_public_key", pub_hex))
            self.origin = info["origin"]
            if self.master is not None and n_keys == 0:
                self._new_data_key(_sa(conn))
        pub_path = self.settings.signing_public_key_path
        if not pub_path.exists() or pub_path.stat().st_size == 0:  # (empty: cut short)
            crypto.write_public_key(pub_path, public)

    def _digest_key(self) -> bytes:
        """What `digest` content is keyed with: derived from the master key, so that the
        log cannot confirm a guessed prompt to whoever lacks the key (a bare SHA-256
        would, for short or predictable text)."""
        assert self.master is not None
        return hmac.new(self.master, b"appliance-audit-digest-v1", "sha256").digest()

    def _new_data_key(self, execute: Execute) -> str:
        assert self.master is not None
        key_id = secrets.token_hex(8)
        key = crypto.new_data_key()
        execute(UNSET_PRIMARY)
        execute(INSERT_KEY, (key_id, crypto.wrap(self.master, key_id, key), utc_now()))
        self._data_keys[key_id] = key
        return key_id

    def data_key(self, conn: Connection | sqlite3.Connection, key_id: str) -> bytes:
        if key_id not in self._data_keys:
            if self.master is None:
                raise crypto.AuditKeyError("no master key: content cannot be read")
            execute = conn.execute if isinstance(conn, sqlite3.Connection) else _sa(conn)
            row = execute(SELECT_WRAPPED, (key_id,)).fetchone()
            if row is None:
                raise crypto.AuditKeyError(f"data key {key_id} is not in the audit log")
            self._data_keys[key_id] = crypto.unwrap(self.master, key_id, bytes(row[0]))
        return self._data_keys[key_id]

    def rotate_key(self) -> str:
        """Make a new data key primary; the older ones stay to read older records."""
        if self.master is None:
            raise crypto.AuditKeyError("no master key: cannot make a data key")
        with self.engine.begin() as conn:
            return self._new_data_key(_sa(conn))

    # -- writing -------------------------------------------------------------------

    def append(self, entry: Entry, timeout: float | None = None) -> int:
        """Add a record and return its sequence number once it is durable."""
        return self.commit([entry], timeout)[0]

    def commit(self, entries: list[Entry], timeout: float | None = None) -> list[int]:
        """Write records in one transaction, in this order (a fast answer's request
        and outcome: one fsync, not two), and return their sequence numbers once they
        are durable. When no one else is writing, the calling thread writes them
        itself: no hand-off to the writer thread and back, two wake-ups that a busy
        machine can each stretch to a scheduler tick. Otherwise they join the writer
        thread's next group commit."""
        if not self._thread.is_alive():
            raise AuditUnavailable("the audit writer is not running")
        done = _Done()  # one commit: one signal for all of them
        tickets = [_Pending(entry, done) for entry in entries]
        # Records already queued go first, all in the writer's next commit (group
        # commit under load); a request writes its own only when the log is idle.
        if self._queue.empty() and self._lock.acquire(blocking=False):
            try:
                if self._closed:
                    raise AuditUnavailable("the audit log is closed")
                self._write(tickets, seal=False, copy_wal=False)
            finally:
                self._lock.release()
        else:
            self._queue.put(tickets)
        return [self.wait(ticket, timeout) for ticket in tickets]

    def submit(self, entry: Entry | None) -> Ticket:
        """Queue a record (None: a checkpoint) without waiting; wait() for it later.
        Lets a request start its model while its record is being committed."""
        if not self._thread.is_alive():
            raise AuditUnavailable("the audit writer is not running")
        ticket = _Pending(entry)
        self._queue.put(ticket)
        return ticket

    def wait(self, ticket: Ticket, timeout: float | None = None) -> int:
        """Block until the record is durable; its sequence number (0 for a checkpoint)."""
        limit = self.settings.audit_write_timeout if timeout is None else timeout
        # Late: refused, unless the writer already holds the record in a commit (then
        # its end decides): a record written after its request was refused would say
        # that it was served.
        if not ticket.done.wait(limit) and (
            self._abandon(ticket.done) or not ticket.done.wait(CLAIMED_GRACE_SECONDS)
        ):
            raise AuditUnavailable(f"the audit record was not durable within {limit} s")
        if ticket.error is not None:
            raise AuditUnavailable(ticket.error)
        return ticket.seq or 0

    def _abandon(self, done: _Done) -> bool:
        """Give up on records the writer has not taken yet; False if it has."""
        with self._claims:
            done.abandoned = not done.claimed
            return done.abandoned

    def _claim(self, done: _Done) -> bool:
        """Take records into the commit under way, unless their request was refused."""
        with self._claims:
            done.claimed = not done.abandoned
            return done.claimed

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def seal(self, timeout: float | None = None) -> None:
        """Write a signed checkpoint now."""
        self.wait(self.submit(None), timeout)

    def _run(self) -> None:
        stopping = False
        while not stopping:
            try:
                first = self._queue.get(timeout=max(0.0, self._next_seal - time.monotonic()))
            except queue.Empty:
                first = _Pending(None)  # idle: seal the quiet period too
            batch: list[_Pending] = []
            item: _Pending | list[_Pending] | None = first
            while True:
                if item is None:
                    stopping = True
                    break
                if isinstance(item, list):  # [] only wakes the writer to copy the WAL
                    batch.extend(item)
                else:
                    batch.append(item)
                if len(batch) >= MAX_BATCH:
                    break
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            with self._lock:
                if batch or stopping:
                    self._write(batch, seal=stopping)
                if self._wal_pages >= WAL_CHECKPOINT_PAGES:
                    self._checkpoint_wal()

    def _head(self, execute: Execute) -> tuple[int, str, str]:
        row = execute(SELECT_HEAD).fetchone()
        if row is not None:
            return int(row[0]), str(row[1]), str(row[2])
        info = _meta(execute)
        return int(info.get("anchor_seq", 0)), info.get("anchor_head", GENESIS), ""

    def _state(self, db: sqlite3.Connection) -> _WriterState:
        """The chain head and primary key: cached, reread when another connection
        (another process) has committed since (PRAGMA data_version moves)."""
        version = int(db.execute("PRAGMA data_version").fetchone()[0])
        if self._cached is None or self._cached.version != version:
            seq, head, ts = self._head(db.execute)
            key = db.execute(SELECT_PRIMARY).fetchone()
            self._cached = _WriterState(
                version, seq, head, ts, key[0] if key else None, int(key[1]) if key else 0
            )
        return self._cached

    def _connect(self) -> sqlite3.Connection:
        """The writing connection (used under self._lock), with the pragmas every
        connection gets; a lock held by another process past audit_write_timeout
        fails the write (503) rather than holding its request longer."""
        if self._db is None:
            self._proxied = self.engine.raw_connection()
            db = self._proxied.driver_connection
            assert isinstance(db, sqlite3.Connection)
            busy_ms = int(min(10.0, self.settings.audit_write_timeout) * 1000)
            db.execute(f"PRAGMA busy_timeout={busy_ms}")
            db.execute("PRAGMA wal_autocheckpoint=0")  # the writer checkpoints, not COMMIT
            self._db = db
        return self._db

    def _check_in_place(self) -> None:
        """Raise unless the audit database's path still names the file the writer holds
        open: moved or deleted, SQLite would write on to a file nobody reads."""
        try:
            found = _file_id(self.path)
        except OSError as exc:
            raise AuditUnavailable(
                f"the audit database {self.path} is not there (moved or removed while "
                f"open): {exc.strerror}"
            ) from None
        if found != self._file:
            raise AuditUnavailable(
                f"the audit database {self.path} was replaced while open: restart the "
                "service to open it"
            )

    def _after_failure(self) -> None:
        """Roll back and keep the connection: closing what may be the last one would
        checkpoint and delete the WAL, and on a full disk the space that frees would
        let the next write through once, calling a full disk writable. A connection
        that cannot even roll back is dropped."""
        db = self._db
        if db is None:
            return
        try:
            if db.in_transaction:
                db.execute("ROLLBACK")
        except sqlite3.Error:
            proxied, self._proxied, self._db = self._proxied, None, None
            if proxied is not None:
                try:
                    proxied.invalidate()
                except Exception:  # already broken: nothing more to release
                    log.debug("audit writer connection dropped", exc_info=True)

    def _write(self, batch: list[_Pending], seal: bool, copy_wal: bool = True) -> None:
        """Commit a batch (under self._lock). Without `copy_wal` (a request thread
        writing its own records) a due WAL checkpoint is left to the writer thread, so
        that the request does not wait for it; a due signed checkpoint is sealed here
        as always (one batch in checkpoint_records)."""
        entries = [p for p in batch if p.entry is not None]
        seal = seal or len(entries) < len(batch)
        checkpoint = None
        try:
            db = self._connect()
            db.execute("BEGIN IMMEDIATE")
            try:
                state = self._state(db)
                seq, head, last_ts = state.seq, state.head, state.ts
                rows, sealed_count, key_id = [], 0, state.key_id
                wants_key = self.policy == "full" and any(
                    p.entry.content for p in entries if p.entry
                )
                if wants_key and (key_id is None or state.uses >= self.settings.data_key_max_uses):
                    key_id = self._new_data_key(db.execute)
                    state.uses = 0
                for p in entries:
                    assert p.entry is not None
                    if not self._claim(p.done):  # its request was refused meanwhile
                        p.error = "the request stopped waiting for its audit record"
                        continue
                    last_ts = max(utc_now(), last_ts)
                    try:
                        row = self._seal_entry(db, p.entry, seq + 1, last_ts, head, key_id)
                    except Exception as exc:  # this record alone: the batch goes on
                        p.error = f"the audit record could not be sealed: {exc}"
                        log.error("audit record refused", extra={"error": p.error})
                        continue
                    seq += 1
                    sealed_count += row[CIPHERTEXT] is not None
                    rows.append(row)
                    head = row[-1]
                    p.seq = seq
                if rows:
                    db.executemany(INSERT_RECORD, rows)
                unflushed = dict(self._unflushed_uses)
                if sealed_count and key_id is not None:
                    unflushed[key_id] = unflushed.get(key_id, 0) + sealed_count
                due = self._since_checkpoint + len(rows) >= self.settings.checkpoint_records
                if seal or due or time.monotonic() >= self._next_seal:
                    checkpoint = self._checkpoint(db.execute, seq, head)
                    # Key use counts are written with each checkpoint, not each batch: a
                    # crash forgets at most checkpoint_records uses, far inside the margin
                    # data_key_max_uses leaves below AES-GCM's 2^32.
                    for used_key, count in unflushed.items():
                        db.execute(COUNT_USES, (count, used_key))
                    unflushed = {}
                self._check_in_place()  # moved away: nothing goes into it
                db.execute("COMMIT")  # synchronous=FULL: the WAL is fsync'd here
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")  # what it wrote is not committed: not durable
                raise
            self._check_in_place()  # moved during the commit: its requests are refused
            state.seq, state.head, state.ts = seq, head, last_ts
            state.key_id, state.uses = key_id, state.uses + sealed_count
            self._since_checkpoint += len(rows)
            self._unflushed_uses = unflushed
        except Exception as exc:  # disk full, read-only, locked, moved: fail these requests
            self._cached = None
            self._after_failure()
            error = f"{type(exc).__name__}: {exc}"
            if self.healthy or error != self.last_error:  # not once a second while it lasts
                log.error("audit write failed", extra={"error": error})
            self.healthy, self.last_error = False, error
            for p in batch:
                p.seq, p.error = None, f"the audit log cannot be written: {self.last_error}"
                p.done.set()
            # Try again soon, idle or not: the fault may clear with no request to notice.
            self._next_seal = time.monotonic() + RETRY_SECONDS
            if threading.current_thread() is not self._thread:
                self._queue.put([])  # the writer waits for the new time, not the old one
            return
        if not self.healthy:
            log.warning("audit log writable again", extra={"error": self.last_error})
        self.healthy, self.last_error = True, None
        for p in batch:  # durable: the requests may answer now
            if p.entry is not None:
                p.done.set()
        if rows and checkpoint is None:
            # Records after the last checkpoint could be rewritten unnoticed: seal them
            # within SEAL_WITHIN_SECONDS, busy or idle (the writer may be waiting out a
            # longer idle timeout: wake it).
            soon = time.monotonic() + SEAL_WITHIN_SECONDS
            if self._next_seal > soon:
                self._next_seal = soon
                if threading.current_thread() is not self._thread:
                    self._queue.put([])
        if checkpoint is not None:
            self._since_checkpoint = 0
            self._next_seal = time.monotonic() + self.settings.checkpoint_seconds
            try:
                append_to_file(self.settings.checkpoint_path, checkpoint)
                self.checkpoint_error = None
            except OSError as exc:
                self.checkpoint_error = f"checkpoint file {self.settings.checkpoint_path}: {exc}"
                log.error("checkpoint not copied out", extra={"error": self.checkpoint_error})
        for p in batch:  # who asked for a checkpoint waits for its external copy too
            p.done.set()
        # Table leaf, two index leaves, and a page for every few more records.
        self._wal_pages += 3 + len(rows) // 4
        if not copy_wal and self._wal_pages >= WAL_CHECKPOINT_PAGES and not self._wal_asked:
            self._wal_asked = True
            self._queue.put([])  # the writer thread copies the WAL back

    def _checkpoint_wal(self) -> None:
        """Copy the WAL into the database (under self._lock), so that the next commit
        starts the WAL over (PASSIVE: never waits for readers; what they still read is
        copied next time)."""
        self._wal_pages, self._wal_asked = 0, False
        try:
            self._connect().execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        except (sqlite3.Error, DBAPIError) as exc:  # a full disk, or no reconnecting:
            # the records are safe in the WAL; the writer must live on to say so.
            log.warning("audit WAL checkpoint failed", extra={"error": str(exc)})

    def _seal_entry(
        self,
        db: sqlite3.Connection,
        entry: Entry,
        seq: int,
        ts: str,
        prev: str,
        key_id: str | None,
    ) -> tuple[Any, ...]:
        """The record's columns, in COLUMNS order, its hash last."""
        key_col = nonce = ciphertext = digest = None
        binary_hex: tuple[str, str] | None = None  # nonce and ciphertext as the hash has them
        if entry.content is not None and self.policy != "none":
            plain = content_bytes(entry.content)
            if self.policy == "full":
                assert key_id is not None
                aead = self._aead.get(key_id)
                if aead is None:
                    aead = self._aead[key_id] = AESGCM(self.data_key(db, key_id))
                sealed = crypto.seal_with(aead, plain, aad(seq, ts, key_id))
                key_col, nonce, ciphertext = key_id, sealed.nonce, sealed.ciphertext
                binary_hex = (nonce.hex(), ciphertext.hex())
            else:
                digest = DIGEST_PREFIX + hmac.new(self._digest_key(), plain, "sha256").hexdigest()
        actor = entry.actor
        values = (
            seq,
            ts,
            entry.kind,
            entry.request_id,
            actor.id,
            actor.name,
            actor.role,
            entry.client,
            entry.method,
            entry.route,
            entry.model,
            entry.model_sha256,
            entry.status,
            entry.error_type,
            entry.latency_us,
            entry.prompt_tokens,
            entry.completion_tokens,
            entry.finish_reason,
            self.policy,
            key_col,
            nonce,
            ciphertext,
            digest,
            prev,
        )
        # The hash's canonical form writes binary columns in hex: hand them over so.
        values = tuple(storable(v) for v in values)
        hashed = (
            values if binary_hex is None else (*values[:NONCE], *binary_hex, *values[NONCE + 2 :])
        )
        return (*values, record_hash(hashed))

    def _checkpoint(self, execute: Execute, size: int, head: str) -> Checkpoint:
        cp = Checkpoint(self.origin, size, head, utc_now(), self.key_fingerprint)
        cp = cp.signed(self.signing_key)
        execute(INSERT_CHECKPOINT, (cp.origin, cp.size, cp.head, cp.ts, cp.key, cp.signature))
        return cp

    def _records_since_checkpoint(self) -> int:
        with self.engine.begin() as conn:
            head, _, _ = self._head(_sa(conn))
            last = conn.execute(
                select(checkpoints.c.size).order_by(checkpoints.c.id.desc()).limit(1)
            ).scalar()
        return head - int(last or 0)

    # -- keeping ---------------------------------------------------------------------

    def purge_preview(self, cutoff: str) -> dict[str, Any]:
        """What purge_before(cutoff) would remove, so that IT sees what goes before it
        goes: counts by kind, the refusals of unknown callers among them, the newest."""
        with self.reader.connect() as conn:
            rows = conn.exec_driver_sql(
                "SELECT kind, COUNT(*), MAX(seq), MAX(ts), "
                "SUM(actor_role IS NULL AND status IN (401, 403, 429)) "
                "FROM audit_records WHERE ts < ? GROUP BY kind",
                (cutoff,),
            ).all()
        return {
            "records": sum(int(r[1]) for r in rows),
            "through": max((int(r[2]) for r in rows), default=0),
            "newest": max((str(r[3]) for r in rows), default=None),
            "by_kind": {str(r[0]): int(r[1]) for r in rows},
            "unknown_refusals": sum(int(r[4] or 0) for r in rows),
        }

    def purge_before(self, cutoff: str, by: str) -> int:
        """Remove the records older than ``cutoff`` (ISO time). A signed *purge*
        checkpoint at the cut, naming ``by``, keeps the rest verifiable; it goes to the
        external file first (no copy there, no purge). Returns the last purged seq."""
        with self.engine.begin() as conn:
            conn.exec_driver_sql("PRAGMA secure_delete=ON")
            last = conn.execute(
                select(records.c.seq, records.c.hash)
                .where(records.c.ts < cutoff)
                .order_by(records.c.seq.desc())
                .limit(1)
            ).first()
            if last is None:
                return 0
            seq, head = int(last[0]), str(last[1])
            cut = Checkpoint(
                self.origin, seq, head, utc_now(), self.key_fingerprint, purged_by=by
            ).signed(self.signing_key)
            append_to_file(self.settings.checkpoint_path, cut)
            # What the Merkle tree keeps of the purged records: a few subtree hashes.
            kept = witness.purge_nodes(self.settings, _sa(conn), seq)
            conn.execute(records.delete().where(records.c.seq <= seq))
            for name, value in (
                ("anchor_seq", str(seq)),
                ("anchor_head", head),
                ("anchor_checkpoint", cut.line()),
                ("merkle_nodes", kept),
            ):
                conn.exec_driver_sql(DELETE_META, (name,))
                conn.exec_driver_sql(INSERT_META, (name, value))
        return seq

    def close(self) -> None:
        """Stop the writer after what is queued, sealing a last checkpoint."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(10)
        with self._lock:
            self._closed = True
            if self._proxied is not None and not self._thread.is_alive():
                self._proxied.close()
                self._proxied = self._db = None
        self.engine.dispose()
        self.reader.dispose()


def local_actor() -> Actor:
    """Who runs a CLI command: the operating-system account."""
    try:
        name = getpass.getuser()
    except (KeyError, OSError):
        name = "unknown"
    return Actor(f"os:{name}", name, "local-admin")


def record_admin(store: AuditStore, action: str, details: dict[str, Any]) -> int:
    """An administrative action, done from the CLI, as an audit record; a high-value
    one (purge, key rotation, promotion) is witnessed at once."""
    seq = store.append(
        Entry(
            kind="admin",
            route=action,
            method="CLI",
            status=0,
            content={"action": action, **details},
            actor=local_actor(),
        )
    )
    witness.after_admin(store, action)
    return seq
