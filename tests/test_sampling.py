"""Sampling, shown to sample (issue #20): an engine that always picks the likeliest token
must fail here. Two tiers, both on the real default GGUF through llama.cpp.

In-process, on the engine: the first token drawn with many seeds follows the model's
own distribution as the README's chain shapes it (top_k 40, top_p, min_p 0.05, then the
temperature), checked against the model's log-probabilities with a chi-square test;
temperature 0 is the argmax at every step; presence and frequency penalties are OpenAI's
formula over the whole answer, exactly at temperature 0 and in the counts at
temperature 1. Through the real server: seeds, `developer` messages, and
`max_completion_tokens`.

The seeds are fixed, so each measurement is the same on every run; the bounds are set
for any honest sample (a p-value of about 1e-4) and a wrong sampler misses them by far.
"""

from __future__ import annotations

import collections
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from appliance.engines.base import (
    Finished,
    Generation,
    SamplingParams,
    TextDelta,
    TokenLogprob,
)
from appliance.engines.llama import LlamaEngine
from appliance.registry import Manifest

from helpers import Server

# The README: OpenAI's parameters "with llama.cpp's top_k 40 and min_p 0.05 underneath".
TOP_K, MIN_P = 40, 0.05
Z = 3.7  # about a 1e-4 chance that an honest sample lands outside a bound
ANIMAL = [{"role": "user", "content": "Pick a random animal. Answer with one word."}]
FRUITS = [{"role": "user", "content": "List ten fruits, one per line."}]


# -- the engine, in-process ------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(model_file: Path, default_model: Manifest) -> Iterator[LlamaEngine]:
    # One thread: the numbers are the same, and on a busy 2-core machine llama.cpp's
    # threads would spend their time waiting for each other.
    engine = LlamaEngine(model_file, 512, 1, 0, default_model.context_length, parallel=1)
    yield engine
    engine.close()


def generate(
    engine: LlamaEngine, prompt: list[int], params: SamplingParams
) -> tuple[str, list[TokenLogprob], Finished]:
    """One request, alone in the engine: its text, its tokens (with logprobs asked for)
    and how it ended."""
    text: list[str] = []
    tokens: list[TokenLogprob] = []
    done: list[Any] = []

    def emit(event: Any) -> None:
        if isinstance(event, TextDelta):
            text.append(event.text)
            tokens.extend(event.tokens)
        else:
            done.append(event)

    engine.admit(Generation(prompt, params), emit, lambda: False)
    for _ in range(len(prompt) + params.max_tokens + 2):  # a bound: one token a step
        if done:
            break
        engine.step()
    assert done and isinstance(done[0], Finished), done
    return "".join(text), tokens, done[0]


def model_law(engine: LlamaEngine, prompt: list[int]) -> list[tuple[bytes, float]]:
    """The model's own log-probabilities for the answer's first token: the TOP_K
    likeliest, likeliest first (before any sampling shapes them)."""
    _, tokens, _ = generate(engine, prompt, SamplingParams(1, temperature=0, logprobs=TOP_K))
    top = list(tokens[0].top)
    assert len({piece for piece, _ in top}) == len(top), "two tokens share a text"
    return top


def nucleus(top: list[tuple[bytes, float]]) -> np.ndarray:
    """Cumulative probabilities over the TOP_K tokens, renormalised over them: what
    llama.cpp's top_p (after top_k) compares with top_p."""
    logprobs = np.array([lp for _, lp in top[:TOP_K]])
    p = np.exp(logprobs - logprobs.max())
    result: np.ndarray = np.cumsum(p / p.sum())
    return result


def shaped(top: list[tuple[bytes, float]], temperature: float, top_p: float) -> dict[bytes, float]:
    """What the chain does to the model's distribution: top_k, then top_p (the smallest
    set of the likeliest whose mass reaches it), then min_p (at least MIN_P times the
    likeliest's probability), then the temperature; renormalised."""
    pieces = [piece for piece, _ in top[:TOP_K]]
    logprobs = np.array([lp for _, lp in top[:TOP_K]])
    # top_p 1 keeps everything, as in llama.cpp (the sum of the rounded probabilities
    # may fall short of 1 by a bit, and would keep the likeliest alone).
    cut = len(pieces) if top_p >= 1.0 else int(np.argmax(nucleus(top) >= top_p)) + 1
    keep = np.arange(len(pieces)) < cut
    keep &= logprobs >= logprobs.max() + math.log(MIN_P)
    weights = np.where(keep, np.exp((logprobs - logprobs.max()) / temperature), 0.0)
    return dict(zip(pieces, weights / weights.sum(), strict=True))


