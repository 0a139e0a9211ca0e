"""One inference pipeline: a request's life from the model's name to its answer.

    resolve (the pool: unknown / wrong kind / refused / loaded on demand)
      -> stages (routing, grounding: plug in here, between resolve and prepare)
      -> prepare (the prompt, in the model's tokens) -> bounds (context, max_tokens)
      -> audit: the request record -> submit -> answer or stream -> the outcome record

Everything a step learns goes into the request's typed context; problems are domain
problems (appliance/problems.py) that the API turns into HTTP in one place. Nothing
here knows HTTP: the blueprints translate a protocol into an ask and an answer back.
"""

from __future__ import annotations

import hashlib
import json
import queue
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from appliance.audit.store import AuditStore
from appliance.config import Settings
from appliance.context import RequestContext
from appliance.docs.grounding import CitationFilter, no_source_message
from appliance.engines.base import (
    Event,
    Failed,
    Finished,
    Generation,
    PromptError,
    SamplingParams,
    TextDelta,
    TokenLogprob,
)
from appliance.inference import audit_pair
from appliance.problems import ClientGone, Forbidden, Invalid, Unavailable
from appliance.problems import Failed as GenerationFailed
from appliance.registry import SpecialistSpec
from appliance.resources import pressure
from appliance.serving.loader import Parts
from appliance.serving.models import ChatModel, RunModel
from appliance.serving.pool import Lease, ModelPool
from appliance.serving.scheduler import Job

KEEPALIVE_SECONDS = 5.0
# How often a plain answer being collected looks whether its client has gone.
GONE_POLL_SECONDS = 0.25
MAX_STOPS = 4
MAX_STOP_CHARS = 256
MAX_EMBED_INPUTS = 256


@dataclass(frozen=True)
class ChatAsk:
    """A chat (``messages``) or completion (``prompt``) request, protocol-free."""

    model: str
    body: dict[str, Any]  # the request as it came, for the audit's request record
    messages: list[dict[str, str]] | None = None
    prompt: str | list[int] | None = None
    max_tokens: int | None = None
    max_tokens_param: str = "max_tokens"  # or max_completion_tokens: as the client sent it
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    ignore_eos: bool = False
    json_mode: bool = False  # answer in JSON; with json_schema, in that schema
    json_schema: dict[str, Any] | None = None
    stream: bool = False
    logprobs: int | None = None  # None: none; k: each token's, and the k likeliest
    # Grounded on documents: (collections, None for all the caller may read; top_k).
    grounding: tuple[list[str] | None, int] | None = None
    # When the request gives no max_tokens: at most this many (a specialist's default),
    # and never more than the window or the setting allow.
    default_max_tokens: int | None = None

    @property
    def prompt_param(self) -> str:
        return "messages" if self.messages is not None else "prompt"


@dataclass(frozen=True)
class EmbedAsk:
    model: str
    body: dict[str, Any]
    texts: list[str] | None = None
    token_ids: list[list[int]] | None = None
    dimensions: int | None = None


@dataclass(frozen=True)
class Embeddings:
    vectors: np.ndarray  # float32 [inputs, dimensions], rows of norm 1
    prompt_tokens: int


# A stage sees the context, the ask and the resolved model's lease, and gives the ask
# on (changed: the grounding stage adds sources), or refuses by raising a problem. It
# must not reach for Flask's request or app: a stream whose model had to load runs the
# pipeline in a thread of its own.
Stage = Callable[[RequestContext, ChatAsk, Lease], ChatAsk]


