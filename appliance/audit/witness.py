"""Witnessed checkpoints: a C2SP tlog-witness client for the audit log.

Whoever holds the checkpoint signing key can rewrite the records and re-sign every
checkpoint: the chain and its signatures then verify. A witness, a small service on
another machine of the site, closes that hole: it keeps, per log, only the size and
Merkle root (RFC 6962) it last cosigned, and cosigns a new checkpoint only with a
consistency proof from that one. A rewritten, rolled-back or forked log cannot get a
cosignature, and the cosignatures the box kept no longer match its records.

The checkpoint (c2sp.org/tlog-checkpoint) is a signed note, signed with the audit
log's Ed25519 key under the log's origin ``appliance.local/<log id>/audit``:

    appliance.local/<log id>/audit
    <size: the last record's seq>
    <base64 Merkle root over the records' hashes>

    — appliance.local/<log id>/audit <base64(key ID || signature)>

It goes to ``<witness_url>/add-checkpoint`` (c2sp.org/tlog-witness) every
``witness_interval`` seconds while records were added, from a thread of its own
(requests never wait on it), and at once after a purge, a key rotation or a model
promotion. The cosignature (c2sp.org/tlog-cosignature, Ed25519 cosignature/v1) is
checked against the configured witness key and kept, with the checkpoint, a JSON
line each, in ``<checkpoint file's name>-witnessed.jsonl`` beside the checkpoint file.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from appliance.audit import crypto, merkle
from appliance.config import Settings, SettingsError

if TYPE_CHECKING:
    from flask import Flask

    from appliance.audit.store import AuditStore

log = logging.getLogger(__name__)
EXTENSION = "appliance.witness"
DASH = "\u2014"  # signature lines start with an em dash and a space
NOTE_ED25519, COSIGNATURE_ED25519 = 0x01, 0x04
# Administrative actions cosigned at once, not at the next tick.
HIGH_VALUE_ACTIONS = frozenset(
    {"audit purge", "audit rotate-key", "models.promote", "models.rollback"}
)
REQUEST_TIMEOUT = 10.0  # seconds, one add-checkpoint exchange
MAX_BODY = 64 << 10  # a witness's answer: a few signature lines
# The witness is on the site's network: straight to it, never through an http_proxy.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class WitnessError(Exception):
    """No cosignature this time: the witness is away or answered out of protocol."""


class WitnessRefused(WitnessError):
    """The witness refused the checkpoint (or the log cannot be proven to it): asking
    again will not help until someone looks."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


# -- signed notes (c2sp.org/signed-note) ---------------------------------------------


def log_origin(log_id: str) -> str:
    return f"appliance.local/{log_id}/audit"


def key_id(name: str, kind: int, public: bytes) -> bytes:
    return hashlib.sha256(name.encode() + b"\n" + bytes([kind]) + public).digest()[:4]


def log_vkey(name: str, public: Ed25519PublicKey) -> str:
    """The log's verifier key, as a witness is configured with it."""
    raw = crypto.public_raw(public)
    kind = bytes([NOTE_ED25519])
    return f"{name}+{key_id(name, NOTE_ED25519, raw).hex()}+{crypto.b64(kind + raw)}"


@dataclass(frozen=True)
class Verifier:
    """A witness's Ed25519 cosignature key, from its vkey."""

    name: str
    id: bytes
    public: Ed25519PublicKey

    @classmethod
    def parse(cls, vkey: str) -> Verifier:
        parts = vkey.strip().split("+", 2)
        try:
            name, id_hex, material = parts
            raw = crypto.unb64(material)
            kid = bytes.fromhex(id_hex)
        except (ValueError, binascii.Error):
            raise SettingsError(
                f"witness_key must be a vkey, name+keyid+base64, got {vkey!r}"
            ) from None
        if not name or len(raw) != 33 or raw[0] != COSIGNATURE_ED25519:
            raise SettingsError(
                "witness_key must be an Ed25519 cosignature/v1 vkey (type 0x04, 32 bytes)"
            )
        if kid != key_id(name, COSIGNATURE_ED25519, raw[1:]):
            raise SettingsError(f"witness_key {vkey!r}: its key ID does not match its key")
        return cls(name, kid, crypto.public_from_raw(raw[1:]))

    def __str__(self) -> str:
        raw = bytes([COSIGNATURE_ED25519]) + crypto.public_raw(self.public)
        return f"{self.name}+{self.id.hex()}+{crypto.b64(raw)}"