def first_tokens(engine: LlamaEngine, prompt: list[int], n: int, **params: Any) -> dict[bytes, int]:
    """The answer's first token drawn with seeds 0 .. n-1: how often each came."""
    counts: collections.Counter[bytes] = collections.Counter()
    for seed in range(n):
        sample = SamplingParams(1, seed=seed, logprobs=0, **params)
        _, tokens, _ = generate(engine, prompt, sample)
        counts[tokens[0].token if tokens else b""] += 1  # b"": the end of the turn
    return dict(counts)


def chi_square(counts: dict[bytes, int], law: dict[bytes, float]) -> tuple[float, float]:
    """Pearson's statistic of the counts against the law (tokens expected fewer than 5
    times pooled), and the bound an honest sample stays under (Wilson-Hilferty's
    approximation of the chi-square quantile at Z)."""
    n = sum(counts.values())
    statistic, pooled_seen, pooled_expected, cells = 0.0, 0, 0.0, 0
    for piece, p in law.items():
        if n * p >= 5:
            statistic += (counts.get(piece, 0) - n * p) ** 2 / (n * p)
            cells += 1
        else:
            pooled_seen += counts.get(piece, 0)
            pooled_expected += n * p
    if pooled_expected > 0:
        statistic += (pooled_seen - pooled_expected) ** 2 / pooled_expected
        cells += 1
    df = max(cells - 1, 1)
    return statistic, df * (1 - 2 / (9 * df) + Z * math.sqrt(2 / (9 * df))) ** 3


def assert_follows(counts: dict[bytes, int], law: dict[bytes, float]) -> None:
    outside = {piece: k for piece, k in counts.items() if law.get(piece, 0.0) == 0.0}
    assert not outside, f"drawn, though the chain keeps no such token: {outside}"
    statistic, bound = chi_square(counts, law)
    assert statistic <= bound, (statistic, bound, counts, law)


def test_temperature_1_draws_from_the_models_distribution(engine: LlamaEngine) -> None:
    prompt = engine.chat_prompt(ANIMAL)
    top = model_law(engine, prompt)
    law = shaped(top, 1.0, 1.0)
    counts = first_tokens(engine, prompt, 200, temperature=1.0)
    kept = sum(1 for p in law.values() if p > 0)
    assert kept >= 5, law  # a prompt with a real choice
    assert len(counts) >= 5, counts  # not one token every time
    assert_follows(counts, law)
    greedy_share = counts[top[0][0]] / 200
    assert greedy_share < 0.5, counts


def test_a_lower_temperature_sharpens_the_distribution(engine: LlamaEngine) -> None:
    prompt = engine.chat_prompt(ANIMAL)
    top = model_law(engine, prompt)
    counts = first_tokens(engine, prompt, 200, temperature=0.6)
    assert_follows(counts, shaped(top, 0.6, 1.0))
    # And the measurement tells the two apart: these are not draws at temperature 1.
    statistic, bound = chi_square(counts, shaped(top, 1.0, 1.0))
    assert statistic > bound, (statistic, bound)


def test_top_p_keeps_the_nucleus(engine: LlamaEngine) -> None:
    prompt = engine.chat_prompt(ANIMAL)
    top = model_law(engine, prompt)
    cumulative = nucleus(top)
    two = float(cumulative[0] + cumulative[1]) / 2  # the two likeliest reach it, one not
    law = shaped(top, 1.0, two)
    assert {piece for piece, q in law.items() if q > 0} == {top[0][0], top[1][0]}
    counts = first_tokens(engine, prompt, 200, temperature=1.0, top_p=two)
    assert set(counts) == {top[0][0], top[1][0]}, counts
    assert_follows(counts, law)
    one = float(cumulative[0]) / 2  # the likeliest alone reaches it
    assert first_tokens(engine, prompt, 40, temperature=1.0, top_p=one) == {top[0][0]: 40}