@dataclass
class Pipeline:
    settings: Settings
    pool: ModelPool
    store: AuditStore
    # Stages between resolve and prepare (routing, grounding), run in order.
    stages: list[Stage] = field(default_factory=list)

    # -- resolve --------------------------------------------------------------------

    def resolve(self, ctx: RequestContext, name: str, kind: str) -> Lease:
        """A lease on the model, loaded if need be; the context learns which model."""
        short = pressure(self.settings)
        if short:
            raise Unavailable(short, code="memory_pressure", retry_after=5)
        self.authorize(ctx, name)
        lease = self.pool.acquire(name, kind)
        ctx.lease = lease
        ctx.model, ctx.model_sha256 = lease.manifest.name, lease.manifest.sha256
        ctx.model_kind = lease.manifest.kind
        ctx.model_loaded_now = lease.loaded_now
        if lease.parts is not None:
            ctx.served_by = served_by(lease.parts, lease.manifest.specialist)
            ctx.model_sha256 = ctx.served_by["sha256"]
        return lease

    def authorize(self, ctx: RequestContext, name: str) -> None:
        """A specialist is for the roles its manifest names (an unknown name: 404)."""
        spec = self.pool.manifest(name).specialist
        role = ctx.actor.role
        if spec is not None and spec.roles is not None and role not in spec.roles:
            raise Forbidden(
                f"role {role!r} may not use specialist {name!r}; it is for: "
                + ", ".join(spec.roles),
                param="model",
                code="forbidden",
            )

    # -- chat and completions -------------------------------------------------------

    def check(self, ask: ChatAsk) -> None:
        """What can be refused before the model is resolved (and perhaps loaded)."""
        limit = self.settings.max_tokens
        if ask.max_tokens is not None and ask.max_tokens > limit:
            raise Invalid(
                f"{ask.max_tokens_param} is {ask.max_tokens}; this appliance allows at most "
                f"{limit} (setting max_tokens)",
                param=ask.max_tokens_param,
                code="invalid_value",
            )
        stops(ask.stop)

    def chat(self, ctx: RequestContext, ask: ChatAsk) -> ChatRun:
        model, generation = self.prepare(ctx, ask)
        audit_pair.open_pair(self.store, ctx, ask.body)
        grounding = ctx.grounding
        if grounding is not None and grounding.no_source:  # said, not generated
            return ChatRun(ctx, answered(no_source_message(grounding.collections)), self.store)
        job = model.scheduler.submit(generation)
        return ChatRun(ctx, job, self.store)

    def prepare(self, ctx: RequestContext, ask: ChatAsk) -> tuple[ChatModel, Generation]:
        """The model, resolved (the context's lease holds it), and the generation to
        submit to it: everything before the audit's request record."""
        self.check(ask)
        lease = self.resolve(ctx, ask.model, "chat")
        if lease.manifest.specialist is not None:
            ask = as_specialist(ask, lease.manifest.specialist)
        for stage in self.stages:
            ask = stage(ctx, ask, lease)
        model = lease.model
        assert isinstance(model, ChatModel)
        grammar = self._grammar(ask, model)
        try:
            if ask.messages is not None:
                prompt = model.engine.chat_prompt(ask.messages)
            else:
                assert ask.prompt is not None
                prompt = model.engine.text_prompt(ask.prompt)
        except PromptError as exc:
            raise Invalid(
                str(exc), param=exc.param or ask.prompt_param, code="invalid_value"
            ) from None
        params = self._sampling(ask, len(prompt), model, grammar)
        return model, Generation(prompt, params)

    def _grammar(self, ask: ChatAsk, model: ChatModel) -> str | None:
        if not ask.json_mode:
            return None
        try:
            return model.engine.json_grammar(ask.json_schema)
        except PromptError as exc:
            raise Invalid(str(exc), param=exc.param, code="invalid_value") from None

    def _sampling(
        self, ask: ChatAsk, prompt_tokens: int, model: ChatModel, grammar: str | None
    ) -> SamplingParams:
        limit = self.settings.max_tokens  # a request over it was refused by check()
        n_ctx = model.engine.info.n_ctx
        name = model.manifest.name
        where = ask.prompt_param
        requested = ask.max_tokens
        if prompt_tokens == 0:
            raise Invalid("the prompt is empty", param=where, code="invalid_value")
        if prompt_tokens >= n_ctx:
            raise Invalid(
                f"the prompt has {prompt_tokens} tokens; the context window of "
                f"{name} is {n_ctx} tokens",
                param=where,
                code="context_length_exceeded",
            )
        if requested is not None:
            max_tokens = requested
        else:
            max_tokens = min(limit, n_ctx - prompt_tokens, ask.default_max_tokens or limit)
        if prompt_tokens + max_tokens > n_ctx:
            raise Invalid(
                f"the prompt has {prompt_tokens} tokens and {ask.max_tokens_param} is "
                f"{max_tokens}: "
                f"{prompt_tokens + max_tokens} tokens exceed the context window of "
                f"{name}, {n_ctx} tokens",
                param=where,
                code="context_length_exceeded",
            )
        if ask.ignore_eos and grammar is not None:
            raise Invalid(
                "ignore_eos cannot be combined with response_format json",
                param="ignore_eos",
                code="invalid_value",
            )
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if ask.temperature is None else ask.temperature,
            top_p=1.0 if ask.top_p is None else ask.top_p,
            seed=ask.seed,
            stop=stops(ask.stop),
            presence_penalty=ask.presence_penalty or 0.0,
            frequency_penalty=ask.frequency_penalty or 0.0,
            grammar=grammar,
            ignore_eos=ask.ignore_eos,
            logprobs=ask.logprobs,
        )

    # -- embeddings -----------------------------------------------------------------

    def embed(self, ctx: RequestContext, ask: EmbedAsk) -> Embeddings:
        # What can be refused without the model, before it is resolved (and loaded).
        count = len(ask.texts if ask.texts is not None else ask.token_ids or [])
        if count == 0:
            raise Invalid(
                "input is empty: give a string or a list of them",
                param="input",
                code="invalid_value",
            )
        if count > MAX_EMBED_INPUTS:
            raise Invalid(
                f"input holds {count} items; at most {MAX_EMBED_INPUTS} are embedded per request",
                param="input",
                code="too_many_inputs",
            )
        for i, item in enumerate(ask.texts or ask.token_ids or []):
            if not item:
                raise Invalid(f"input[{i}] is empty", param=f"input[{i}]", code="invalid_value")
        lease = self.resolve(ctx, ask.model, "embedding")
        model = lease.model
        assert isinstance(model, RunModel)
        engine = model.engine
        if ask.dimensions is not None and ask.dimensions != engine.dimensions:
            raise Invalid(
                f"dimensions is {ask.dimensions}; model {model.manifest.name} gives "
                f"{engine.dimensions}-dimensional vectors and cannot shorten them",
                param="dimensions",
                code="invalid_value",
            )
        if ask.texts is not None:
            batch = engine.tokenize(ask.texts)
        else:
            assert ask.token_ids is not None
            vocab = engine.vocab_size()
            batch = []
            for i, ids in enumerate(ask.token_ids):
                bad = next((t for t in ids if not 0 <= t < vocab), None)
                if bad is not None:
                    raise Invalid(
                        f"input[{i}] holds token id {bad}; the vocabulary of "
                        f"{model.manifest.name} has ids 0 to {vocab - 1}",
                        param=f"input[{i}]",
                        code="invalid_value",
                    )
                batch.append(engine.wrap_ids(ids))
        limit = engine.max_input_tokens
        for i, ids in enumerate(batch):
            if len(ids) > limit:
                raise Invalid(
                    f"input[{i}] has {len(ids)} tokens; model {model.manifest.name} embeds "
                    f"at most {limit} tokens per input",
                    param=f"input[{i}]" if count > 1 or ask.texts is None else "input",
                    code="context_length_exceeded",
                )
        tokens = sum(len(ids) for ids in batch)
        ctx.usage.prompt_tokens = tokens
        ctx.notes["inputs"] = count
        # An embedding takes milliseconds: its request record is committed with the
        # outcome record, in one fsync, before the answer leaves.
        audit_pair.open_pair(self.store, ctx, ask.body, with_outcome=True)
        with model.admission:
            vectors = engine.embed(batch)
        ctx.audit.output.append(f"{count} vectors of {vectors.shape[1]} dimensions")
        return Embeddings(vectors, tokens)

    # -- tensors --------------------------------------------------------------------

    def run_tensors(
        self,
        ctx: RequestContext,
        lease: Lease,
        feeds: dict[str, np.ndarray],
        outputs: list[str],
        audit_input: dict[str, Any],
    ) -> dict[str, np.ndarray]:
        """Run a tensor model on decoded inputs (the protocol decoded them against the
        model's own metadata, after resolve)."""
        model = lease.model
        assert isinstance(model, RunModel)
        # A tensor model answers in microseconds: its request record is committed with
        # the outcome record, in one fsync, before the answer leaves.
        audit_pair.open_pair(self.store, ctx, audit_input, with_outcome=True)
        with model.admission:
            try:
                results: dict[str, np.ndarray] = model.engine.run(feeds, outputs)
            except Exception as exc:  # onnxruntime rejects what the metadata could not tell
                raise Invalid(f"the model could not run these inputs: {exc}") from None
        return results


