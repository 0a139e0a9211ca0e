"""The decision behind a route's name, for one question:

    1. domain: the question's embedding against each specialist's domain (its
       description and example questions, the best match of each); the best domain
       at or above the calibrated similarity picks its specialist, else the generalist;
    2. cascade: the specialist answers first; its confidence is the geometric mean of
       its answer tokens' probabilities (exp of the mean log-probability, in [0, 1]);
       below the calibrated threshold the generalist answers instead;
    3. referral: when the last model tried is not confident either, the answer is the
       route's referral message, not a guess.

The answer is decided before any of it leaves: a stream sees keep-alive comments
while the route decides, then the chosen answer. The request record (route, input) is
durable before the first model runs; the outcome record carries the decision: the
similarities, each model tried with its answer, confidence and cost, and why the
answer is the one it is.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from appliance.audit.store import AuditStore
from appliance.context import RequestContext
from appliance.engines.base import Failed, Finished, Generation, SamplingParams, TextDelta
from appliance.inference import audit_pair
from appliance.inference.pipeline import ChatAsk, ChatRun, Pipeline
from appliance.problems import Failed as GenerationFailed
from appliance.problems import Forbidden, Invalid, Unavailable
from appliance.routing.spec import Route, RouteTable
from appliance.serving.scheduler import Job

REFERRAL = "referral"
CANCELLED = "cancelled"  # the client went away before the route had decided
GONE_POLL_SECONDS = 0.25  # how often a running attempt checks that its client is there


def confidence(logprobs: Sequence[float]) -> float:
    """The geometric mean of the answer tokens' probabilities; an empty answer has
    none (0.0)."""
    if not logprobs:
        return 0.0
    return math.exp(sum(logprobs) / len(logprobs))


def question_of(messages: Sequence[dict[str, str]]) -> str:
    """What is asked: the last user message."""
    for message in reversed(messages):
        if message.get("role") == "user" and message.get("content", "").strip():
            return message["content"]
    raise Invalid(
        "a routed request needs a user message to route by",
        param="messages",
        code="invalid_value",
    )


@dataclass
class Attempt:
    model: str
    model_sha256: str | None
    answer: str
    confidence: float
    threshold: float
    prompt_tokens: int
    completion_tokens: int
    seconds: float
    finish_reason: str
    logprobs: tuple[float, ...] = ()
    tokens: tuple[Any, ...] = ()  # the answer's TokenLogprobs, for a client that asked
    served_by: dict[str, Any] | None = None  # a specialist's base and adapters

    @property
    def confident(self) -> bool:
        return self.confidence >= self.threshold

    def public(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "model_sha256": self.model_sha256,
            "answer": self.answer,
            "confidence": round(self.confidence, 4),
            "threshold": round(self.threshold, 4),
            "confident": self.confident,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "seconds": round(self.seconds, 3),
            "finish_reason": self.finish_reason,
            "served_by": self.served_by,
        }


@dataclass
class Decision:
    route: str
    config_sha256: str
    suite_sha256: str
    similarities: dict[str, float]
    similarity_threshold: float
    domain: str | None  # the specialist whose domain the question is in, if any
    temperature: float  # what every model tried answered at: the calibration's
    attempts: list[Attempt] = field(default_factory=list)
    answered_by: str = REFERRAL
    outcome: str = REFERRAL  # specialist | generalist | fallback | referral | cancelled

    def public(self) -> dict[str, Any]:
        return {
            "route": self.route,
            "answered_by": self.answered_by,
            "outcome": self.outcome,
            "domain": self.domain,
            "similarities": {k: round(v, 4) for k, v in self.similarities.items()},
            "similarity_threshold": round(self.similarity_threshold, 4),
            "temperature": self.temperature,
            "tried": [a.public() for a in self.attempts],
            "config_sha256": self.config_sha256,
            "calibration_suite_sha256": self.suite_sha256,
        }


class Router:
    def __init__(self, pipeline: Pipeline, table: RouteTable, store: AuditStore) -> None:
        self.pipeline = pipeline
        self.table = table
        self.store = store
        self._domains: dict[tuple[str, str], list[np.ndarray]] = {}
        self.lock = threading.Lock()
        # (route, answered_by, outcome) -> answers, for /metrics
        self.counts: Counter[tuple[str, str, str]] = Counter()

    def has(self, name: str) -> bool:
        return self.table.get(name) is not None

    def route(self, name: str) -> Route:
        route = self.table.get(name)
        if route is None:
            raise Invalid(f"no route {name!r}", param="model", code="model_not_found")
        return route

    # -- the decision ---------------------------------------------------------------

    def authorize(self, ctx: RequestContext, route: Route) -> None:
        role = ctx.actor.role
        if route.roles is not None and role not in route.roles:
            raise Forbidden(
                f"role {role!r} may not use route {route.name!r}; it is for: "
                + ", ".join(route.roles),
                param="model",
                code="forbidden",
            )

    def ready(self, route: Route) -> None:
        if route.stale_calibration:
            raise Unavailable(
                f"route {route.name!r} changed since it was calibrated: its thresholds were "
                f"measured for another config (appliance route calibrate {route.name} "
                "--suite SUITE)",
                code="route_uncalibrated",
            )
        if route.calibration is None:
            raise Unavailable(
                f"route {route.name!r} is not calibrated: its thresholds come from an eval "
                f"suite (appliance route calibrate {route.name} --suite SUITE)",
                code="route_uncalibrated",
            )

    def usable(self, ctx: RequestContext, model: str) -> bool:
        """Whether the caller's role may use this model (a specialist may be for some)."""
        try:
            self.pipeline.authorize(ctx, model)
        except Forbidden:
            return False
        return True

    def similarities(self, route: Route, question: str) -> dict[str, float]:
        """Each specialist's similarity to the question: the best cosine over its
        domain's description and examples."""
        pool = self.pipeline.pool
        (vector,), sha = pool.embed(route.embedding, [question])
        key = (route.sha256, sha)
        with self.lock:
            domains = self._domains.get(key)
        if domains is None:
            domains = [
                self.pipeline.pool.embed(route.embedding, d.texts())[0] for d in route.specialists
            ]
            with self.lock:
                self._domains[key] = domains
        return {
            d.model: float(np.max(texts @ vector))
            for d, texts in zip(route.specialists, domains, strict=True)
        }

    def decide(self, ctx: RequestContext, route: Route, ask: ChatAsk) -> Decision:
        """Run the route: the models it tries, in order, until one is confident."""
        calibration = route.calibration
        assert calibration is not None and ask.messages is not None
        sims = self.similarities(route, question_of(ask.messages))
        # A specialist the caller's role may not use is not a candidate: the generalist.
        allowed = [m for m in sims if self.usable(ctx, m)]
        best = max(allowed, key=lambda m: sims[m], default=None)
        domain = best if best is not None and sims[best] >= calibration.similarity else None
        decision = Decision(
            route=route.name,
            config_sha256=route.sha256,
            suite_sha256=calibration.suite_sha256,
            similarities=sims,
            similarity_threshold=calibration.similarity,
            domain=domain,
            temperature=calibration.temperature,
        )
        # Every model answers at the temperature its thresholds were measured at (a
        # specialist's own default sampling included).
        ask = replace(ask, temperature=calibration.temperature)
        plan = [(domain, calibration.specialist_confidence)] if domain else []
        plan.append((route.generalist, calibration.generalist_confidence))
        for model, threshold in plan:
            if ctx.gone.is_set():  # the client left: no further model runs
                break
            attempt = self.attempt(ctx, replace(ask, model=model), threshold)
            decision.attempts.append(attempt)
            if attempt.confident:
                decision.answered_by = model
                if model != route.generalist:
                    decision.outcome = "specialist"
                else:
                    decision.outcome = "fallback" if domain else "generalist"
                break
        if ctx.gone.is_set():  # before or while a model answered: nobody to answer
            decision.answered_by = decision.outcome = CANCELLED
        return decision

    def attempt(self, ctx: RequestContext, ask: ChatAsk, threshold: float) -> Attempt:
        """One model's whole answer, with its tokens' log-probabilities."""
        started = time.perf_counter()
        want = ask.logprobs if ask.logprobs is not None else 0
        ctx.served_by = None
        model, generation = self.pipeline.prepare(ctx, replace(ask, logprobs=want))
        sha, served_by = ctx.model_sha256, ctx.served_by
        try:
            job = model.scheduler.submit(generation)
            texts: list[str] = []
            tokens: list[Any] = []
            try:
                while True:
                    try:
                        event = job.events.get(timeout=GONE_POLL_SECONDS)
                    except queue.Empty:
                        event = None  # still reading the prompt, or waiting for a slot
                    if ctx.gone.is_set():
                        job.cancel()  # ends as cancelled at the next token
                    if isinstance(event, TextDelta):
                        texts.append(event.text)
                        tokens.extend(event.tokens)
                    elif isinstance(event, Finished):
                        done = event
                        break
                    elif isinstance(event, Failed):
                        raise GenerationFailed(event.message, code="generation_failed")
            finally:
                job.cancel()
        finally:
            if ctx.lease is not None:  # each model is let go as soon as it has answered
                ctx.lease.release()
                ctx.lease = None
        return Attempt(
            model=ask.model,
            model_sha256=sha,
            answer="".join(texts),
            confidence=confidence(done.token_logprobs),
            threshold=threshold,
            prompt_tokens=done.prompt_tokens,
            completion_tokens=done.completion_tokens,
            seconds=time.perf_counter() - started,
            finish_reason=done.reason,
            logprobs=done.token_logprobs,
            tokens=tuple(tokens),
            served_by=served_by,
        )

    # -- the request ----------------------------------------------------------------

    def check(self, route: Route, ask: ChatAsk) -> None:
        """What a route can be asked (before a stream begins, so a refusal is a plain
        400): chat messages, at the temperature its thresholds were calibrated at."""
        if ask.messages is None:
            raise Invalid(
                f"route {route.name!r} answers chat completions (messages), not a prompt",
                param="model",
                code="wrong_model_kind",
            )
        calibration = route.calibration
        assert calibration is not None  # ready() refused an uncalibrated route
        # What changes the answers the thresholds were measured on (the calibration asks
        # plain answers): refused, each with its field.
        shaping = {
            "presence_penalty": bool(ask.presence_penalty),
            "frequency_penalty": bool(ask.frequency_penalty),
            "response_format": ask.json_mode,
        }
        for param, asked in shaping.items():
            if asked:
                raise Invalid(
                    f"route {route.name!r} judges answers by confidence thresholds measured "
                    f"on plain answers; {param} changes them: leave it out",
                    param=param,
                    code="sampling_not_calibrated",
                )
        if ask.temperature is not None and ask.temperature != calibration.temperature:
            raise Invalid(
                f"route {route.name!r} judges answers by confidence thresholds calibrated "
                f"at temperature {calibration.temperature:g}, which hold at that temperature "
                f"only: ask it at {calibration.temperature:g} or leave temperature out, "
                f"not {ask.temperature:g}",
                param="temperature",
                code="temperature_not_calibrated",
            )

    def chat(self, ctx: RequestContext, ask: ChatAsk) -> ChatRun:
        """A routed chat request: decided whole, then answered as a ChatRun (so that a
        stream and a plain answer go out, and are audited, as any other)."""
        route = self.route(ask.model)
        self.authorize(ctx, route)
        self.ready(route)
        self.check(route, ask)
        self.pipeline.check(ask)
        ctx.model, ctx.model_sha256, ctx.model_kind = route.name, route.sha256, "route"
        ctx.notes["route"] = route.name
        # The request record first, durable before any model runs (fail closed).
        audit_pair.open_pair(self.store, ctx, ask.body)
        audit_pair.confirm(self.store, ctx)
        decision = self.decide(ctx, route, ask)
        ctx.routing = decision.public()
        answered = next((a for a in decision.attempts if a.model == decision.answered_by), None)
        ctx.model = decision.answered_by if answered else route.name
        ctx.model_sha256 = answered.model_sha256 if answered else route.sha256
        ctx.served_by = answered.served_by if answered else None
        with self.lock:
            self.counts[(route.name, decision.answered_by, decision.outcome)] += 1
        return ChatRun(ctx, _replay(decision, answered, route.referral), self.store)


def _replay(decision: Decision, answered: Attempt | None, referral: str) -> Job:
    """The decided answer as a finished job's events, for ChatRun to hand out. Its
    usage counts every model the route ran (what the answer cost). Cancelled (the
    client left): no answer, not even the referral; what each model made is in the
    decision."""
    job = Job(Generation([], SamplingParams(max_tokens=1)))
    events: queue.SimpleQueue[Any] = job.events
    attempts = decision.attempts
    prompt = sum(a.prompt_tokens for a in attempts)
    completion = sum(a.completion_tokens for a in attempts)
    seconds = sum(a.seconds for a in attempts)
    if decision.outcome == CANCELLED:
        events.put(Finished("cancelled", prompt, completion, 0, seconds))
        return job
    if answered is None:
        events.put(TextDelta(referral))
        events.put(Finished("stop", prompt, completion, 0, seconds))
        return job
    if answered.answer:
        events.put(TextDelta(answered.answer, answered.tokens))
    events.put(Finished(answered.finish_reason, prompt, completion, 0, seconds, answered.logprobs))
    return job
