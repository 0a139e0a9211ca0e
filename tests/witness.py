"""A C2SP tlog-witness for the tests (c2sp.org/tlog-witness, tlog-cosignature,
signed-note), written apart from the appliance's client so that a mistake shared by
both cannot hide: its own note parser, key IDs and consistency check (a recursive
rebuild of RFC 6962's SUBPROOF, where the client proves with RFC 9162's loop).

It keeps, per log origin, only the size and root it last cosigned (in memory, and in
a JSON file when given one, written before it answers): no record, no patient data.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

EMPTY = hashlib.sha256(b"").digest()


def _raw(public: Ed25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _key_id(name: str, kind: int, raw: bytes) -> bytes:
    return hashlib.sha256(f"{name}\n".encode() + bytes([kind]) + raw).digest()[:4]


def _node(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _largest_power_below(n: int) -> int:
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def consistent(old: int, new: int, old_root: bytes, new_root: bytes, proof: list[bytes]) -> bool:
    """Rebuild both roots from the proof, walking RFC 6962's SUBPROOF(old, D[new], true)
    the way it was built: its last hash is the top split's other side."""
    if old == 0:
        return not proof
    if old == new:
        return not proof and old_root == new_root
    items = list(proof)

    def walk(m: int, n: int, whole: bool) -> tuple[bytes, bytes]:
        if m == n:
            if whole:
                return old_root, old_root
            if not items:
                raise ValueError("proof too short")
            h = items.pop()
            return h, h
        k = _largest_power_below(n)
        if not items:
            raise ValueError("proof too short")
        if m <= k:
            right = items.pop()
            old_hash, new_hash = walk(m, k, whole)
            return old_hash, _node(new_hash, right)
        left = items.pop()
        old_hash, new_hash = walk(m - k, n - k, False)
        return _node(left, old_hash), _node(left, new_hash)

    try:
        got_old, got_new = walk(old, new, True)
    except ValueError:
        return False
    return not items and got_old == old_root and got_new == new_root


@dataclass
class Log:
    name: str  # the key name in its signature lines
    public: Ed25519PublicKey

    @property
    def key_id(self) -> bytes:
        return _key_id(self.name, 0x01, _raw(self.public))


def parse_log_vkey(vkey: str) -> tuple[str, Log]:
    """(origin, log) from a log's note vkey: name+keyid+base64(0x01 || key)."""
    name, kid, material = vkey.split("+", 2)
    raw = base64.b64decode(material)
    assert raw[0] == 0x01 and len(raw) == 33, vkey
    log = Log(name, Ed25519PublicKey.from_public_bytes(raw[1:]))
    assert log.key_id.hex() == kid, "key ID does not match"
    return name, log


class Refused(Exception):
    def __init__(self, status: int, message: str, ctype: str = "text/plain") -> None:
        super().__init__(message)
        self.status, self.ctype = status, ctype


