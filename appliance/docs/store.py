"""The documents database: collections (with the roles that may read them), documents
by version, and their passages, sealed under the appliance's master key.

Adding a file to a collection: the same bytes at the same source are left as they are;
changed bytes make a new version, and the old one is retired (its passages are no
longer searched, its rows stay for the audit's sake). Every change bumps a counter the
server watches to rebuild its index.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import Connection, Engine, func, insert, select, update

from appliance.audit import crypto
from appliance.db import open_engine, upgrade
from appliance.docs.chunk import Passage, chunk
from appliance.docs.extract import Extracted, extract
from appliance.docs.schema import collections, documents, keys, meta, passages

SCHEMA_HEAD = "0002"
NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
Embed = Callable[[list[str]], np.ndarray]


class DocsError(ValueError):
    pass


def now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def _aad(document_id: int, ordinal: int, what: str) -> bytes:
    return f"appliance-docs|{document_id}|{ordinal}|{what}".encode()


@dataclass(frozen=True)
class Stored:
    """An active passage, opened: what the index holds."""

    id: int
    document_id: int
    collection: str
    title: str
    source: str
    document_sha256: str
    version: int
    ordinal: int
    start: int
    end: int
    heading: str
    text: str
    vector: np.ndarray


@dataclass
class Added:
    document_id: int
    collection: str
    source: str
    title: str
    sha256: str
    version: int
    passages: int
    pages: int
    status: str  # added | new version | unchanged
    retired: int | None = None  # the version it replaced


def migrate(engine: Engine) -> None:
    upgrade(engine, Path(__file__).parent / "migrations", SCHEMA_HEAD)


class DocStore:
    def __init__(self, path: Path, master: bytes, read_only: bool = False) -> None:
        self.path = path
        self.master = master
        self.engine = open_engine(path, read_only=read_only)
        if not read_only:
            migrate(self.engine)
        self._keys: dict[str, bytes] = {}

    def close(self) -> None:
        self.engine.dispose()

    # -- keys -----------------------------------------------------------------------

    def _data_key(self, conn: Connection) -> tuple[str, bytes]:
        row = conn.execute(select(keys.c.id, keys.c.wrapped).order_by(keys.c.created)).first()
        if row is None:
            key_id = "docs-" + secrets.token_hex(8)
            key = crypto.new_data_key()
            conn.execute(
                insert(keys).values(
                    id=key_id, wrapped=crypto.wrap(self.master, key_id, key), created=now()
                )
            )
            return key_id, key
        return row.id, self._open_key(conn, row.id)

    def _open_key(self, conn: Connection, key_id: str) -> bytes:
        if key_id not in self._keys:
            wrapped: bytes = conn.execute(
                select(keys.c.wrapped).where(keys.c.id == key_id)
            ).scalar_one()
            self._keys[key_id] = crypto.unwrap(self.master, key_id, wrapped)
        return self._keys[key_id]

    # -- collections ------------------------------------------------------------------

    def ensure_collection(self, conn: Connection, name: str) -> None:
        if not NAME.match(name):
            raise DocsError(f"a collection's name must match {NAME.pattern}: {name!r}")
        if conn.execute(select(collections.c.name).where(collections.c.name == name)).first():
            return
        conn.execute(insert(collections).values(name=name, roles=None, created=now()))

    def set_roles(self, name: str, roles: list[str] | None) -> None:
        with self.engine.begin() as conn:
            self.ensure_collection(conn, name)
            conn.execute(
                update(collections)
                .where(collections.c.name == name)
                .values(roles=json.dumps(roles) if roles is not None else None)
            )
            self._bump(conn)

    def set_calibration(
        self, name: str, min_similarity: float | None, vector_weight: float | None
    ) -> None:
        """The collection's calibrated relevance threshold and fusion weight (None: the
        defaults)."""
        with self.engine.begin() as conn:
            found = conn.execute(select(collections.c.name).where(collections.c.name == name))
            if not found.first():
                raise DocsError(f"no collection {name!r}")
            conn.execute(
                update(collections)
                .where(collections.c.name == name)
                .values(min_similarity=min_similarity, vector_weight=vector_weight)
            )
            self._bump(conn)

    def collections(self) -> dict[str, dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(collections)).mappings().all()
            counts: dict[str, int] = dict(
                conn.execute(
                    select(documents.c.collection, func.count())
                    .where(documents.c.retired.is_(None))
                    .group_by(documents.c.collection)
                ).all()
            )
        return {
            r["name"]: {
                "roles": json.loads(r["roles"]) if r["roles"] else None,
                "min_similarity": r["min_similarity"],
                "vector_weight": r["vector_weight"],
                "documents": counts.get(r["name"], 0),
                "created": r["created"],
            }
            for r in rows
        }

    # -- documents --------------------------------------------------------------------

    def add(
        self,
        path: Path,
        collection: str,
        embed: Embed,
        embedding: tuple[str, str],
        max_chars: int = 800,
        overlap: int = 120,
    ) -> Added:
        """Add (or version) the file at ``path``; ``embedding``: the model's name and
        hash, which every passage of the collection must share."""
        data = path.read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        source = str(path.resolve())
        doc: Extracted = extract(path)
        pieces = chunk(doc, max_chars=max_chars, overlap=overlap)
        with self.engine.begin() as conn:
            self.ensure_collection(conn, collection)
            self._check_embedding(conn, embedding)
            current = conn.execute(
                select(documents.c.id, documents.c.sha256, documents.c.version).where(
                    documents.c.collection == collection,
                    documents.c.source == source,
                    documents.c.retired.is_(None),
                )
            ).first()
            if current is not None and current.sha256 == sha:
                count = conn.execute(
                    select(func.count()).where(passages.c.document_id == current.id)
                ).scalar_one()
                return Added(
                    current.id,
                    collection,
                    source,
                    doc.title,
                    sha,
                    current.version,
                    count,
                    doc.pages,
                    "unchanged",
                )
        vectors = embed([p.text for p in pieces]) if pieces else np.zeros((0, 1), np.float32)
        with self.engine.begin() as conn:
            last = conn.execute(
                select(func.max(documents.c.version)).where(
                    documents.c.collection == collection, documents.c.source == source
                )
            ).scalar()
            retired = None
            if current is not None:
                conn.execute(
                    update(documents).where(documents.c.id == current.id).values(retired=now())
                )
                retired = current.version
            version = (last or 0) + 1
            inserted = conn.execute(
                insert(documents).values(
                    collection=collection,
                    source=source,
                    title=doc.title,
                    sha256=sha,
                    version=version,
                    kind=doc.kind,
                    pages=doc.pages,
                    chars=len(doc.text),
                    added=now(),
                )
            ).inserted_primary_key
            assert inserted is not None
            doc_id = int(inserted[0])
            self._insert_passages(conn, doc_id, pieces, vectors)
            self._bump(conn)
        status = "added" if current is None else "new version"
        return Added(
            doc_id,
            collection,
            source,
            doc.title,
            sha,
            version,
            len(pieces),
            doc.pages,
            status,
            retired,
        )

    def _insert_passages(
        self, conn: Connection, doc_id: int, pieces: list[Passage], vectors: np.ndarray
    ) -> None:
        key_id, key = self._data_key(conn)
        aead = AESGCM(key)
        rows = []
        for piece, vector in zip(pieces, vectors, strict=True):
            text = crypto.seal_with(aead, piece.text.encode(), _aad(doc_id, piece.ordinal, "text"))
            vec = crypto.seal_with(
                aead, np.asarray(vector, "<f4").tobytes(), _aad(doc_id, piece.ordinal, "vector")
            )
            rows.append(
                {
                    "document_id": doc_id,
                    "ordinal": piece.ordinal,
                    "start": piece.start,
                    "end": piece.end,
                    "heading": piece.heading,
                    "key_id": key_id,
                    "nonce": text.nonce,
                    "ciphertext": text.ciphertext,
                    "vector_nonce": vec.nonce,
                    "vector": vec.ciphertext,
                }
            )
        if rows:
            conn.execute(insert(passages), rows)

    def _check_embedding(self, conn: Connection, embedding: tuple[str, str]) -> None:
        stored = conn.execute(select(meta.c.value).where(meta.c.key == "embedding")).scalar()
        wanted = json.dumps(list(embedding))
        if stored is None:
            conn.execute(insert(meta).values(key="embedding", value=wanted))
        elif stored != wanted:
            name, sha = json.loads(stored)
            raise DocsError(
                f"the passages were embedded with {name} ({sha[:12]}); this is "
                f"{embedding[0]} ({embedding[1][:12]}): run `appliance docs reindex` first"
            )

    def embedding(self) -> tuple[str, str] | None:
        with self.engine.connect() as conn:
            stored = conn.execute(select(meta.c.value).where(meta.c.key == "embedding")).scalar()
        if not stored:
            return None
        name, sha = json.loads(stored)
        return str(name), str(sha)

    def _bump(self, conn: Connection) -> None:
        value = conn.execute(select(meta.c.value).where(meta.c.key == "generation")).scalar()
        if value is None:
            conn.execute(insert(meta).values(key="generation", value="1"))
        else:
            conn.execute(
                update(meta).where(meta.c.key == "generation").values(value=str(int(value) + 1))
            )

    def generation(self) -> int:
        with self.engine.connect() as conn:
            value = conn.execute(select(meta.c.value).where(meta.c.key == "generation")).scalar()
        return int(value or 0)

    def remove(self, collection: str, source: str | None = None) -> int:
        """Retire a document (by source path, or the document id as text), or a whole
        collection's; how many were retired."""
        with self.engine.begin() as conn:
            where = [documents.c.collection == collection, documents.c.retired.is_(None)]
            if source is not None:
                ids = {source, str(Path(source).resolve())}
                where.append(documents.c.source.in_(ids) | (documents.c.id == _int(source)))
            n = conn.execute(update(documents).where(*where).values(retired=now())).rowcount
            if n:
                self._bump(conn)
        return int(n)

    def documents(
        self, collection: str | None = None, all_versions: bool = False
    ) -> list[dict[str, Any]]:
        query = select(documents)
        if collection is not None:
            query = query.where(documents.c.collection == collection)
        if not all_versions:
            query = query.where(documents.c.retired.is_(None))
        with self.engine.connect() as conn:
            rows = conn.execute(query.order_by(documents.c.id)).mappings().all()
            counts: dict[int, int] = dict(
                conn.execute(
                    select(passages.c.document_id, func.count()).group_by(passages.c.document_id)
                ).all()
            )
        return [{**dict(r), "passages": counts.get(r["id"], 0)} for r in rows]

    # -- reading ----------------------------------------------------------------------

    def active(self) -> Iterator[Stored]:
        """Every passage of every current document, opened."""
        query = (
            select(
                passages,
                documents.c.collection,
                documents.c.title,
                documents.c.source,
                documents.c.sha256,
                documents.c.version,
            )
            .join(documents, documents.c.id == passages.c.document_id)
            .where(documents.c.retired.is_(None))
            .order_by(passages.c.id)
        )
        with self.engine.connect() as conn:
            for r in conn.execute(query).mappings():
                key = self._open_key(conn, r["key_id"])
                text = crypto.open_sealed(
                    key, r["nonce"], r["ciphertext"], _aad(r["document_id"], r["ordinal"], "text")
                )
                vec = crypto.open_sealed(
                    key,
                    r["vector_nonce"],
                    r["vector"],
                    _aad(r["document_id"], r["ordinal"], "vector"),
                )
                yield Stored(
                    id=r["id"],
                    document_id=r["document_id"],
                    collection=r["collection"],
                    title=r["title"],
                    source=r["source"],
                    document_sha256=r["sha256"],
                    version=r["version"],
                    ordinal=r["ordinal"],
                    start=r["start"],
                    end=r["end"],
                    heading=r["heading"],
                    text=text.decode(),
                    vector=np.frombuffer(vec, dtype="<f4").astype(np.float32),
                )

    def reindex(
        self,
        embed: Embed,
        embedding: tuple[str, str],
        progress: Callable[[int], None] = lambda n: None,
    ) -> int:
        """Embed every current passage again (another embedding model); how many."""
        opened = list(self.active())
        with self.engine.begin() as conn:
            key_id, key = self._data_key(conn)
            aead = AESGCM(key)
            for start in range(0, len(opened), 64):
                batch = opened[start : start + 64]
                vectors = embed([p.text for p in batch])
                for p, vector in zip(batch, vectors, strict=True):
                    sealed = crypto.seal_with(
                        aead,
                        np.asarray(vector, "<f4").tobytes(),
                        _aad(p.document_id, p.ordinal, "vector"),
                    )
                    text = crypto.seal_with(
                        aead, p.text.encode(), _aad(p.document_id, p.ordinal, "text")
                    )
                    conn.execute(
                        update(passages)
                        .where(passages.c.id == p.id)
                        .values(
                            key_id=key_id,
                            vector_nonce=sealed.nonce,
                            vector=sealed.ciphertext,
                            nonce=text.nonce,
                            ciphertext=text.ciphertext,
                        )
                    )
                progress(len(batch))
            conn.execute(
                update(meta)
                .where(meta.c.key == "embedding")
                .values(value=json.dumps(list(embedding)))
            )
            if not conn.execute(select(meta.c.key).where(meta.c.key == "embedding")).first():
                conn.execute(
                    insert(meta).values(key="embedding", value=json.dumps(list(embedding)))
                )
            self._bump(conn)
        return len(opened)


def _int(text: str) -> int:
    return int(text) if text.isdigit() else -1