def checkpoint_body(origin: str, size: int, root: bytes) -> str:
    return f"{origin}\n{size}\n{crypto.b64(root)}\n"


def sign_note(body: str, name: str, key: Ed25519PrivateKey) -> str:
    raw = crypto.public_raw(key.public_key())
    signature = key_id(name, NOTE_ED25519, raw) + key.sign(body.encode())
    return f"{body}\n{DASH} {name} {crypto.b64(signature)}\n"


@dataclass(frozen=True)
class Note:
    body: str  # the text, its final newline included
    signatures: tuple[tuple[str, bytes], ...]  # (key name, key ID || signature)

    @classmethod
    def parse(cls, text: str) -> Note:
        """A signed note; ValueError when it is not one."""
        if not text.endswith("\n") or "\n\n" not in text:
            raise ValueError("not a signed note")
        cut = text.rindex("\n\n")
        body, lines = text[: cut + 1], text[cut + 2 :].splitlines()
        signatures = []
        for line in lines:
            dash, name, sig = line.split(" ")
            if dash != DASH or not name:
                raise ValueError(f"not a signature line: {line!r}")
            raw = base64.b64decode(sig, validate=True)
            if len(raw) < 5:
                raise ValueError("signature too short")
            signatures.append((name, raw))
        if not signatures:
            raise ValueError("a note without signatures")
        return cls(body, tuple(signatures))

    def checkpoint(self) -> tuple[str, int, bytes]:
        """(origin, size, root) of a checkpoint's body."""
        lines = self.body.split("\n")
        if len(lines) < 4:
            raise ValueError("a checkpoint has three lines at least")
        origin, size, root = lines[0], lines[1], base64.b64decode(lines[2], validate=True)
        if not origin or not size.isdigit() or (size != "0" and size.startswith("0")):
            raise ValueError("bad checkpoint origin or size")
        if len(root) != merkle.HASH_SIZE:
            raise ValueError("bad checkpoint root")
        return origin, int(size), root

    def signed_by(self, name: str, public: Ed25519PublicKey) -> bool:
        """Signed (note signature, Ed25519) by this key, and by no forgery of it."""
        kid = key_id(name, NOTE_ED25519, crypto.public_raw(public))
        mine = [raw[4:] for n, raw in self.signatures if n == name and raw[:4] == kid]
        return bool(mine) and all(
            crypto.verify_signature(public, sig, self.body.encode()) for sig in mine
        )

    def cosigned_at(self, witness: Verifier) -> int | None:
        """The time of the witness's valid cosignature on this checkpoint, or None."""
        for name, raw in self.signatures:
            if name != witness.name or raw[:4] != witness.id or len(raw) != 4 + 8 + 64:
                continue
            stamp = int.from_bytes(raw[4:12], "big")
            message = f"cosignature/v1\ntime {stamp}\n{self.body}".encode()
            try:
                witness.public.verify(raw[12:], message)
            except InvalidSignature:
                return None
            return stamp
        return None


# -- the cosignatures kept -----------------------------------------------------------


def cosigned_path(settings: Settings) -> Path:
    where = settings.checkpoint_path
    return where.with_name(f"{where.stem}-witnessed.jsonl")


@dataclass(frozen=True)
class Cosigned:
    note: Note
    origin: str
    size: int
    root: bytes
    received: str

    @classmethod
    def from_line(cls, line: str) -> Cosigned:
        data = json.loads(line)
        note = Note.parse(str(data["note"]))
        origin, size, root = note.checkpoint()
        return cls(note, origin, size, root, str(data.get("received", "")))


