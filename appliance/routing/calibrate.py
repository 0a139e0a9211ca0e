"""A route's thresholds, measured on an eval suite rather than set by hand.

The suite's cases are questions with their expected answers and graders; each case's
tag ``domain`` names the specialist whose domain it is in (any other value, or none:
off-domain, for the generalist). Every case goes through the real serving path: its
embedding against each domain, the specialist's answer (the one the question is most
like) and the generalist's, each with its confidence and graded. Then:

- the similarity threshold is the one that sends the most cases where they belong
  (in-domain to their specialist, off-domain to the generalist), taken midway
  between neighbouring similarities (the middle one when several tie);
- the two confidence thresholds (specialist, generalist) are those that answer the
  most cases correctly while at most ``target_error`` of the answers given (not
  referred) are wrong; among equals, fewer wrong answers, then fewer referrals.
  When no setting meets the target, everything is referred, and the report says so.
"""

from __future__ import annotations

import datetime as dt
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from appliance.evals.client import Client
from appliance.evals.graders import grade
from appliance.evals.suite import Suite
from appliance.routing.router import confidence
from appliance.routing.spec import Calibration, Route

NEVER = 1.0 + 1e-9  # a confidence threshold no answer reaches: refer them all
TEMPERATURE = 0.0  # answers are measured greedy: repeatable, and what the route then asks


@dataclass
class Observation:
    """One case, as the route's models saw it."""

    case: str
    domain: str | None  # the specialist it belongs to (None: off-domain)
    similarities: dict[str, float]
    nearest: str  # the specialist whose domain it is most like
    specialist_confidence: float
    specialist_correct: bool
    generalist_confidence: float
    generalist_correct: bool


def observe(client: Client, route: Route, suite: Suite, max_tokens: int) -> list[Observation]:
    domains = {d.model for d in route.specialists}
    vectors = {d.model: client.embed(route.embedding, d.texts()) for d in route.specialists}
    found = []
    for case in suite.cases:
        question = next((m["content"] for m in reversed(case.messages) if m["role"] == "user"), "")
        (q,) = client.embed(route.embedding, [question])
        sims = {m: float(np.max(v @ q)) for m, v in vectors.items()}
        nearest = max(sims, key=lambda m: sims[m])
        answers = {}
        for model in (nearest, route.generalist):
            result = client.chat(model, case.messages, max_tokens, TEMPERATURE, logprobs=True)
            ok = grade(case.grader, result.text, case.expected).passed
            answers[model] = (confidence(result.logprobs), ok)
        tag = case.tags.get("domain")
        found.append(
            Observation(
                case=case.id,
                domain=tag if tag in domains else None,
                similarities=sims,
                nearest=nearest,
                specialist_confidence=answers[nearest][0],
                specialist_correct=answers[nearest][1],
                generalist_confidence=answers[route.generalist][0],
                generalist_correct=answers[route.generalist][1],
            )
        )
    return found


def similarity_threshold(observations: Sequence[Observation]) -> tuple[float, float]:
    """The threshold that routes the most cases where they belong, and that share."""
    best = [o.similarities[o.nearest] for o in observations]
    values = sorted(set(best))
    candidates = (
        [values[0] - 1e-6]
        + [(a + b) / 2 for a, b in itertools.pairwise(values)]
        + [values[-1] + 1e-6]
    )

    def routed_right(t: float) -> int:
        right = 0
        for o, s in zip(observations, best, strict=True):
            to = o.nearest if s >= t else None
            right += to == o.domain
        return right

    scores = [routed_right(t) for t in candidates]
    top = max(scores)
    tied = [t for t, score in zip(candidates, scores, strict=True) if score == top]
    chosen = tied[len(tied) // 2]  # the middle of the best: the most room either way
    return chosen, top / len(observations)


def outcomes(
    observations: Sequence[Observation], similarity: float, spec: float, gen: float
) -> tuple[int, int, int]:
    """(correct, wrong, referred) with these thresholds."""
    correct = wrong = referred = 0
    for o in observations:
        plan = []
        if o.similarities[o.nearest] >= similarity:
            plan.append((o.specialist_confidence, spec, o.specialist_correct))
        plan.append((o.generalist_confidence, gen, o.generalist_correct))
        for conf, threshold, ok in plan:
            if conf >= threshold:
                correct += ok
                wrong += not ok
                break
        else:
            referred += 1
    return correct, wrong, referred


def calibrate(
    observations: Sequence[Observation],
    route: Route,
    suite: Suite,
    target_error: float,
) -> Calibration:
    similarity, routing_accuracy = similarity_threshold(observations)
    spec_grid = sorted({o.specialist_confidence for o in observations} | {NEVER})
    gen_grid = sorted({o.generalist_confidence for o in observations} | {NEVER})
    best: tuple[tuple[int, int, int], float, float] | None = None
    for spec in spec_grid:
        for gen in gen_grid:
            correct, wrong, referred = outcomes(observations, similarity, spec, gen)
            answered = correct + wrong
            if answered and wrong / answered > target_error:
                continue
            key = (correct, -wrong, -referred)
            if best is None or key > best[0]:
                best = (key, spec, gen)
    assert best is not None  # refer-everything always meets the target
    _, spec, gen = best
    correct, wrong, referred = outcomes(observations, similarity, spec, gen)
    n = len(observations)
    measured: dict[str, Any] = {
        "cases": n,
        "routing_accuracy": round(routing_accuracy, 4),
        "accuracy": round(correct / n, 4),
        "wrong_among_answered": round(wrong / (correct + wrong), 4) if correct + wrong else 0.0,
        "referral_rate": round(referred / n, 4),
        "refers_everything": correct + wrong == 0,
        "observations": [
            {
                "case": o.case,
                "domain": o.domain,
                "nearest": o.nearest,
                "similarity": round(o.similarities[o.nearest], 4),
                "specialist": [round(o.specialist_confidence, 4), o.specialist_correct],
                "generalist": [round(o.generalist_confidence, 4), o.generalist_correct],
            }
            for o in observations
        ],
    }
    return Calibration(
        # Exactly as measured: a rounded threshold may sit above the value it was
        # chosen at, and refer the very case it was chosen to answer.
        similarity=similarity,
        specialist_confidence=spec,
        generalist_confidence=gen,
        suite=str(suite.path),
        suite_sha256=suite.sha256,
        target_error=target_error,
        calibrated_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        measured=measured,
        config_sha256=route.sha256,
        temperature=TEMPERATURE,
    )