def answered(text: str) -> Job:
    """A job whose answer is already known (said, not generated): for ChatRun."""
    job = Job(Generation([], SamplingParams(max_tokens=1)))
    job.events.put(TextDelta(text))
    job.events.put(Finished("stop", 0, 0))
    return job


def served_by(parts: Parts, spec: SpecialistSpec | None = None) -> dict[str, Any]:
    """What answers for a specialist, file by file, and one hash over it all (its
    model_sha256 in the audit log: the same base and adapters at the same scales, the
    same hash)."""
    recipe: dict[str, Any] = {
        "base": parts.base.name,
        "base_sha256": parts.base.sha256,
        "adapters": [
            {"name": a.name, "sha256": a.sha256, "scale": scale} for a, scale in parts.adapters
        ],
    }
    if spec is not None:  # what the model is given beside the request
        prompt = spec.system_prompt
        recipe["system_prompt_sha256"] = (
            hashlib.sha256(prompt.encode()).hexdigest() if prompt is not None else None
        )
        recipe["sampling"] = {
            "temperature": spec.temperature,
            "top_p": spec.top_p,
            "max_tokens": spec.max_tokens,
        }
    canonical = json.dumps(recipe, sort_keys=True, separators=(",", ":")).encode()
    return {**recipe, "sha256": hashlib.sha256(canonical).hexdigest()}


