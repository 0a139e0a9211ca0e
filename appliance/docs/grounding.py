"""Grounded answers: the question's passages, from the collections the caller may
read, put before the model as numbered sources; the answer's citations ([n]) checked
against them as it streams.

- A request opts in with the extension field ``appliance_grounding: {"collections":
  [...]}``, or by asking a specialist whose manifest binds ``collections``.
- When no passage is relevant enough (its similarity to the question below the
  collection's calibrated threshold, or the setting), the answer says so; the model
  is not asked to answer from memory.
- A citation of a source the model was not given ([7] of three) is removed from the
  answer and counted; the response lists the sources and the passages cited.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np
from flask import Flask

from appliance.config import Settings
from appliance.context import RequestContext
from appliance.docs.index import Hit, Index
from appliance.docs.store import DocStore
from appliance.problems import Forbidden, Invalid, Unavailable
from appliance.serving.pool import Lease, ModelPool

if TYPE_CHECKING:  # the pipeline imports this module for its citation filter
    from appliance.inference.pipeline import ChatAsk, Stage

MAX_TOP_K = 20
LIBRARY = "appliance.library"  # the app's extension
INSTRUCTION = (
    "Answer only from the numbered sources below. After each statement, cite the "
    "source it comes from as [n]. If the sources do not answer the question, say that "
    "no source answers it."
)
CITATION = re.compile(r"\[(\d{1,3})\]")


def no_source_message(collections: list[str]) -> str:
    return (
        "No source found: nothing in " + ", ".join(collections) + " answers this question, "
        "so the appliance does not answer it from memory."
    )


@dataclass
class Grounding:
    """What a grounded request was given and what its answer cited."""

    collections: list[str]
    sources: list[Hit] = field(default_factory=list)
    threshold: float = 0.0
    best_similarity: float | None = None
    no_source: bool = False
    cited: list[int] = field(default_factory=list)  # source numbers, in first-cited order
    attributed: list[int] = field(default_factory=list)  # cited by overlap, not the model
    removed: int = 0  # citations of sources it was not given

    def citations(self) -> list[dict[str, Any]]:
        out = []
        for n in self.cited:
            hit = self.sources[n - 1]
            by = "attributed" if n in self.attributed else "model"
            out.append({"source": n, "cited_by": by, **hit.public()})
        return out

    def public(self) -> dict[str, Any]:
        return {
            "collections": self.collections,
            "no_source": self.no_source,
            "threshold": round(self.threshold, 4),
            "best_similarity": None
            if self.best_similarity is None
            else round(self.best_similarity, 4),
            "sources": [{"source": i, **h.public()} for i, h in enumerate(self.sources, 1)],
            "citations": self.citations(),
            "removed_citations": self.removed,
        }

    def audit(self) -> dict[str, Any]:
        """For the outcome record: what the answer saw and what it cited, by passage."""

        def ref(hit: Hit) -> dict[str, Any]:
            p = hit.passage
            return {
                "passage_id": p.id,
                "document_sha256": p.document_sha256,
                "version": p.version,
                "collection": p.collection,
                "similarity": round(hit.similarity, 4),
            }

        return {
            "collections": self.collections,
            "no_source": self.no_source,
            "seen": [ref(h) for h in self.sources],
            "cited": [ref(self.sources[n - 1]) for n in self.cited],
            "attributed": self.attributed,
            "removed_citations": self.removed,
        }


WORDS = re.compile(r"[^\W_]{3,}", re.UNICODE)
ATTRIBUTE_OVERLAP = 0.5  # share of the answer's words a source must hold to be credited


def attribute(answer: str, sources: list[Hit]) -> list[int]:
    """For an answer that cites nothing: the source whose words it repeats most (at
    least ATTRIBUTE_OVERLAP of its own words), numbered from 1; none when no source
    holds that much of it."""
    words = {w.lower() for w in WORDS.findall(answer)}
    if not words:
        return []
    shares = [
        len(words & {w.lower() for w in WORDS.findall(h.passage.text)}) / len(words)
        for h in sources
    ]
    best = max(range(len(shares)), key=lambda i: shares[i])
    return [best + 1] if shares[best] >= ATTRIBUTE_OVERLAP else []


class CitationFilter:
    """The answer's text as it streams, with citations of sources that were not given
    removed (a marker split across tokens is held back until it closes). An answer
    that cites nothing gets the marker of the source it repeats, at its end, marked
    in the response as attributed rather than cited by the model."""

    def __init__(self, grounding: Grounding) -> None:
        self.grounding = grounding
        self.held = ""
        self.sent: list[str] = []

    def _check(self, marker: str) -> str:
        n = int(marker[1:-1])
        if 1 <= n <= len(self.grounding.sources):
            if n not in self.grounding.cited:
                self.grounding.cited.append(n)
            return marker
        self.grounding.removed += 1
        return ""

    def feed(self, text: str) -> str:
        self.held += text
        out = []
        while self.held:
            start = self.held.find("[")
            if start < 0:
                out.append(self.held)
                self.held = ""
                break
            out.append(self.held[:start])
            rest = self.held[start:]
            match = re.match(r"\[(\d{0,3})(\]?)", rest)
            assert match is not None
            if match.group(2):  # a whole [n]
                out.append(self._check(match.group(0)) if match.group(1) else match.group(0))
                self.held = rest[match.end() :]
            elif match.end() == len(rest) and len(match.group(1)) < 3:
                self.held = rest  # [ or [1 at the end: wait for more
                break
            else:  # not a citation
                out.append("[")
                self.held = rest[1:]
        text = "".join(out)
        self.sent.append(text)
        return text

    def flush(self) -> str:
        rest, self.held = self.held, ""
        self.sent.append(rest)
        g = self.grounding
        if not g.cited:
            g.attributed = attribute("".join(self.sent), g.sources)
            g.cited = list(g.attributed)
            rest += "".join(f" [{n}]" for n in g.attributed)
        return rest


class Library:
    """The server's documents: the store, and the index rebuilt when it changes."""

    def __init__(self, settings: Settings, pool: ModelPool) -> None:
        self.settings = settings
        self.pool = pool
        self.path = settings.docs_db_path
        self._store: DocStore | None = None
        self._index: Index | None = None
        self._lock = threading.Lock()

    def _open(self) -> DocStore | None:
        if self._store is None:
            if not self.path.exists():
                return None
            from appliance.audit.crypto import load_master_key

            master = load_master_key(self.settings.master_key_path, create=False)
            self._store = DocStore(self.path, master)
        return self._store

    def index(self) -> Index | None:
        with self._lock:
            store = self._open()
            if store is None:
                return None
            generation = store.generation()
            if self._index is None or self._index.generation != generation:
                old, self._index = self._index, Index(store.active(), generation)
                if old is not None:
                    old.close()
            return self._index

    def collections(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            store = self._open()
        return store.collections() if store is not None else {}

    def readable(
        self, role: str, known: dict[str, dict[str, Any]] | None = None
    ) -> dict[str, dict[str, Any]]:
        known = self.collections() if known is None else known
        return {name: c for name, c in known.items() if c["roles"] is None or role in c["roles"]}

    def choose(self, ctx: RequestContext, names: list[str] | None) -> list[str]:
        """The collections a request searches: those it names (each must exist and be
        readable by the caller), or every one it may read."""
        known = self.collections()
        readable = self.readable(ctx.actor.role or "", known)
        if names is None:
            return sorted(readable)
        for name in names:
            if name not in known:
                raise Invalid(
                    f"no collection {name!r}; there are: {', '.join(sorted(known)) or 'none'}",
                    param="collections",
                    code="collection_not_found",
                )
            if name not in readable:
                raise Forbidden(
                    f"role {ctx.actor.role!r} may not read collection {name!r}",
                    param="collections",
                    code="forbidden",
                )
        return list(dict.fromkeys(names))

    def embed_question(self, question: str) -> np.ndarray:
        store = self._open()
        embedding = store.embedding() if store is not None else None
        if embedding is None:
            raise Unavailable("no documents have been added", code="no_documents")
        name, sha = embedding
        vectors, served = self.pool.embed(name, [question])
        if served != sha:
            raise Unavailable(
                f"the passages were embedded with another {name} ({sha[:12]}): run "
                "`appliance docs reindex`",
                code="reindex_needed",
            )
        vector: np.ndarray = vectors[0]
        return vector

    def _calibrated(self, collections: list[str], key: str, default: float) -> float:
        """The strictest of the collections' calibrated values (the least), or the
        default when none is calibrated."""
        known = self.collections()
        values = [known[c][key] for c in collections if known.get(c, {}).get(key) is not None]
        return min(values) if values else default

    def threshold(self, collections: list[str]) -> float:
        return self._calibrated(
            collections, "min_similarity", self.settings.retrieval_min_similarity / 100
        )

    def vector_weight(self, collections: list[str]) -> float:
        return self._calibrated(collections, "vector_weight", 1.0)

    def retrieve(
        self,
        ctx: RequestContext,
        question: str,
        names: list[str] | None,
        k: int,
        vector_weight: float | None = None,
    ) -> tuple[list[str], list[Hit]]:
        if not 1 <= k <= MAX_TOP_K:
            raise Invalid(
                f"top_k is {k}; it must be 1 to {MAX_TOP_K}", param="top_k", code="invalid_value"
            )
        chosen = self.choose(ctx, names)
        index = self.index()
        if index is None or not chosen:
            return chosen, []
        vector = self.embed_question(question)
        weight = self.vector_weight(chosen) if vector_weight is None else vector_weight
        return chosen, index.search(question, vector, chosen, k, weight)

    def ground(
        self, ctx: RequestContext, messages: list[dict[str, str]], names: list[str] | None, k: int
    ) -> tuple[list[dict[str, str]], Grounding]:
        """The messages with the sources before the question, and what was found."""
        question = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
        if not question.strip():
            raise Invalid(
                "a grounded request needs a user message", param="messages", code="invalid_value"
            )
        chosen, hits = self.retrieve(ctx, question, names, k)
        grounding = Grounding(collections=chosen, threshold=self.threshold(chosen))
        grounding.best_similarity = max((h.similarity for h in hits), default=None)
        grounding.sources = [h for h in hits if h.similarity >= grounding.threshold]
        if not grounding.sources:
            grounding.no_source = True
            return messages, grounding
        lines = [INSTRUCTION, ""]
        for i, hit in enumerate(grounding.sources, 1):
            p = hit.passage
            where = f"{p.title}" + (f", {p.heading}" if p.heading else "")
            lines.append(f"[{i}] ({where})\n{p.text}\n")
        sources = {"role": "system", "content": "\n".join(lines).rstrip()}
        last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
        return [*messages[:last_user], sources, *messages[last_user:]], grounding


def grounding_stage(library: Library, settings: Settings) -> Stage:
    """The pipeline stage: a request that asks for grounding, or a specialist that binds
    collections, gets its sources before its question."""

    def ground(ctx: RequestContext, ask: ChatAsk, lease: Lease) -> ChatAsk:
        wanted = ask.grounding
        spec = lease.manifest.specialist
        if wanted is None and spec is not None and spec.collections:
            wanted = (list(spec.collections), settings.retrieval_top_k)
        if wanted is None:
            return ask
        if ask.messages is None:
            raise Invalid(
                "grounded answers are for chat completions (messages), not a prompt",
                param="model",
                code="invalid_value",
            )
        names, k = wanted
        messages, grounding = library.ground(ctx, ask.messages, names, k)
        ctx.grounding = grounding
        return replace(ask, messages=messages)

    return ground


def get_library(app: Flask) -> Library:
    library: Library = app.extensions[LIBRARY]
    return library
