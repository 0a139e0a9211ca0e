"""The audit store: one writer thread fed by a queue. It commits the waiting records
in one transaction (group commit), numbering, sealing and chaining them inside that
transaction, and seals signed checkpoints every N records or T seconds, idle or not.
Request threads wait for their own commit; a failed write fails their requests.

The head of the chain is read inside each write transaction (BEGIN IMMEDIATE), so a
second process (the CLI recording an administrative action) can append safely.
"""

from __future__ import annotations

import getpass
import hashlib
import logging
import queue
import secrets
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import Connection, insert, select, update

from appliance.audit import crypto
from appliance.audit.chain import Checkpoint, append_to_file
from appliance.audit.records import (
    FIELDS,
    GENESIS,
    Actor,
    Entry,
    aad,
    content_bytes,
    record_hash,
)
from appliance.audit.schema import checkpoints, data_keys, meta, open_engine, records
from appliance.config import Settings

log = logging.getLogger(__name__)
MAX_BATCH = 512


class AuditUnavailable(Exception):
    """The audit log cannot take a record now; the request must not be served."""


def utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def migrate(engine: Any) -> None:
    """Bring the schema to the newest version (Alembic); an upgrade keeps every row."""
    cfg = Config()
    cfg.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


COLUMNS = (*FIELDS, "hash")
INSERT_RECORD = (
    f"INSERT INTO audit_records ({', '.join(COLUMNS)}) VALUES ({', '.join('?' for _ in COLUMNS)})"
)
COUNT_USES = "UPDATE audit_data_keys SET uses = uses + ? WHERE key_id = ?"


def _meta(conn: Connection) -> dict[str, str]:
    return {str(k): str(v) for k, v in conn.execute(select(meta.c.name, meta.c.value)).all()}


@dataclass
class _WriterState:
    version: int
    seq: int
    head: str
    ts: str
    key_id: str | None
    uses: int


@dataclass
class _Pending:
    entry: Entry | None  # None: seal a checkpoint now
    done: threading.Event = field(default_factory=threading.Event)
    seq: int | None = None
    error: str | None = None


Ticket = _Pending


