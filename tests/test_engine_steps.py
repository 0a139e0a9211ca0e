"""The llama.cpp engine's step, in-process on the real default GGUF: when a token's text
is sent, and what a failed llama_decode leaves behind (issue #13 moved the first and
touched the second)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import llama_cpp
import pytest

from appliance.engines.base import Event, Failed, Finished, Generation, SamplingParams, TextDelta
from appliance.engines.llama import LlamaEngine
from appliance.registry import Manifest

QUESTION = [{"role": "user", "content": "Name three rivers in Europe."}]
GREEDY = SamplingParams(max_tokens=12, temperature=0.0)


@pytest.fixture(scope="module")
def engine(model_file: Path, default_model: Manifest) -> Iterator[LlamaEngine]:
    engine = LlamaEngine(model_file, 512, 1, 0, default_model.context_length, parallel=2)
    yield engine
    engine.close()


def run(engine: LlamaEngine, prompt: list[int]) -> list[Event]:
    """One request alone, stepped to its end (a bound: one token a step): its events."""
    events: list[Event] = []
    engine.admit(Generation(prompt, GREEDY), events.append, lambda: False)
    for _ in range(len(prompt) + GREEDY.max_tokens + 2):
        if events and isinstance(events[-1], Finished | Failed):
            break
        engine.step()
    return events


def text(events: list[Event]) -> str:
    return "".join(e.text for e in events if isinstance(e, TextDelta))


def test_each_tokens_text_is_sent_before_the_next_decode(
    engine: LlamaEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A streamed token reaches its request before the model decodes the next one (the
    engine holds it back only until then): at each decode, the request has been sent
    every answer token sampled so far."""
    events: list[Event] = []
    sent_at_decode: list[int] = []
    real = llama_cpp.llama_decode

    def counting(ctx: Any, batch: Any) -> int:
        sent_at_decode.append(sum(isinstance(e, TextDelta) for e in events))
        return int(real(ctx, batch))

    monkeypatch.setattr(llama_cpp, "llama_decode", counting)
    prompt = engine.chat_prompt(QUESTION)
    engine.admit(Generation(prompt, GREEDY), events.append, lambda: False)
    while not (events and isinstance(events[-1], Finished)):
        assert len(sent_at_decode) <= GREEDY.max_tokens + 1
        engine.step()
    done = events[-1]
    assert isinstance(done, Finished) and done.reason == "length"
    deltas = [e for e in events if isinstance(e, TextDelta)]
    assert len(deltas) == done.completion_tokens  # each token made text of its own
    # Decode 0 reads the prompt; decode k reads answer token k, sent before it.
    assert sent_at_decode == list(range(done.completion_tokens))


def test_a_failed_decode_fails_its_requests_and_leaves_no_trace(
    engine: LlamaEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """llama_decode failing mid-answer: the request in that step fails with what
    llama.cpp said, after the text it was already sent; the cache loses what the step
    added, so the same question then gets the same answer as before the failure."""
    prompt = engine.chat_prompt(QUESTION)
    before = run(engine, prompt)
    assert isinstance(before[-1], Finished) and text(before)

    calls = 0
    real = llama_cpp.llama_decode

    def failing(ctx: Any, batch: Any) -> int:
        nonlocal calls
        calls += 1
        return 1 if calls == 4 else int(real(ctx, batch))

    monkeypatch.setattr(llama_cpp, "llama_decode", failing)
    broken = run(engine, prompt.copy())
    monkeypatch.undo()
    assert isinstance(broken[-1], Failed), broken
    assert "llama_decode returned 1" in broken[-1].message
    # Decodes 1-3 (the prompt's rest, then two answer tokens) went through: the text of
    # the tokens they made came first, a beginning of the answer before the failure.
    assert text(before).startswith(text(broken)) and text(broken)
    assert engine.busy_slots() == 0 and engine.free_slots() == 2

    after = run(engine, prompt.copy())
    assert text(after) == text(before)
