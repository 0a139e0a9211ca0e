"""A collection's relevance threshold, measured on questions rather than set by hand.

The suite's cases are questions tagged ``answerable`` (``yes``: the collection holds
the answer, and ``expected`` is a phrase of the passage that does; ``no``: it does
not). Each goes through ``/v1/retrieve``; the threshold is the similarity that best
separates the answerable questions' best passages from the others' (the middle of the
best range when several tie). Below it, a grounded answer says no source was found.
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


def observe(client: Client, suite: Suite, collection: str, k: int = 5) -> list[Measured]:
    out = []
    for case in suite.cases:
        tag = case.tags.get("answerable")
        if tag not in ("yes", "no"):
            raise ValueError(f"case {case.id}: tag answerable must be yes or no, not {tag!r}")
        question = next(m["content"] for m in reversed(case.messages) if m["role"] == "user")
        resp = client.http.post(
            "/v1/retrieve", json={"query": question, "collections": [collection], "top_k": k}
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
