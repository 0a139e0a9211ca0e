"""Search over the current passages: SQLite FTS5 (BM25) on the words, cosine on the
embeddings, fused by reciprocal rank fusion (each list's rank r adds 1 / (60 + r)).

The index lives in memory only: the database on disk holds the passages sealed, and the
server opens them into this index at start and again whenever the database's change
counter moves. A search names the collections the caller may read; nothing else is
ever ranked.
"""

from __future__ import annotations

import re
import sqlite3
import threading
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from appliance.docs.store import Stored

RRF_K = 60  # the constant of Cormack et al. (2009)
CANDIDATES = 50  # from each list, before fusion
WORD = re.compile(r"\w+", re.UNICODE)


@dataclass(frozen=True)
class Hit:
    passage: Stored
    score: float  # the fused score
    similarity: float  # cosine of the question and the passage
    text_rank: int | None  # 1-based in the BM25 list (None: not in it)
    vector_rank: int | None

    def public(self, with_text: bool = True) -> dict[str, object]:
        p = self.passage
        out: dict[str, object] = {
            "passage_id": p.id,
            "collection": p.collection,
            "document": p.title,
            "document_sha256": p.document_sha256,
            "version": p.version,
            "source_path": p.source,
            "heading": p.heading,
            "start": p.start,
            "end": p.end,
            "score": round(self.score, 6),
            "similarity": round(self.similarity, 4),
            "text_rank": self.text_rank,
            "vector_rank": self.vector_rank,
        }
        if with_text:
            out["text"] = p.text
        return out


# Words of a question that say nothing of its subject: matched, they would make BM25
# score nearly every passage (a search at 10,000 passages took 20 ms instead of 1).
_COMMON = (
    "a about after all also am an and any are as at be been before being but by can "
    "could did do does doing done for from had has have having he her his how i if in "
    "into is it its just may me might must my no not of on or our she should so some "
    "such than that the their them then there these they this those to too under up "
    "us was we were what when where which while who whom why will with would you your "
    "much many more most long often need needs given get gets"
)
STOPWORDS = frozenset(_COMMON.split())


def fts_query(question: str) -> str | None:
    """The question's words as an FTS5 query: any of them but the common ones, each
    quoted (no operator or column syntax gets through from a user's text)."""
    words = {w.lower() for w in WORD.findall(question) if len(w) > 1}
    words = words - STOPWORDS or words  # a question of common words only: keep them
    if not words:
        return None
    return " OR ".join(f'"{w}"' for w in sorted(words))


class Index:
    def __init__(self, passages: Iterable[Stored], generation: int) -> None:
        self.generation = generation
        self.passages = list(passages)
        self._lock = threading.Lock()  # one sqlite connection, used from many threads
        self._db = sqlite3.connect(":memory:", check_same_thread=False)
        self._db.execute(
            "CREATE VIRTUAL TABLE fts USING fts5(text, heading, title, "
            "row UNINDEXED, collection UNINDEXED, tokenize='porter unicode61')"
        )
        self._db.executemany(
            "INSERT INTO fts (text, heading, title, row, collection) VALUES (?, ?, ?, ?, ?)",
            [(p.text, p.heading, p.title, i, p.collection) for i, p in enumerate(self.passages)],
        )
        dims = self.passages[0].vector.shape[0] if self.passages else 1
        self.vectors = (
            np.stack([p.vector for p in self.passages])
            if self.passages
            else np.zeros((0, dims), np.float32)
        )
        self.collections = np.array([p.collection for p in self.passages], dtype=object)

    def __len__(self) -> int:
        return len(self.passages)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def search(
        self,
        question: str,
        vector: np.ndarray,
        collections: list[str],
        k: int,
        vector_weight: float = 1.0,
    ) -> list[Hit]:
        """The top ``k`` passages of these collections (only these) for the question.
        ``vector_weight`` scales the embedding list's share of the fusion (1: plain
        RRF); a collection calibrated on its own questions has its own."""
        if not self.passages or not collections:
            return []
        allowed = np.isin(self.collections, collections)
        text_ranks: dict[int, int] = {}
        query = fts_query(question)
        if query is not None:
            marks = ",".join("?" * len(collections))
            with self._lock:
                rows = self._db.execute(
                    f"SELECT row FROM fts WHERE fts MATCH ? AND collection IN ({marks}) "
                    "ORDER BY bm25(fts) LIMIT ?",
                    (query, *collections, CANDIDATES),
                ).fetchall()
            text_ranks = {int(row): rank for rank, (row,) in enumerate(rows, 1)}
        sims = self.vectors @ vector.astype(np.float32)
        sims = np.where(allowed, sims, -np.inf)
        order = np.argsort(-sims, kind="stable")[: min(CANDIDATES, int(allowed.sum()))]
        vector_ranks = {int(i): rank for rank, i in enumerate(order, 1)}
        # Each list ranks its top CANDIDATES; a passage one list left out counts as just
        # past its end there (not as nothing): a passage first by its words is not
        # outranked by every passage both lists merely saw.
        fused: dict[int, float] = {}
        for ranks, weight in ((text_ranks, 1.0), (vector_ranks, vector_weight)):
            for row in text_ranks.keys() | vector_ranks.keys():
                rank = ranks.get(row, CANDIDATES + 1)
                fused[row] = fused.get(row, 0.0) + weight / (RRF_K + rank)
        best = sorted(fused, key=lambda r: (-fused[r], r))[:k]
        return [
            Hit(self.passages[r], fused[r], float(sims[r]), text_ranks.get(r), vector_ranks.get(r))
            for r in best
        ]