def test_temperature_0_is_the_argmax_at_every_step(engine: LlamaEngine) -> None:
    prompt = engine.chat_prompt(FRUITS)
    answers = set()
    for seed in (None, 0, 1, 2):
        params = SamplingParams(24, temperature=0.0, top_p=0.5, seed=seed, logprobs=1)
        text, tokens, _ = generate(engine, prompt, params)
        assert len(tokens) >= 8, text
        for place, token in enumerate(tokens):
            best_piece, best = token.top[0]
            assert token.logprob >= best - 1e-6, (place, token, best_piece)
        answers.add(text)
    assert len(answers) == 1, answers  # seeds and top_p change nothing at temperature 0


def test_the_greedy_shortcut_answers_as_llama_cpps_greedy_sampler(
    engine: LlamaEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Plain greedy requests take the argmax of the logits in place, not llama.cpp's
    sampler chain; the tokens must be the chain's, with end tokens banned too."""
    import llama_cpp

    calls = collections.Counter[str]()
    sample = llama_cpp.llama_sampler_sample

    def counted(*args: Any) -> int:
        calls["sampler"] += 1
        return int(sample(*args))

    monkeypatch.setattr(llama_cpp, "llama_sampler_sample", counted)
    cases = [
        (FRUITS, SamplingParams(40, temperature=0.0, logprobs=0)),
        (ANIMAL, SamplingParams(24, temperature=0.0, ignore_eos=True, logprobs=0)),
    ]
    for messages, params in cases:
        prompt = engine.chat_prompt(messages)
        # Both from an empty cache: a prompt read in one batch or partly reused gives
        # logits that differ in their last bits (other kernels), and a near tie may flip.
        engine.fail_all("a fresh cache")
        fast, fast_tokens, fast_end = generate(engine, prompt, params)
        assert calls["sampler"] == 0  # the shortcut answered
        engine.fail_all("a fresh cache")
        with monkeypatch.context() as chain:
            chain.setattr(LlamaEngine, "_plain_greedy", staticmethod(lambda _: False))
            slow, slow_tokens, slow_end = generate(engine, prompt, params)
        assert calls["sampler"] == slow_end.completion_tokens + (slow_end.reason == "stop")
        calls.clear()
        assert (fast, fast_end.reason) == (slow, slow_end.reason)
        assert [t.token for t in fast_tokens] == [t.token for t in slow_tokens]
    # Banned end tokens: the short answer goes on past where it would have ended.
    assert fast_end.reason == "length" and len(fast_tokens) == 24


def test_every_seed_repeats_and_seeds_differ(engine: LlamaEngine) -> None:
    """The edges of the seed range too: 2**32 - 1 and -1, cut to 32 bits, were
    llama.cpp's "draw a random seed"."""
    prompt = engine.chat_prompt(ANIMAL)

    def sampled(seed: int) -> str:
        return generate(engine, prompt, SamplingParams(12, temperature=1.0, seed=seed))[0]

    for seed in (2**32 - 1, -1, 2**64 - 1, -(2**63), 2**63 - 1):
        first = sampled(seed)
        assert [sampled(seed), sampled(seed)] == [first, first], seed
    texts = {sampled(seed) for seed in range(8)}
    assert len(texts) >= 5, texts


# -- penalties -------------------------------------------------------------------------


def penalised(
    top: tuple[tuple[bytes, float], ...],
    counts: collections.Counter[bytes],
    presence: float,
    frequency: float,
) -> tuple[list[bytes], np.ndarray]:
    """OpenAI's formula on the model's log-probabilities: each token's, less frequency
    times how often the answer has it so far, less presence if it has it at all.
    Control tokens (no text; with ignore_eos, the end of the turn is barred) are left out."""
    pieces = [piece for piece, _ in top if piece]
    scores = np.array([lp for piece, lp in top if piece]) - np.array(
        [counts[p] * frequency + (counts[p] > 0) * presence for p in pieces]
    )
    return pieces, scores


@pytest.mark.parametrize(
    ("presence", "frequency"), [(1.5, 0.0), (0.0, 0.7), (0.0, -0.5), (0.5, 0.5)]
)
def test_penalties_are_openais_formula_at_temperature_0(
    engine: LlamaEngine, presence: float, frequency: float
) -> None:
    """Each greedy choice is the best of the penalised scores, counting the whole
    answer so far (longer than llama.cpp's default window of 64 tokens)."""
    params = SamplingParams(
        96,
        temperature=0.0,
        presence_penalty=presence,
        frequency_penalty=frequency,
        ignore_eos=True,
        logprobs=20,
    )
    text, tokens, _ = generate(engine, engine.chat_prompt(FRUITS), params)
    assert len(tokens) == 96, text
    counts: collections.Counter[bytes] = collections.Counter()
    moved = 0  # choices the penalties changed
    for place, token in enumerate(tokens):
        pieces, scores = penalised(token.top, counts, presence, frequency)
        mine = (
            token.logprob - counts[token.token] * frequency - (counts[token.token] > 0) * presence
        )
        assert mine >= scores.max() - 1e-4, (place, token.token, pieces[int(scores.argmax())])
        moved += token.token != pieces[0]
        counts[token.token] += 1
    assert moved >= 3, text  # the penalties had something to do here


@pytest.mark.parametrize(("presence", "frequency"), [(1.5, 0.0), (0.0, 1.0)])
def test_penalties_change_the_distribution_at_temperature_1(
    engine: LlamaEngine, presence: float, frequency: float
) -> None:
    """Over 12 sampled answers, how many tokens repeat an earlier one of their answer:
    as many as the penalised distribution expects at each step, and clearly fewer than
    the model's own would give (the sum of each step's chance is the expected count,
    whatever path the answers took)."""
    prompt = engine.chat_prompt(FRUITS)
    seen = expected = variance = unpenalised = 0.0
    for seed in range(12):
        params = SamplingParams(
            24,
            temperature=1.0,
            seed=seed,
            presence_penalty=presence,
            frequency_penalty=frequency,
            ignore_eos=True,
            logprobs=60,  # room for tokens that rise into the top 40 past penalised ones
        )
        _, tokens, _ = generate(engine, prompt, params)
        counts: collections.Counter[bytes] = collections.Counter()
        for token in tokens:
            if counts:
                q = repeat_chance(token.top, counts, presence, frequency)
                seen += counts[token.token] > 0
                expected += q
                variance += q * (1 - q)
                unpenalised += repeat_chance(token.top, counts, 0.0, 0.0)
            counts[token.token] += 1
    sd = math.sqrt(variance)
    assert abs(seen - expected) <= Z * sd + 1, (seen, expected, sd)
    assert unpenalised - seen > 3 * sd, (seen, unpenalised, sd)


def repeat_chance(
    top: tuple[tuple[bytes, float], ...],
    counts: collections.Counter[bytes],
    presence: float,
    frequency: float,
) -> float:
    """The chance, at temperature 1 after top_k and min_p, that this step draws a token
    the answer already has."""
    pieces, scores = penalised(top, counts, presence, frequency)
    order = np.argsort(-scores, kind="stable")[:TOP_K]
    scores = scores[order]
    weights = np.where(scores >= scores[0] + math.log(MIN_P), np.exp(scores - scores[0]), 0.0)
    weights /= weights.sum()
    return float(sum(w for w, i in zip(weights, order, strict=True) if counts[pieces[i]]))


# -- through the real server -----------------------------------------------------------


def answer(server: Server, model: str, **body: Any) -> dict[str, Any]:
    body = {"model": model, "messages": ANIMAL, "max_tokens": 12, **body}
    body = {key: value for key, value in body.items() if value is not None}  # None: left out
    resp = server.http.post("/v1/chat/completions", json=body)
    assert resp.status_code == 200, resp.text
    result: dict[str, Any] = resp.json()
    return result


def text_of(result: dict[str, Any]) -> str:
    return str(result["choices"][0]["message"]["content"])


@pytest.mark.server
def test_seeds_repeat_and_differ_at_temperature_1(shared_server: Server, model_name: str) -> None:
    def sampled(seed: int, **body: Any) -> str:
        return text_of(answer(shared_server, model_name, seed=seed, **body))

    texts = [sampled(seed, temperature=1.0) for seed in range(1, 6)]
    assert len(set(texts)) >= 3, texts  # different seeds, different answers
    assert sampled(3, temperature=1.0) == texts[2]  # the same seed, the same answer
    assert sampled(3) == texts[2]  # temperature left out is OpenAI's default, 1


@pytest.mark.server
def test_top_p_and_penalties_reach_the_engine(shared_server: Server, model_name: str) -> None:
    """The request's top_p and penalties are the engine's (their effects are measured
    above): a tiny top_p leaves the likeliest token only, whatever the seed, and either
    penalty turns the greedy list of fruits away from its repeats."""
    ask: dict[str, Any] = {"messages": FRUITS, "max_tokens": 16}
    greedy = text_of(answer(shared_server, model_name, temperature=0, **ask))
    for seed in (1, 2):
        narrow = answer(shared_server, model_name, temperature=1.0, top_p=0.01, seed=seed, **ask)
        assert text_of(narrow) == greedy
    for penalty in ("presence_penalty", "frequency_penalty"):
        penalised = answer(shared_server, model_name, temperature=0, **{penalty: 1.5}, **ask)
        assert text_of(penalised) != greedy, penalty


@pytest.mark.server
def test_developer_messages_act_as_system(shared_server: Server, model_name: str) -> None:
    rule = "Answer in one word."
    question = {"role": "user", "content": "What colour is the sky?"}

    def chat(role: str) -> list[dict[str, str]]:
        return [{"role": role, "content": rule}, question]

    def tokens(messages: list[dict[str, str]]) -> list[int]:
        body = {"model": model_name, "messages": messages}
        resp = shared_server.http.post("/tokenize", json=body)
        assert resp.status_code == 200, resp.text
        return list(resp.json()["tokens"])

    as_system = tokens(chat("system"))
    assert tokens(chat("developer")) == as_system
    assert tokens(chat("user")) != as_system  # the role is in the prompt
    greedy = {"temperature": 0, "max_tokens": 8}
    by_developer = answer(shared_server, model_name, messages=chat("developer"), **greedy)
    by_system = answer(shared_server, model_name, messages=chat("system"), **greedy)
    assert text_of(by_developer) == text_of(by_system)
    assert by_developer["usage"]["prompt_tokens"] == by_system["usage"]["prompt_tokens"]
    assert by_developer["usage"]["prompt_tokens"] == len(as_system)


@pytest.mark.server
def test_max_completion_tokens_limits_the_answer(shared_server: Server, model_name: str) -> None:
    # Ten fruits: an answer longer than 5 tokens with any model.
    greedy: dict[str, Any] = {"temperature": 0, "messages": FRUITS}
    for limit in (1, 5):
        whole = answer(
            shared_server, model_name, max_tokens=None, max_completion_tokens=limit, **greedy
        )
        assert whole["usage"]["completion_tokens"] == limit
        assert whole["choices"][0]["finish_reason"] == "length"
    # max_tokens, its older name, the same.
    assert text_of(answer(shared_server, model_name, max_tokens=5, **greedy)) == text_of(whole)
    # Streamed, the same answer and count.
    body = {
        "model": model_name,
        "max_completion_tokens": 5,
        "stream": True,
        "stream_options": {"include_usage": True},
        **greedy,
    }
    chunks = []
    with shared_server.http.stream("POST", "/v1/chat/completions", json=body) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if line.startswith("data: {"):
                chunks.append(json.loads(line.removeprefix("data: ")))
    assert chunks[-1]["usage"]["completion_tokens"] == 5
    streamed = [c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]]
    assert "".join(streamed) == text_of(whole)


