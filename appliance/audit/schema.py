"""The audit database's tables. Migrations (Alembic) create and upgrade them."""

from __future__ import annotations

from sqlalchemy import (
    Column,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
)

from appliance.db import open_engine

__all__ = ["checkpoints", "data_keys", "meta", "metadata", "open_engine", "records"]

metadata = MetaData()

records = Table(
    "audit_records",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=False),
    Column("ts", String(32), nullable=False),
    Column("kind", String(16), nullable=False),
    Column("request_id", String(64)),
    Column("actor_id", String(128)),
    Column("actor_name", String(256)),
    Column("actor_role", String(32)),
    Column("client", String(64)),
    Column("method", String(16)),
    Column("route", String(256)),
    Column("model", String(128)),
    Column("model_sha256", String(64)),
    Column("status", Integer),
    Column("error_type", String(64)),
    Column("latency_us", Integer),
    Column("prompt_tokens", Integer),
    Column("completion_tokens", Integer),
    Column("finish_reason", String(32)),
    Column("content_policy", String(16), nullable=False),
    Column("key_id", String(32)),
    Column("nonce", LargeBinary),
    Column("ciphertext", LargeBinary),
    Column("content_digest", String(64)),
    Column("prev_hash", String(64), nullable=False),
    Column("hash", String(64), nullable=False),
    Index("ix_audit_records_request_id", "request_id"),
    Index("ix_audit_records_ts", "ts"),
)

data_keys = Table(
    "audit_data_keys",
    metadata,
    Column("key_id", String(32), primary_key=True),
    Column("wrapped", LargeBinary, nullable=False),
    Column("created", String(32), nullable=False),
    Column("is_primary", Integer, nullable=False),
    Column("uses", Integer, nullable=False),
)

checkpoints = Table(
    "audit_checkpoints",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("origin", String(36), nullable=False),
    Column("size", Integer, nullable=False),
    Column("head", String(64), nullable=False),
    Column("ts", String(32), nullable=False),
    Column("key", String(16), nullable=False),
    Column("signature", Text, nullable=False),
)

meta = Table(
    "audit_meta",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)
