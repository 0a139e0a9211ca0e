"""Log-probabilities on the real server (the default GGUF through llama.cpp), as the
`openai` SDK reads them: OpenAI's chat and completions shapes, the same numbers alone
and in a batch, streamed and whole, and clear refusals of what is out of range."""

from __future__ import annotations

import json
import math
import threading
from typing import Any

import pytest
from openai import OpenAI

from helpers import Server

pytestmark = pytest.mark.server
QUESTION = [{"role": "user", "content": "Name three colours of a traffic light."}]


def sdk(server: Server) -> OpenAI:
    return OpenAI(base_url=f"{server.url}/v1", api_key=server.token, max_retries=0, timeout=120)


def chat_logprobs(server: Server, model: str, messages: list[dict[str, str]]) -> Any:
    return sdk(server).chat.completions.create(
        model=model,
        messages=messages,  # type: ignore[arg-type]
        max_tokens=12,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )


def test_chat_logprobs_describe_the_answer(shared_server: Server, model_name: str) -> None:
    answer = chat_logprobs(shared_server, model_name, QUESTION)
    choice = answer.choices[0]
    content = choice.logprobs.content
    assert content, "no token log-probabilities came back"
    assert len(content) == answer.usage.completion_tokens
    assert "".join(t.token for t in content) == choice.message.content
    for t in content:
        assert t.bytes == list(t.token.encode())
        assert t.logprob <= 0.0
        tops = [x.logprob for x in t.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True)
        assert sum(math.exp(x) for x in tops) <= 1.0 + 1e-6
        # Greedy: the answer's token is the likeliest one, with that same number.
        assert t.top_logprobs[0].token == t.token
        assert t.top_logprobs[0].logprob == pytest.approx(t.logprob, abs=1e-6)


def test_logprobs_are_the_same_alone_and_batched(shared_server: Server, model_name: str) -> None:
    other = [{"role": "user", "content": "Write one line about pumps."}]
    alone = chat_logprobs(shared_server, model_name, QUESTION)
    results: dict[int, Any] = {}

    def ask(i: int, messages: list[dict[str, str]]) -> None:
        results[i] = chat_logprobs(shared_server, model_name, messages)

    threads = [threading.Thread(target=ask, args=(i, m)) for i, m in enumerate([QUESTION, other])]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    batched = results[0].choices[0].logprobs.content
    single = alone.choices[0].logprobs.content
    assert [t.token for t in batched] == [t.token for t in single]
    for a, b in zip(batched, single, strict=True):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
    assert results[1].choices[0].logprobs.content[0].token != ""


def test_streamed_chat_logprobs_match_the_whole_answer(
    shared_server: Server, model_name: str
) -> None:
    whole = chat_logprobs(shared_server, model_name, QUESTION).choices[0].logprobs.content
    stream = sdk(shared_server).chat.completions.create(
        model=model_name,
        messages=QUESTION,  # type: ignore[arg-type]
        max_tokens=12,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
        stream=True,
    )
    streamed = [
        t
        for chunk in stream
        for choice in chunk.choices
        if choice.logprobs is not None
        for t in choice.logprobs.content or []
    ]
    assert [(t.token, round(t.logprob, 4)) for t in streamed] == [
        (t.token, round(t.logprob, 4)) for t in whole
    ]


def test_completion_logprobs_in_the_legacy_shape(shared_server: Server, model_name: str) -> None:
    answer = sdk(shared_server).completions.create(
        model=model_name, prompt="The capital of France is", max_tokens=6, temperature=0, logprobs=2
    )
    choice = answer.choices[0]
    lp = choice.logprobs
    assert "".join(lp.tokens) == choice.text
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert 1 <= len(top) <= 2
        assert max(top.values()) == pytest.approx(logprob, abs=1e-6)  # greedy
        assert top[token] == pytest.approx(logprob, abs=1e-6)


def test_no_logprobs_unless_asked(shared_server: Server, model_name: str) -> None:
    body = {"model": model_name, "messages": QUESTION, "max_tokens": 4}
    answer = shared_server.http.post("/v1/chat/completions", json=body).json()
    assert answer["choices"][0]["logprobs"] is None


@pytest.mark.parametrize(
    ("path", "extra", "param", "words"),
    [
        ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs", "needs logprobs"),
        ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs", "20"),
        ("/v1/completions", {"logprobs": 6}, "logprobs", "5"),
    ],
)
def test_logprobs_out_of_range_are_refused(
    shared_server: Server,
    model_name: str,
    path: str,
    extra: dict[str, Any],
    param: str,
    words: str,
) -> None:
    body: dict[str, Any] = {"model": model_name, "max_tokens": 4, **extra}
    if "chat" in path:
        body["messages"] = QUESTION
    else:
        body["prompt"] = "hello"
    resp = shared_server.http.post(path, json=body)
    assert resp.status_code == 400, resp.text
    error = json.loads(resp.text)["error"]
    assert error["param"] == param
    assert words in error["message"]