@pytest.mark.server
@pytest.mark.parametrize(
    ("limits", "param", "code", "words"),
    [
        # OpenAI refuses both at once ("Setting 'max_tokens' and 'max_completion_tokens'
        # at the same time is not supported", invalid_parameter_combination), even equal.
        (
            {"max_tokens": 5, "max_completion_tokens": 5},
            "max_tokens",
            "invalid_parameter_combination",
            "both",
        ),
        (
            {"max_completion_tokens": 0},
            "max_completion_tokens",
            "invalid_value",
            "greater than or equal to 1",
        ),
        ({"max_completion_tokens": 2048}, "messages", "context_length_exceeded", "2048"),
        # Over the appliance's limit: the error names the field the client sent.
        (
            {"max_completion_tokens": 100000},
            "max_completion_tokens",
            "invalid_value",
            "max_completion_tokens is 100000",
        ),
    ],
)
def test_max_completion_tokens_refusals(
    shared_server: Server,
    model_name: str,
    limits: dict[str, int],
    param: str,
    code: str,
    words: str,
) -> None:
    body = {"model": model_name, "messages": ANIMAL, **limits}
    resp = shared_server.http.post("/v1/chat/completions", json=body)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert (error["param"], error["code"]) == (param, code), error
    assert words in error["message"], error
