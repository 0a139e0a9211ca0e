"""The documents database (``STATE_DIR/docs/docs.db``). Text and embeddings are sealed
with AES-GCM under a data key wrapped by the appliance's master key; titles, source
paths, hashes and spans are plain, so that IT can list and audit without the key."""

from __future__ import annotations

from sqlalchemy import (
    Column,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
)

metadata = MetaData()

keys = Table(
    "keys",
    metadata,
    Column("id", String, primary_key=True),
    Column("wrapped", LargeBinary, nullable=False),
    Column("created", String, nullable=False),
)

collections = Table(
    "collections",
    metadata,
    Column("name", String, primary_key=True),
    Column("roles", Text, nullable=True),  # JSON list; NULL: every role that may ask
    Column("min_similarity", Float, nullable=True),  # calibrated; NULL: the setting
    Column("vector_weight", Float, nullable=True),  # calibrated; NULL: 1 (plain RRF)
    Column("created", String, nullable=False),
)

documents = Table(
    "documents",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("collection", String, ForeignKey("collections.name"), nullable=False),
    Column("source", Text, nullable=False),  # the path it was added from
    Column("title", Text, nullable=False),
    Column("sha256", String, nullable=False),
    Column("version", Integer, nullable=False),
    Column("kind", String, nullable=False),
    Column("pages", Integer, nullable=False),
    Column("chars", Integer, nullable=False),
    Column("added", String, nullable=False),
    Column("retired", String, nullable=True),  # a newer version, or removed
)

passages = Table(
    "passages",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("document_id", Integer, ForeignKey("documents.id"), nullable=False, index=True),
    Column("ordinal", Integer, nullable=False),
    Column("start", Integer, nullable=False),
    Column("end", Integer, nullable=False),
    Column("heading", Text, nullable=False),
    Column("key_id", String, nullable=False),
    Column("nonce", LargeBinary, nullable=False),
    Column("ciphertext", LargeBinary, nullable=False),  # the passage's text
    Column("vector_nonce", LargeBinary, nullable=False),
    Column("vector", LargeBinary, nullable=False),  # float32 embedding, sealed
)

# One row: what the embeddings were made with, and a counter bumped by every change
# (the server rebuilds its index when it moves).
meta = Table(
    "meta",
    metadata,
    Column("key", String, primary_key=True),
    Column("value", Text, nullable=False),
)