def read_cosigned(path: Path) -> tuple[list[Cosigned], list[str]]:
    """The kept cosigned checkpoints, and the lines that are not one."""
    found: list[Cosigned] = []
    bad: list[str] = []
    if not path.is_file():
        return found, bad
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            found.append(Cosigned.from_line(line))
        except (ValueError, KeyError, TypeError):
            bad.append(f"line {n}")
    return found, bad


def _latest_size(path: Path, origin: str) -> int:
    """The size the witness last cosigned for this log, as far as the file says (the
    witness corrects it with a 409 when another box or process moved it since)."""
    try:
        with path.open("rb") as fh:
            fh.seek(max(0, fh.seek(0, os.SEEK_END) - MAX_BODY))
            tail = fh.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return 0
    for line in reversed(tail):
        try:
            entry = Cosigned.from_line(line)
        except (ValueError, KeyError, TypeError):
            continue
        if entry.origin == origin:
            return entry.size
    return 0


def _append(path: Path, note: str) -> None:
    """Durably, in one write (O_APPEND: lines from two processes never interleave)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    received = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    line = json.dumps({"received": received, "note": note}, separators=(",", ":")) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
    try:
        os.write(fd, line.encode())
        os.fsync(fd)
    finally:
        os.close(fd)


# -- the tree, read from the database --------------------------------------------------

# Runs one SQL statement with its parameters (sqlite3's execute or SQLAlchemy's
# exec_driver_sql) and returns a cursor-like result.
Execute = Callable[..., Any]
# The last record's seq: the tree's size (after a purge of all, the cut's).
SELECT_HEAD = (
    "SELECT COALESCE((SELECT MAX(seq) FROM audit_records), "
    "(SELECT CAST(value AS INTEGER) FROM audit_meta WHERE name = 'anchor_seq'), 0)"
)
SELECT_LEAVES = "SELECT seq, hash FROM audit_records WHERE seq > ? AND seq <= ? ORDER BY seq"


def leaf_reader(execute: Execute) -> merkle.LeafReader:
    def read(start: int, end: int) -> list[bytes]:
        rows = execute(SELECT_LEAVES, (start, end)).fetchall()
        if [int(r[0]) for r in rows] != list(range(start + 1, end + 1)):
            raise merkle.MissingNodes(f"records {start + 1}..{end} are not all there")
        return [merkle.record_leaf(str(r[1])) for r in rows]

    return read


def kept_nodes(meta: dict[str, str]) -> dict[merkle.Range, bytes]:
    """The subtree hashes a purge kept of the records it removed."""
    try:
        return merkle.decode_nodes(json.loads(meta.get("merkle_nodes", "{}")))
    except (ValueError, AttributeError):
        return {}


def purge_nodes(settings: Settings, execute: Execute, cut: int) -> str:
    """What a purge of records 1..cut keeps of them (audit_meta merkle_nodes): the
    subtree hashes that the root of any later size, and a consistency proof to it from
    the size the witness last cosigned, need. Called inside the purge's transaction."""
    meta = {str(k): str(v) for k, v in execute("SELECT name, value FROM audit_meta").fetchall()}
    known = kept_nodes(meta)
    tree = merkle.Tree(leaf_reader(execute), int(meta.get("anchor_seq", "0")), known)
    witnessed = _latest_size(cosigned_path(settings), log_origin(meta.get("origin", "")))
    try:
        known.update(tree.nodes_for([witnessed], cut))
    except merkle.MissingNodes as exc:  # purged before this version: nothing to keep
        log.warning("the purge keeps no Merkle nodes", extra={"error": str(exc)})
    return json.dumps(merkle.encode_nodes(known), separators=(",", ":"))


# -- the client ----------------------------------------------------------------------