class AuditStore:
    def __init__(self, settings: Settings, *, create_keys: bool = True) -> None:
        self.settings = settings
        self.policy = settings.audit_content
        self.path = settings.audit_db_path
        self.engine = open_engine(self.path)
        self.reader = open_engine(self.path, immediate=False)  # reads never hold the lock
        migrate(self.engine)
        self._data_keys: dict[str, bytes] = {}
        self.master: bytes | None = None
        self._open_keys(create_keys)
        self._queue: queue.Queue[_Pending | list[_Pending] | None] = queue.Queue()
        self.healthy = True
        self.last_error: str | None = None
        self.checkpoint_error: str | None = None
        self._since_checkpoint = self._records_since_checkpoint()
        self._conn: Connection | None = None  # the writer thread's own connection
        self._cached: _WriterState | None = None
        self._unflushed_uses: dict[str, int] = {}
        self._next_seal = time.monotonic() + settings.checkpoint_seconds
        self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
        self._thread.start()

    # -- keys and identity ---------------------------------------------------------

    def _open_keys(self, create: bool) -> None:
        with self.engine.begin() as conn:
            info = _meta(conn)
            n_keys = len(conn.execute(select(data_keys.c.key_id)).all())
            n_checkpoints = len(conn.execute(select(checkpoints.c.id).limit(1)).all())
            if self.policy == "full" or n_keys:
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
                conn.execute(insert(meta).values(name="origin", value=info["origin"]))
                conn.execute(insert(meta).values(name="signing_public_key", value=pub_hex))
            self.origin = info["origin"]
            if self.master is not None and n_keys == 0:
                self._new_data_key(conn)
        pub_path = self.settings.signing_public_key_path
        if not pub_path.exists():
            crypto.write_public_key(pub_path, public)

    def _new_data_key(self, conn: Connection) -> str:
        assert self.master is not None
        key_id = secrets.token_hex(8)
        key = crypto.new_data_key()
        conn.execute(update(data_keys).values(is_primary=0))
        conn.execute(
            insert(data_keys).values(
                key_id=key_id,
                wrapped=crypto.wrap(self.master, key_id, key),
                created=utc_now(),
                is_primary=1,
                uses=0,
            )
        )
        self._data_keys[key_id] = key
        return key_id

    def data_key(self, conn: Connection, key_id: str) -> bytes:
        if key_id not in self._data_keys:
            if self.master is None:
                raise crypto.AuditKeyError("no master key: content cannot be read")
            wrapped: bytes = conn.execute(
                select(data_keys.c.wrapped).where(data_keys.c.key_id == key_id)
            ).scalar_one()
            self._data_keys[key_id] = crypto.unwrap(self.master, key_id, wrapped)
        return self._data_keys[key_id]

    def rotate_key(self) -> str:
        """Make a new data key primary; the older ones stay to read older records."""
        if self.master is None:
            raise crypto.AuditKeyError("no master key: cannot make a data key")
        with self.engine.begin() as conn:
            return self._new_data_key(conn)

    # -- writing -------------------------------------------------------------------

    def append(self, entry: Entry, timeout: float | None = None) -> int:
        """Add a record and return its sequence number once it is durable."""
        return self.wait(self.submit(entry), timeout)

    def submit(self, entry: Entry | None) -> Ticket:
        """Queue a record (None: a checkpoint) without waiting; wait() for it later.
        Lets a request start its model while its record is being committed."""
        if not self._thread.is_alive():
            raise AuditUnavailable("the audit writer is not running")
        ticket = _Pending(entry)
        self._queue.put(ticket)
        return ticket

    def submit_together(self, entries: list[Entry]) -> list[Ticket]:
        """Queue records that must land in the same commit, in this order (a fast
        answer's request and outcome: one fsync instead of two)."""
        if not self._thread.is_alive():
            raise AuditUnavailable("the audit writer is not running")
        tickets = [_Pending(entry) for entry in entries]
        self._queue.put(tickets)
        return tickets

    def wait(self, ticket: Ticket, timeout: float | None = None) -> int:
        """Block until the record is durable; its sequence number (0 for a checkpoint)."""
        limit = self.settings.audit_write_timeout if timeout is None else timeout
        if not ticket.done.wait(limit):
            raise AuditUnavailable(f"the audit record was not durable within {limit} s")
        if ticket.error is not None:
            raise AuditUnavailable(ticket.error)
        return ticket.seq or 0

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
                if isinstance(item, list):
                    batch.extend(item)
                else:
                    batch.append(item)
                if len(batch) >= MAX_BATCH:
                    break
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            if batch or stopping:
                self._write(batch, seal=stopping)

    def _head(self, conn: Connection) -> tuple[int, str, str]:
        row = conn.execute(
            select(records.c.seq, records.c.hash, records.c.ts)
            .order_by(records.c.seq.desc())
            .limit(1)
        ).first()
        if row is not None:
            return int(row[0]), str(row[1]), str(row[2])
        info = _meta(conn)
        return int(info.get("anchor_seq", 0)), info.get("anchor_head", GENESIS), ""

    def _state(self, conn: Connection) -> _WriterState:
        """The chain head and primary key: cached, reread when another connection
        (another process) has committed since (PRAGMA data_version moves)."""
        version = int(conn.exec_driver_sql("PRAGMA data_version").scalar() or 0)
        if self._cached is None or self._cached.version != version:
            seq, head, ts = self._head(conn)
            key = conn.execute(
                select(data_keys.c.key_id, data_keys.c.uses).where(data_keys.c.is_primary == 1)
            ).first()
            self._cached = _WriterState(
                version, seq, head, ts, key[0] if key else None, int(key[1]) if key else 0
            )
        return self._cached

    def _write(self, batch: list[_Pending], seal: bool) -> None:
        entries = [p for p in batch if p.entry is not None]
        seal = seal or len(entries) < len(batch)
        checkpoint = None
        try:
            if self._conn is None:
                self._conn = self.engine.connect()
            conn = self._conn
            with conn.begin():
                state = self._state(conn)
                seq, head, last_ts = state.seq, state.head, state.ts
                rows, sealed_count, key_id = [], 0, state.key_id
                wants_key = self.policy == "full" and any(
                    p.entry.content for p in entries if p.entry
                )
                if wants_key and (key_id is None or state.uses >= self.settings.data_key_max_uses):
                    key_id = self._new_data_key(conn)
                    state.uses = 0
                for p in entries:
                    assert p.entry is not None
                    seq += 1
                    last_ts = max(utc_now(), last_ts)
                    row = self._seal_entry(conn, p.entry, seq, last_ts, head, key_id)
                    sealed_count += row["ciphertext"] is not None
                    rows.append(row)
                    head = row["hash"]
                    p.seq = seq
                if rows:
                    conn.exec_driver_sql(
                        INSERT_RECORD, [tuple(r[c] for c in COLUMNS) for r in rows]
                    )
                unflushed = dict(self._unflushed_uses)
                if sealed_count and key_id is not None:
                    unflushed[key_id] = unflushed.get(key_id, 0) + sealed_count
                due = self._since_checkpoint + len(rows) >= self.settings.checkpoint_records
                if seal or due or time.monotonic() >= self._next_seal:
                    checkpoint = self._checkpoint(conn, seq, head)
                    # Key use counts are written with each checkpoint, not each batch: a
                    # crash forgets at most checkpoint_records uses, far inside the margin
                    # data_key_max_uses leaves below AES-GCM's 2^32.
                    for used_key, count in unflushed.items():
                        conn.exec_driver_sql(COUNT_USES, (count, used_key))
                    unflushed = {}
            state.seq, state.head, state.ts = seq, head, last_ts
            state.key_id, state.uses = key_id, state.uses + sealed_count
            self._since_checkpoint += len(rows)
            self._unflushed_uses = unflushed
        except Exception as exc:  # disk full, read-only, locked: fail these requests
            self._cached = None
            if self._conn is not None:
                self._conn.close()
                self._conn = None
            self.healthy = False
            self.last_error = f"{type(exc).__name__}: {exc}"
            log.error("audit write failed", extra={"error": self.last_error})
            for p in batch:
                p.seq, p.error = None, f"the audit log cannot be written: {self.last_error}"
                p.done.set()
            return
        self.healthy, self.last_error = True, None
        if checkpoint is not None:
            self._since_checkpoint = 0
            self._next_seal = time.monotonic() + self.settings.checkpoint_seconds
            try:
                append_to_file(self.settings.checkpoint_path, checkpoint)
                self.checkpoint_error = None
            except OSError as exc:
                self.checkpoint_error = f"checkpoint file {self.settings.checkpoint_path}: {exc}"
                log.error("checkpoint not copied out", extra={"error": self.checkpoint_error})
        for p in batch:
            p.done.set()

    def _seal_entry(
        self, conn: Connection, entry: Entry, seq: int, ts: str, prev: str, key_id: str | None
    ) -> dict[str, Any]:
        row: dict[str, Any] = {
            "seq": seq,
            "ts": ts,
            "kind": entry.kind,
            "request_id": entry.request_id,
            "actor_id": entry.actor.id,
            "actor_name": entry.actor.name,
            "actor_role": entry.actor.role,
            "client": entry.client,
            "method": entry.method,
            "route": entry.route,
            "model": entry.model,
            "model_sha256": entry.model_sha256,
            "status": entry.status,
            "error_type": entry.error_type,
            "latency_us": entry.latency_us,
            "prompt_tokens": entry.prompt_tokens,
            "completion_tokens": entry.completion_tokens,
            "finish_reason": entry.finish_reason,
            "content_policy": self.policy,
            "key_id": None,
            "nonce": None,
            "ciphertext": None,
            "content_digest": None,
            "prev_hash": prev,
        }
        if entry.content is not None and self.policy != "none":
            plain = content_bytes(entry.content)
            if self.policy == "full":
                assert key_id is not None
                sealed = crypto.seal(self.data_key(conn, key_id), plain, aad(seq, ts, key_id))
                row.update(key_id=key_id, nonce=sealed.nonce, ciphertext=sealed.ciphertext)
            else:
                row["content_digest"] = hashlib.sha256(plain).hexdigest()
        row["hash"] = record_hash(row)
        return row

    def _checkpoint(self, conn: Connection, size: int, head: str) -> Checkpoint:
        cp = Checkpoint(self.origin, size, head, utc_now(), self.key_fingerprint)
        cp = cp.signed(self.signing_key)
        conn.execute(
            insert(checkpoints).values(
                origin=cp.origin,
                size=cp.size,
                head=cp.head,
                ts=cp.ts,
                key=cp.key,
                signature=cp.signature,
            )
        )
        return cp

    def _records_since_checkpoint(self) -> int:
        with self.engine.begin() as conn:
            head, _, _ = self._head(conn)
            last = conn.execute(
                select(checkpoints.c.size).order_by(checkpoints.c.id.desc()).limit(1)
            ).scalar()
        return head - int(last or 0)

    # -- keeping ---------------------------------------------------------------------

    def purge_before(self, cutoff: str) -> int:
        """Remove the records older than ``cutoff`` (ISO time). A signed checkpoint at
        the cut keeps the rest verifiable. Returns the last purged sequence number."""
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
            cp = self._checkpoint(conn, seq, head)
            conn.execute(records.delete().where(records.c.seq <= seq))
            for name, value in (("anchor_seq", str(seq)), ("anchor_head", head)):
                conn.execute(meta.delete().where(meta.c.name == name))
                conn.execute(insert(meta).values(name=name, value=value))
        append_to_file(self.settings.checkpoint_path, cp)
        return seq

    def close(self) -> None:
        """Stop the writer after what is queued, sealing a last checkpoint."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(10)
        if self._conn is not None:
            self._conn.close()
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
    """An administrative action, done from the CLI, as an audit record."""
    return store.append(
        Entry(
            kind="admin",
            route=action,
            method="CLI",
            status=0,
            content={"action": action, **details},
            actor=local_actor(),
        )
    )