def as_specialist(ask: ChatAsk, spec: SpecialistSpec) -> ChatAsk:
    """The ask as the specialist serves it: its system prompt first, its sampling
    defaults where the request left them out."""
    messages = ask.messages
    if spec.system_prompt and messages is not None:
        messages = [{"role": "system", "content": spec.system_prompt}, *messages]
    return replace(
        ask,
        messages=messages,
        temperature=spec.temperature if ask.temperature is None else ask.temperature,
        top_p=spec.top_p if ask.top_p is None else ask.top_p,
        default_max_tokens=spec.max_tokens,
    )


def stops(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    items = [stop] if isinstance(stop, str) else stop
    if len(items) > MAX_STOPS:
        raise Invalid(
            f"stop has {len(items)} strings; at most {MAX_STOPS} are allowed",
            param="stop",
            code="invalid_value",
        )
    for i, text in enumerate(items):
        # Each is matched against the answer after every token: a long one costs the
        # model's thread (a 250,000-character stop string took 3.3 s of it).
        if len(text) > MAX_STOP_CHARS:
            raise Invalid(
                f"stop[{i}] is {len(text)} characters long; at most {MAX_STOP_CHARS} are allowed",
                param=f"stop[{i}]" if not isinstance(stop, str) else "stop",
                code="invalid_value",
            )
    return tuple(s for s in items if s)


class ChatRun:
    """A submitted generation: collect it whole, or stream it. Either way the request
    record is durable before the first byte of the answer, the answer is kept for the
    outcome record, and the cost lands in the context's usage."""

    def __init__(self, ctx: RequestContext, job: Job, store: AuditStore) -> None:
        self.ctx = ctx
        self.job = job
        self.store = store
        self.settled = False  # the job's last event came
        self.tokens: list[TokenLogprob] = []  # collect(): with logprobs, the answer's
        grounding = ctx.grounding
        # A grounded answer: citations of sources it was not given are taken out.
        self.citations = (
            CitationFilter(grounding) if grounding is not None and not grounding.no_source else None
        )

    def confirm(self) -> None:
        """The request record must be durable before the answer's first byte; if it
        cannot be written, the model stops and the client gets 503."""
        try:
            audit_pair.confirm(self.store, self.ctx)
        except Unavailable:
            self.job.cancel()
            raise

    def _events(self, quiet: float = KEEPALIVE_SECONDS) -> Iterator[Event | None]:
        """The job's events; None every ``quiet`` seconds while nothing happens
        (keep-alive). A grounded answer's text comes through its citation check."""
        while True:
            try:
                event = self.job.events.get(timeout=quiet)
            except queue.Empty:
                yield None
                continue
            if isinstance(event, TextDelta) and self.ctx.first_token_at is None:
                self.ctx.first_token_at = time.perf_counter()
            if self.citations is not None:
                if isinstance(event, TextDelta):
                    text = self.citations.feed(event.text)
                    if not text and not event.tokens:
                        continue
                    event = TextDelta(text, event.tokens)
                elif isinstance(event, Finished) and (rest := self.citations.flush()):
                    yield TextDelta(rest)
            yield event
            if isinstance(event, Finished | Failed):
                return

    def _settle(self, done: Finished) -> None:
        usage = self.ctx.usage
        usage.prompt_tokens = done.prompt_tokens
        usage.completion_tokens = done.completion_tokens
        usage.cached_tokens = done.cached_tokens
        usage.finish_reason = done.reason
        usage.decode_seconds = done.decode_seconds

    def collect(self) -> tuple[str, Finished]:
        """The whole answer. If the client hangs up meanwhile (``ctx.gone``, set by the
        API's departures watch), the job is cancelled and ClientGone raised once it has
        ended: the outcome record keeps what was made."""
        parts = self.ctx.audit.output  # the outcome record keeps the answer
        gone = self.ctx.gone
        try:
            if gone.is_set():  # left while its model loaded: withdrawn, or stopped at once
                self.job.cancel()
            for event in self._events(GONE_POLL_SECONDS):
                if gone.is_set():
                    self.job.cancel()  # ends as cancelled at its next token
                if isinstance(event, TextDelta):
                    parts.append(event.text)
                    self.tokens.extend(event.tokens)
                elif isinstance(event, Finished):
                    self._settle(event)
                    if gone.is_set():
                        self.ctx.client_disconnected = True
                        self.ctx.usage.finish_reason = "cancelled"
                        raise ClientGone(
                            "the client closed its connection before the answer was whole; "
                            f"the model stopped after {event.completion_tokens} token(s)",
                            code="client_disconnected",
                        )
                    self.confirm()
                    return "".join(parts), event
                elif isinstance(event, Failed):
                    self.ctx.usage.finish_reason = "failed"
                    raise GenerationFailed(event.message, code="generation_failed")
        finally:
            self.job.cancel()
        raise AssertionError("event stream ended without an outcome")

    def stream(self) -> Generator[Event | None, None, None]:
        """The answer as it comes: text deltas, None for a keep-alive, then Finished or
        Failed. Call confirm() before the first byte, and close() when done."""
        try:
            for event in self._events():
                if isinstance(event, TextDelta):
                    self.ctx.audit.output.append(event.text)
                elif isinstance(event, Finished):
                    self.settled = True
                    self._settle(event)
                elif isinstance(event, Failed):
                    self.settled = True
                    self.ctx.usage.finish_reason = "failed"
                yield event
        finally:
            self.close()

    def close(self) -> None:
        """Before the end (the client went away): cancel the job, which frees the model
        at the next token, and keep what the answer cost so far."""
        if self.settled:
            return
        self.settled = True
        self.ctx.client_disconnected = True
        last = self.job.cancel_and_settle()
        if isinstance(last, Finished):
            self._settle(last)
        self.ctx.usage.finish_reason = "cancelled"
