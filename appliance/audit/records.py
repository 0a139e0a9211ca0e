"""An audit record: its fields, its canonical bytes and its hash.

The hash covers every column (the ciphertext included) and the previous record's
hash, so verification needs no key. The field order below is part of the format.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from appliance.actors import ANONYMOUS as ANONYMOUS  # re-exported: who a record names
from appliance.actors import Actor as Actor

FORMAT = b"appliance-audit-v1\n"
GENESIS = "0" * 64

# The columns, in canonical order; "hash" is computed over all of them.
FIELDS = (
    "seq",
    "ts",
    "kind",
    "request_id",
    "actor_id",
    "actor_name",
    "actor_role",
    "client",
    "method",
    "route",
    "model",
    "model_sha256",
    "status",
    "error_type",
    "latency_us",
    "prompt_tokens",
    "completion_tokens",
    "finish_reason",
    "content_policy",
    "key_id",
    "nonce",
    "ciphertext",
    "content_digest",
    "prev_hash",
)
KINDS = ("request", "outcome", "event", "admin")


@dataclass
class Entry:
    """What a caller hands the writer; the writer adds seq, time, sealing and links."""

    kind: str
    request_id: str | None = None
    actor: Actor = ANONYMOUS
    client: str | None = None
    method: str | None = None
    route: str | None = None
    model: str | None = None
    model_sha256: str | None = None
    status: int | None = None
    error_type: str | None = None
    latency_us: int | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    finish_reason: str | None = None
    content: dict[str, Any] | None = field(default=None, repr=False)


def _hex(value: Any) -> str:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    raise TypeError(f"{type(value).__name__} in an audit record")


_ENCODE = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), default=_hex).encode


def canonical(row: dict[str, Any] | tuple[Any, ...]) -> bytes:
    """The bytes a record's hash is taken over: its fields as a JSON array, binary
    columns in hex."""
    values = [row[f] for f in FIELDS] if isinstance(row, dict) else list(row)
    return FORMAT + _ENCODE(values).encode("utf-8")


def record_hash(row: dict[str, Any] | tuple[Any, ...]) -> str:
    return hashlib.sha256(canonical(row)).hexdigest()


_CONTENT = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), sort_keys=True).encode


def content_bytes(content: dict[str, Any]) -> bytes:
    # A client's JSON may hold a lone surrogate ("\ud800"), which UTF-8 cannot encode;
    # written back as its JSON escape, it reads back as the same string.
    return _CONTENT(content).encode("utf-8", "backslashreplace")


def storable(value: Any) -> Any:
    """A column value SQLite and the canonical form can take: text with a lone
    surrogate (from a client's JSON) gets it as a visible escape (\ud800); valid text,
    which every earlier record holds, is unchanged."""
    if isinstance(value, str) and not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return value.encode("utf-8", "backslashreplace").decode("utf-8")
    return value


def aad(seq: int, ts: str, key_id: str) -> bytes:
    """Associated data: a ciphertext opens only in its own row."""
    return f"appliance-audit-v1|{seq}|{ts}|{key_id}".encode()
