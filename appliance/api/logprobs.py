"""Answer tokens with their log-probabilities, in OpenAI's two shapes: chat's
``logprobs.content`` list and the legacy completions' parallel lists."""

from __future__ import annotations

from collections.abc import Sequence

from appliance.api.schemas import (
    ChoiceLogprobs,
    CompletionLogprobs,
    TokenLogprob,
    TopLogprob,
)
from appliance.engines import base


def token_text(piece: bytes) -> str:
    """A token's text; a piece that splits a UTF-8 character shows its bytes escaped
    (its ``bytes`` field has them exactly)."""
    return piece.decode("utf-8", errors="backslashreplace")


def chat(tokens: Sequence[base.TokenLogprob]) -> ChoiceLogprobs:
    return ChoiceLogprobs(
        content=[
            TokenLogprob(
                token=token_text(t.token),
                logprob=t.logprob,
                bytes=list(t.token),
                top_logprobs=[
                    TopLogprob(token=token_text(piece), logprob=lp, bytes=list(piece))
                    for piece, lp in t.top
                ],
            )
            for t in tokens
        ]
    )


def completion(
    tokens: Sequence[base.TokenLogprob], top: int, offset: int = 0
) -> CompletionLogprobs:
    """``offset``: where in the answer's text the first token starts (a stream's later
    chunks go on from the earlier ones)."""
    texts = [token_text(t.token) for t in tokens]
    # Characters of the answer before each token: a token that splits a UTF-8
    # character adds nothing until the token that completes it.
    offsets, so_far = [], b""
    for t in tokens:
        offsets.append(offset + len(so_far.decode("utf-8", errors="ignore")))
        so_far += t.token
    return CompletionLogprobs(
        tokens=texts,
        token_logprobs=[t.logprob for t in tokens],
        # A token text may appear twice among the top: the likelier is kept.
        top_logprobs=[{token_text(piece): lp for piece, lp in reversed(t.top)} for t in tokens]
        if top > 0
        else None,
        text_offset=offsets,
    )
