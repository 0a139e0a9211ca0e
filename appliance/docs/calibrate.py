"""A collection's retrieval, measured on questions rather than set by hand.

The suite's cases are questions tagged ``answerable`` (``yes``: the collection holds
the answer, and ``expected`` is a phrase of the passage that does; ``no``: it does
not). Each goes through ``/v1/retrieve``:

- the fusion weight: the embedding list's weight (of WEIGHTS) under which the most
  answerable questions find their passage in the top k (the larger among equals: a
  corpus of codes and part numbers wants the words' list first, one of paraphrase
  the meanings');
- the relevance threshold: the similarity that best separates the answerable
  questions' best passages from the others' (the middle of the best range when
  several tie). Below it, a grounded answer says no source was found.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

from appliance.evals.client import ApiFailure, Client
from appliance.evals.suite import Suite


@dataclass
class Measured:
    case: str
    answerable: bool
    best: float  # the best passage's similarity (0 when none)
    found: bool  # answerable: the expected phrase is in one of the top passages


WEIGHTS = (0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0)


def recall(client: Client, suite: Suite, collection: str, weight: float, k: int = 5) -> float:
    """Share of the answerable questions whose passage is in the top ``k``."""
    found = total = 0
    for case in suite.cases:
        if case.tags.get("answerable") != "yes":
            continue
        question = next(m["content"] for m in reversed(case.messages) if m["role"] == "user")
        body = {"query": question, "collections": [collection], "top_k": k, "vector_weight": weight}
        resp = client.http.post("/v1/retrieve", json=body)
        if resp.status_code != 200:
            raise ApiFailure(f"/v1/retrieve answered {resp.status_code}: {resp.text[:200]}")
        phrase = str(case.expected).lower()
        total += 1
        found += any(phrase in d["text"].lower() for d in resp.json()["data"])
    return found / total if total else 0.0


def best_weight(recalls: dict[float, float]) -> float:
    top = max(recalls.values())
    return max(w for w, r in recalls.items() if r == top)


def observe(
    client: Client, suite: Suite, collection: str, k: int = 5, weight: float = 1.0
) -> list[Measured]:
    out = []
    for case in suite.cases:
        tag = case.tags.get("answerable")
        if tag not in ("yes", "no"):
            raise ValueError(f"case {case.id}: tag answerable must be yes or no, not {tag!r}")
        question = next(m["content"] for m in reversed(case.messages) if m["role"] == "user")
        resp = client.http.post(
            "/v1/retrieve",
            json={
                "query": question,
                "collections": [collection],
                "top_k": k,
                "vector_weight": weight,
            },
        )
        if resp.status_code != 200:
            raise ApiFailure(f"/v1/retrieve answered {resp.status_code}: {resp.text[:200]}")
        data = resp.json()["data"]
        phrase = str(case.expected).lower()
        out.append(
            Measured(
                case=case.id,
                answerable=tag == "yes",
                best=max((d["similarity"] for d in data), default=0.0),
                found=any(phrase in d["text"].lower() for d in data),
            )
        )
    return out


def threshold(measured: list[Measured]) -> tuple[float, float]:
    """The similarity that sorts the most questions right (answerable at or above it,
    the others below), and that share."""
    values = sorted({m.best for m in measured})
    candidates = [
        values[0] - 1e-6,
        *((a + b) / 2 for a, b in itertools.pairwise(values)),
        values[-1] + 1e-6,
    ]

    def right(t: float) -> int:
        return sum((m.best >= t) == m.answerable for m in measured)

    scores = [right(t) for t in candidates]
    top = max(scores)
    tied = [t for t, s in zip(candidates, scores, strict=True) if s == top]
    return tied[len(tied) // 2], top / len(measured)


def summary(measured: list[Measured], chosen: float, accuracy: float) -> dict[str, Any]:
    yes = [m for m in measured if m.answerable]
    no = [m for m in measured if not m.answerable]
    return {
        "min_similarity": round(chosen, 6),
        "cases": len(measured),
        "accuracy": round(accuracy, 4),
        "answerable_kept": round(sum(m.best >= chosen for m in yes) / len(yes), 4) if yes else None,
        "unanswerable_refused": round(sum(m.best < chosen for m in no) / len(no), 4)
        if no
        else None,
        "recall_at_k": round(sum(m.found for m in yes) / len(yes), 4) if yes else None,
    }
