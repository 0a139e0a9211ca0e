"""A streamed text chunk made from its template is the very chunk the full serializer
makes, whatever the text: quotes, escapes, control characters, any script, a lone
surrogate; and a template whose mark is ambiguous is refused rather than misused."""

from __future__ import annotations

from typing import Any

import pytest

from appliance.api.streams import _MARK_TEXT, sse, text_chunks

TEXTS = [
    "",
    "plain words",
    ' quote " backslash \\ slash / ',
    "line\nbreak\ttab\rreturn\x0bvt",
    "\x00\x01\x1f\x7f controls",
    "é ü ß 中文 한국어 😀 👩‍⚕️",
    "\u2028\u2029 separators",
    "\ud800 a lone surrogate",
    "data: [DONE]\n\n",
]


def chat(text: str, usage: bool) -> dict[str, Any]:
    choice = {"index": 0, "delta": {"content": text}, "finish_reason": None, "logprobs": None}
    chunk = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    return {**chunk, "choices": [choice], **({"usage": None} if usage else {})}


def completion(text: str, usage: bool) -> dict[str, Any]:
    choice = {"index": 0, "text": text, "finish_reason": None, "logprobs": None}
    chunk = {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m"}
    return {**chunk, "choices": [choice], **({"usage": None} if usage else {})}


@pytest.mark.parametrize("shape", [chat, completion])
@pytest.mark.parametrize("usage", [False, True])
def test_a_templated_chunk_is_the_serialized_chunk(shape: Any, usage: bool) -> None:
    make = text_chunks(shape(_MARK_TEXT, usage))
    assert make is not None
    for text in TEXTS:
        assert make(text) == sse(shape(text, usage)), text


def test_a_template_with_the_mark_twice_is_refused() -> None:
    twice = {**chat(_MARK_TEXT, False), "model": _MARK_TEXT}
    assert text_chunks(twice) is None
    assert text_chunks(chat("no mark", False)) is None
