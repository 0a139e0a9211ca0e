"""The conversation key: what a balancer hashes on to keep a conversation on the box
whose KV cache holds its beginning (HAProxy: ``balance hdr(X-Conversation-Id)`` with
``hash-type consistent``).

A client may send ``X-Conversation-Id`` (at most 128 characters of ``A-Z a-z 0-9 . _ : @
-``); every text answer carries one back. Without one, the key is derived from what every
later turn of the same conversation begins with: the model and the messages up to and
including the first user message (chat), or the first 256 characters of the prompt
(completions). A client that sends the key it got on its first turn with every later
turn lands on the same box from the first follow-up on.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from flask import Blueprint, Response, request

from appliance import context
from appliance.api.errors import ApiError

HEADER = "X-Conversation-Id"
MAX_LENGTH = 128
PROMPT_PREFIX_CHARS = 256
_VALID = re.compile(r"[A-Za-z0-9._:@-]+")
_TEXT_ROUTES = frozenset({"openai.chat_completions", "openai.completions"})


def derived_key(body: dict[str, Any]) -> str | None:
    """The key of a chat or completion request's conversation, from its beginning; None
    when the body has nothing to derive it from."""
    head: Any
    messages = body.get("messages")
    if isinstance(messages, list) and messages:
        first_user = next(
            (i for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "user"),
            len(messages) - 1,
        )
        head = messages[: first_user + 1]
    elif isinstance(body.get("prompt"), str):
        head = body["prompt"][:PROMPT_PREFIX_CHARS]
    elif isinstance(body.get("prompt"), list) and body["prompt"]:
        first = body["prompt"][0]
        head = first[:PROMPT_PREFIX_CHARS] if isinstance(first, str | list) else body["prompt"][:64]
    else:
        return None
    canonical = json.dumps(
        {"model": body.get("model"), "head": head}, sort_keys=True, separators=(",", ":")
    )
    return "c-" + hashlib.sha256(canonical.encode()).hexdigest()[:24]


def given_key() -> str | None:
    """The client's own key, checked; a malformed one is the client's mistake (400)."""
    value = request.headers.get(HEADER)
    if value is None:
        return None
    if len(value) > MAX_LENGTH or not _VALID.fullmatch(value):
        raise ApiError(
            400,
            f"{HEADER} must be 1 to {MAX_LENGTH} characters of A-Z a-z 0-9 . _ : @ - "
            f"(got {len(value)} characters: {value[:40]!r})",
            param=HEADER,
            code="invalid_header",
        )
    return value


def init_app(bp: Blueprint) -> None:
    @bp.before_request
    def _key() -> None:
        if request.endpoint not in _TEXT_ROUTES:
            return
        key = given_key()
        if key is None:
            try:  # the route reads the body again (cached) and says what is wrong with it
                body = json.loads(request.get_data(cache=True) or b"null")
            except Exception:  # not JSON, or over the limit: the route itself answers that
                body = None
            key = derived_key(body) if isinstance(body, dict) else None
        if key is not None:
            context.current().notes["conversation"] = key

    @bp.after_request
    def _answer(resp: Response) -> Response:
        key = context.current().notes.get("conversation")
        if key is not None and request.endpoint in _TEXT_ROUTES:
            resp.headers[HEADER] = key
        return resp