class WitnessClient:
    def __init__(self, settings: Settings, store: AuditStore) -> None:
        if not settings.witness_key:
            raise SettingsError("witness_url is set but witness_key is not: set both")
        self.witness = Verifier.parse(settings.witness_key)
        self.url = settings.witness_url.rstrip("/") + "/add-checkpoint"
        self.interval = settings.witness_interval
        self.path = cosigned_path(settings)
        self.store = store
        self.origin = log_origin(store.origin)
        self._tree = merkle.Tree(lambda a, b: [])
        self._lock = threading.Lock()  # one exchange at a time
        self.size = _latest_size(self.path, self.origin)  # what the witness holds
        self.last_error: str | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _checkpoint(self, old: int) -> tuple[int, bytes, list[bytes]]:
        """The log's size and root now, and a consistency proof from ``old``: one read
        snapshot."""
        with self.store.reader.connect() as conn, conn.begin():
            execute = conn.exec_driver_sql
            meta = {str(k): str(v) for k, v in execute("SELECT name, value FROM audit_meta")}
            first = int(meta.get("anchor_seq", "0"))
            size = int(execute(SELECT_HEAD).scalar() or 0)
            tree = self._tree
            tree.first, tree.known, tree.leaves = first, kept_nodes(meta), leaf_reader(execute)
            if old > size:
                raise WitnessRefused(
                    f"the witness has cosigned {old} records of this log, and it holds "
                    f"{size}: rolled back or replaced"
                )
            return size, tree.root(size), tree.consistency_proof(old, size)

    def _post(self, body: bytes, timeout: float) -> tuple[int, str, str]:
        request = urllib.request.Request(
            self.url, data=body, method="POST", headers={"Content-Type": "text/plain"}
        )
        try:
            with _OPENER.open(request, timeout=timeout) as resp:
                return resp.status, resp.read(MAX_BODY).decode("utf-8", "replace"), ""
        except urllib.error.HTTPError as exc:
            text = exc.read(MAX_BODY).decode("utf-8", "replace")
            return exc.code, text, exc.headers.get("Content-Type", "")
        except (OSError, ValueError) as exc:  # refused, unreachable, timed out
            raise WitnessError(f"witness {self.url}: {exc}") from None

    def cosign(self, timeout: float = REQUEST_TIMEOUT) -> Cosigned:
        """Send the log's checkpoint now with its consistency proof; keep and return
        the cosignature. A 409 (the witness holds another size) is resolved once."""
        with self._lock:
            old = max(self.size, _latest_size(self.path, self.origin))
            for _ in range(3):
                size, root, proof = self._checkpoint(old)
                body = checkpoint_body(self.origin, size, root)
                note = sign_note(body, self.origin, self.store.signing_key)
                lines = "".join(f"{crypto.b64(h)}\n" for h in proof)
                status, text, ctype = self._post(f"old {old}\n{lines}\n{note}".encode(), timeout)
                if status == 409 and ctype.startswith("text/x.tlog.size"):
                    held = text.strip()
                    if not held.isdigit() or int(held) == old:
                        raise WitnessError(f"witness answered 409 with size {held!r}")
                    old = int(held)
                    continue
                if status != 200:
                    raise WitnessRefused(_refusal(status, text, size, old), status)
                return self._keep(note, text, size, root)
            raise WitnessError("the witness's size kept moving (409 three times)")

    def _keep(self, note: str, answer: str, size: int, root: bytes) -> Cosigned:
        wanted = [
            line for line in answer.splitlines() if line.startswith(f"{DASH} {self.witness.name} ")
        ]
        for line in wanted:
            cosigned = Note.parse(note + line + "\n")
            if cosigned.cosigned_at(self.witness) is not None:
                _append(self.path, note + line + "\n")
                self.size, self.last_error = size, None
                log.info("audit checkpoint witnessed", extra={"size": size})
                return Cosigned(cosigned, self.origin, size, root, "")
        raise WitnessError(f"no valid cosignature of {self.witness.name} in the answer")

    # -- the timer -----------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="audit-witness", daemon=True)
        self._thread.start()

    def stop(self, final_timeout: float = 3.0) -> None:
        """Stop the timer, then witness what the last interval added (briefly)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(final_timeout + 1)
            if self._thread.is_alive():  # still in an exchange: that one is the last
                return
        if final_timeout <= 0:
            return
        try:
            if self._head() != self.size:
                self.cosign(final_timeout)
        except Exception as exc:  # shutting down: say so, and go on
            log.warning("last checkpoint not witnessed", extra={"error": str(exc)})

    def _run(self) -> None:
        delay, backoff = 0.0, 1.0
        while not self._stop.is_set():
            self._wake.wait(delay)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                # Another process (a CLI command) may have cosigned since.
                self.size = max(self.size, _latest_size(self.path, self.origin))
                if self._head() != self.size or self.last_error:
                    self.cosign()
                delay, backoff = self.interval, 1.0
            except WitnessRefused as exc:
                self._failed(exc, logging.ERROR)
                delay = self.interval
            except Exception as exc:  # away, busy, a read that failed: try again soon
                self._failed(exc, logging.WARNING)
                delay, backoff = min(backoff, self.interval), min(backoff * 2, self.interval)

    def _failed(self, exc: Exception, level: int) -> None:
        self.last_error = f"{type(exc).__name__}: {exc}"
        log.log(level, "audit checkpoint not witnessed", extra={"error": self.last_error})

    def _head(self) -> int:
        with self.store.reader.connect() as conn, conn.begin():
            return int(conn.exec_driver_sql(SELECT_HEAD).scalar() or 0)

    def backlog(self) -> tuple[int, float]:
        """Records not yet witnessed, and the age (seconds) of the oldest of them."""
        with self.store.reader.connect() as conn, conn.begin():
            execute = conn.exec_driver_sql
            head = int(execute(SELECT_HEAD).scalar() or 0)
            if head <= self.size:
                return 0, 0.0
            ts = execute(
                "SELECT ts FROM audit_records WHERE seq > ? ORDER BY seq LIMIT 1", (self.size,)
            ).scalar()
        age = 0.0
        if ts:
            written = datetime.strptime(str(ts), "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
            age = max(0.0, time.time() - written.timestamp())
        return head - self.size, age


def _refusal(status: int, text: str, size: int, old: int) -> str:
    why = {
        400: "found the request malformed",
        403: "does not trust this log's key: give it the log's vkey (appliance audit log-key)",
        404: "does not know this log: give it the log's origin and vkey (appliance audit log-key)",
        422: f"refused the checkpoint of {size} records: it is not consistent with the "
        f"{old} it cosigned before (records rewritten, or a forked log)",
    }.get(status, "answered out of protocol")
    return f"the witness {why} (HTTP {status}: {text.strip()[:200]})"


# -- wiring --------------------------------------------------------------------------


def init_app(app: Flask, settings: Settings, store: AuditStore) -> WitnessClient | None:
    """Start cosigning when a witness is configured."""
    if not settings.witness_url:
        return None
    client = WitnessClient(settings, store)
    app.extensions[EXTENSION] = client
    client.start()
    return client


def close_app(app: Flask) -> None:
    client: WitnessClient | None = app.extensions.get(EXTENSION)
    if client is not None:
        client.stop()


def after_admin(store: AuditStore, action: str) -> None:
    """A high-value administrative action (recorded by a CLI command): cosign the log
    now, so that it does not wait for the server's next tick. Never fails the action:
    the server's timer cosigns it later if the witness is away now."""
    if action not in HIGH_VALUE_ACTIONS or not store.settings.witness_url:
        return
    try:
        WitnessClient(store.settings, store).cosign()
    except (WitnessError, SettingsError, merkle.MissingNodes) as exc:
        log.warning(
            "audit checkpoint not witnessed after %s: %s", action, exc, extra={"error": str(exc)}
        )