@dataclass
class Witness:
    name: str = "witness.test/w1"
    state_file: Path | None = None
    key: Ed25519PrivateKey = field(default_factory=Ed25519PrivateKey.generate)
    logs: dict[str, Log] = field(default_factory=dict)
    latest: dict[str, tuple[int, bytes]] = field(default_factory=dict)  # origin -> (size, root)
    answers: list[tuple[int, str]] = field(default_factory=list)  # (status, origin), in order
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: ThreadingHTTPServer | None = None

    @property
    def vkey(self) -> str:
        raw = _raw(self.key.public_key())
        kid = _key_id(self.name, 0x04, raw)
        material = base64.b64encode(bytes([0x04]) + raw).decode()
        return f"{self.name}+{kid.hex()}+{material}"

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def trust(self, vkey: str) -> None:
        origin, log = parse_log_vkey(vkey)
        self.logs[origin] = log

    def statuses(self) -> list[int]:
        return [status for status, _ in self.answers]

    # -- the protocol ----------------------------------------------------------------

    def add_checkpoint(self, body: bytes) -> tuple[str, str]:
        """(response body, content type) for a 200; Refused for anything else."""
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            raise Refused(400, "not UTF-8") from None
        head, sep, note = text.partition("\n\n")
        lines = head.split("\n")
        if not sep or not lines[0].startswith("old "):
            raise Refused(400, "no old size line, or no empty line before the checkpoint")
        old_text = lines[0][4:]
        if not old_text.isdigit() or (old_text != "0" and old_text[0] == "0"):
            raise Refused(400, "bad old size")
        old = int(old_text)
        try:
            proof = [base64.b64decode(x, validate=True) for x in lines[1:]]
        except ValueError:
            raise Refused(400, "a proof line is not base64") from None
        if len(proof) > 63 or any(len(h) != 32 for h in proof):
            raise Refused(400, "bad proof lines")
        if "\n\n" not in note or not note.endswith("\n"):
            raise Refused(400, "the checkpoint is not a signed note")
        cut = note.rindex("\n\n")
        checkpoint, signature_lines = note[: cut + 1], note[cut + 2 :].splitlines()
        body_lines = checkpoint.split("\n")[:-1]
        if len(body_lines) < 3:
            raise Refused(400, "a checkpoint has three lines")
        origin, size_text, root_text = body_lines[:3]
        if not size_text.isdigit():
            raise Refused(400, "bad tree size")
        size = int(size_text)
        try:
            root = base64.b64decode(root_text, validate=True)
        except ValueError:
            raise Refused(400, "bad root hash") from None
        if len(root) != 32:
            raise Refused(400, "bad root hash")
        log = self.logs.get(origin)
        if log is None:
            raise Refused(404, f"unknown log {origin}")
        verified = False
        for line in signature_lines:
            parts = line.split(" ")
            if len(parts) != 3 or parts[0] != "\u2014":
                raise Refused(400, "bad signature line")
            try:
                sig = base64.b64decode(parts[2], validate=True)
            except ValueError:
                raise Refused(400, "a signature is not base64") from None
            if parts[1] != log.name or sig[:4] != log.key_id:
                continue  # an unknown key: ignored
            try:
                log.public.verify(sig[4:], checkpoint.encode())
            except InvalidSignature:
                raise Refused(403, "a signature of the log's key does not verify") from None
            verified = True
        if not verified:
            raise Refused(403, "not signed by the log's key")
        if old > size:
            raise Refused(400, "old size is larger than the checkpoint's")
        with self._lock:  # check and update at once
            held_size, held_root = self.latest.get(origin, (0, EMPTY))
            if old != held_size:
                raise Refused(409, f"{held_size}\n", "text/x.tlog.size")
            if size == 0 and root != EMPTY:
                raise Refused(422, "an empty tree has the empty root")
            if not consistent(old, size, held_root, root, proof):
                raise Refused(422, "the consistency proof does not verify")
            self.latest[origin] = (size, root)
            self._persist()
        stamp = int(time.time())
        message = f"cosignature/v1\ntime {stamp}\n".encode() + checkpoint.encode()
        raw = _key_id(self.name, 0x04, _raw(self.key.public_key()))
        raw += stamp.to_bytes(8, "big") + self.key.sign(message)
        return f"\u2014 {self.name} {base64.b64encode(raw).decode()}\n", "text/plain"

    def _persist(self) -> None:
        if self.state_file is None:
            return
        data = {o: [s, base64.b64encode(r).decode()] for o, (s, r) in self.latest.items()}
        tmp = self.state_file.with_suffix(".tmp")
        with tmp.open("w") as fh:
            json.dump(data, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.state_file)

    # -- HTTP ------------------------------------------------------------------------

    def start(self) -> Witness:
        witness = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                origin = ""
                try:
                    if self.path != "/add-checkpoint":
                        raise Refused(404, "no such endpoint")
                    origin = (
                        body.partition(b"\n\n")[2].split(b"\n", 1)[0].decode("utf-8", "replace")
                    )
                    answer, ctype = witness.add_checkpoint(body)
                    status = 200
                except Refused as exc:
                    status, answer, ctype = exc.status, str(exc), exc.ctype
                witness.answers.append((status, origin))
                data = answer.encode()
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
