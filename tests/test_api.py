"""The OpenAI API through the app (real model): answers, JSON output, every error."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest
from flask import Flask
from flask.testing import FlaskClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openapi_spec_validator import validate

from appliance.api.schemas import ChatCompletionRequest
from appliance.config import Settings

from helpers import MANIFEST_FIELDS

USER = [{"role": "user", "content": "Name a colour."}]


def chat(client: FlaskClient, model: str, **body: Any) -> Any:
    return client.post("/v1/chat/completions", json={"model": model, "messages": USER, **body})


def assert_error(resp: Any, status: int, param: str | None, *fragments: str) -> dict[str, Any]:
    assert resp.status_code == status, resp.data
    error = resp.get_json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param
    for fragment in fragments:
        assert fragment in error["message"]
    return dict(error)


def test_chat_answer_has_usage_and_request_id(client: FlaskClient, model_name: str) -> None:
    resp = chat(client, model_name, max_tokens=8, temperature=0)
    assert resp.status_code == 200
    body = resp.get_json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert body["choices"][0]["message"]["content"]
    usage = body["usage"]
    assert usage["completion_tokens"] <= 8
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert body["id"].endswith(resp.headers["X-Request-Id"])


def test_temperature_zero_and_seed_are_repeatable(client: FlaskClient, model_name: str) -> None:
    def text(**kw: Any) -> str:
        return str(
            chat(client, model_name, max_tokens=12, **kw).get_json()["choices"][0]["message"][
                "content"
            ]
        )

    assert text(temperature=0) == text(temperature=0)
    assert text(temperature=0.9, seed=7) == text(temperature=0.9, seed=7)


def test_stop_string_is_honoured(client: FlaskClient, model_name: str) -> None:
    full = chat(client, model_name, max_tokens=30, temperature=0).get_json()
    content = full["choices"][0]["message"]["content"]
    cut = content.split()[1]
    stopped = chat(client, model_name, max_tokens=30, temperature=0, stop=[cut]).get_json()
    assert stopped["choices"][0]["finish_reason"] == "stop"
    assert stopped["choices"][0]["message"]["content"] == content[: content.index(cut)]


def test_json_object_mode_parses(client: FlaskClient, model_name: str) -> None:
    ask = [
        {
            "role": "user",
            "content": "Give me a JSON object describing a cat with a name and an age.",
        }
    ]
    resp = client.post(
        "/v1/chat/completions",
        json={
            "model": model_name,
            "messages": ask,
            "max_tokens": 150,
            "temperature": 0,
            "response_format": {"type": "json_object"},
        },
    )
    choice = resp.get_json()["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert isinstance(json.loads(choice["message"]["content"]), dict)


def test_json_schema_output_validates(client: FlaskClient, model_name: str) -> None:
    schema = {
        "type": "object",
        "properties": {"colour": {"type": "string", "maxLength": 20}, "warm": {"type": "boolean"}},
        "required": ["colour", "warm"],
        "additionalProperties": False,
    }
    resp = chat(
        client,
        model_name,
        max_tokens=60,
        temperature=0,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "c", "schema": schema, "strict": True},
        },
    )
    assert resp.status_code == 200
    jsonschema.validate(json.loads(resp.get_json()["choices"][0]["message"]["content"]), schema)


def test_completion_with_text_and_token_prompts(client: FlaskClient, model_name: str) -> None:
    a = client.post(
        "/v1/completions",
        json={"model": model_name, "prompt": "The sky is", "max_tokens": 5, "temperature": 0},
    ).get_json()
    assert a["object"] == "text_completion" and a["usage"]["completion_tokens"] <= 5
    b = client.post(
        "/v1/completions",
        json={"model": model_name, "prompt": ["The sky is"], "max_tokens": 5, "temperature": 0},
    ).get_json()
    assert b["choices"][0]["text"] == a["choices"][0]["text"]


def test_models_list_has_manifest_fields(client: FlaskClient, model_name: str) -> None:
    body = client.get("/v1/models").get_json()
    card = next(m for m in body["data"] if m["id"] == model_name)
    for key in (*MANIFEST_FIELDS, "n_ctx"):
        assert key in card
    assert client.get(f"/v1/models/{model_name}").get_json()["id"] == model_name


def test_health_and_readiness(client: FlaskClient, model_name: str) -> None:
    assert client.get("/healthz").status_code == 200
    ready = client.get("/readyz")
    assert ready.status_code == 200
    states = {m["name"]: m["state"] for m in ready.get_json()["models"]}
    assert states[model_name] == "ready"


# -- errors ------------------------------------------------------------------------


def test_malformed_json(client: FlaskClient) -> None:
    resp = client.post("/v1/chat/completions", data='{"model": ', content_type="application/json")
    assert_error(resp, 400, None, "not valid JSON", "line 1")
    resp = client.post("/v1/chat/completions", data="[1]", content_type="application/json")
    assert_error(resp, 400, None, "must be a JSON object")
    resp = client.post("/v1/chat/completions", data=b"\xff\xfe", content_type="application/json")
    assert_error(resp, 400, None, "not UTF-8")


@pytest.mark.parametrize(
    ("change", "param", "fragment"),
    [
        ({"temperature": "hot"}, "temperature", "'hot'"),
        ({"temperature": 2.5}, "temperature", "2.5"),
        ({"top_p": 0}, "top_p", "greater than 0"),
        ({"max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
        ({"max_tokens": "10"}, "max_tokens", "'10'"),
        ({"stream": "yes"}, "stream", "'yes'"),
        ({"messages": []}, "messages", "at least 1"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role", "wizard"),
        ({"messages": [{"role": "user"}]}, "messages.0.content", "missing"),
        ({"presence_penalty": 3}, "presence_penalty", "less than or equal to 2"),
        ({"seed": 1.5}, "seed", "1.5"),
        ({"frobnicate": 1}, "frobnicate", "unrecognized"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
        ({"response_format": {"type": "xml"}}, "response_format.type", "xml"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema", "schema"),
    ],
)
def test_invalid_parameters_are_named(
    client: FlaskClient, model_name: str, change: dict[str, Any], param: str, fragment: str
) -> None:
    body = {"model": model_name, "messages": USER, **change}
    assert_error(client.post("/v1/chat/completions", json=body), 400, param, fragment)


def test_missing_model_parameter(client: FlaskClient) -> None:
    resp = client.post("/v1/chat/completions", json={"messages": USER})
    assert_error(resp, 400, "model", "missing required parameter")


def test_unknown_model_is_404(client: FlaskClient, model_name: str) -> None:
    error = assert_error(chat(client, "no-such-model"), 404, "model", "no-such-model", model_name)
    assert error["code"] == "model_not_found"


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"n": 2}, "n"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"logit_bias": {"1": 5}}, "logit_bias"),
        ({"function_call": "auto"}, "function_call"),
    ],
)
def test_unsupported_features_say_so(
    client: FlaskClient, model_name: str, change: dict[str, Any], param: str
) -> None:
    error = assert_error(chat(client, model_name, **change), 400, param, "not supported")
    assert error["code"] == "unsupported_parameter"


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"echo": True}, "echo"),
        ({"best_of": 3}, "best_of"),
        ({"suffix": "x"}, "suffix"),
        ({"prompt": ["a", "b"]}, "prompt"),
    ],
)
def test_unsupported_completion_features(
    client: FlaskClient, model_name: str, change: dict[str, Any], param: str
) -> None:
    body = {"model": model_name, "prompt": "hi", **change}
    assert_error(client.post("/v1/completions", json=body), 400, param)


def test_prompt_plus_max_tokens_over_context(
    client: FlaskClient, model_name: str, shared_settings: Settings
) -> None:
    n_ctx = client.get(f"/v1/models/{model_name}").get_json()["n_ctx"]
    words = [{"role": "user", "content": "word " * (n_ctx - shared_settings.max_tokens // 2)}]
    sized = client.post(
        "/v1/completions",
        json={"model": model_name, "max_tokens": 1, "prompt": words[0]["content"]},
    ).get_json()
    prompt_tokens = sized["usage"]["prompt_tokens"]
    max_tokens = n_ctx - prompt_tokens + 1
    assert 1 <= max_tokens <= shared_settings.max_tokens
    resp = client.post(
        "/v1/completions",
        json={"model": model_name, "max_tokens": max_tokens, "prompt": words[0]["content"]},
    )
    error = assert_error(
        resp,
        400,
        "prompt",
        f"the prompt has {prompt_tokens} tokens",
        f"max_tokens is {max_tokens}",
        f"{n_ctx} tokens",
    )
    assert error["code"] == "context_length_exceeded"


def test_prompt_alone_over_context(client: FlaskClient, model_name: str) -> None:
    long = [{"role": "user", "content": "word " * 6000}]
    resp = client.post("/v1/chat/completions", json={"model": model_name, "messages": long})
    error = assert_error(resp, 400, "messages", "context window")
    assert error["code"] == "context_length_exceeded"


def test_max_tokens_over_the_setting(
    client: FlaskClient, model_name: str, shared_settings: Settings
) -> None:
    too_many = shared_settings.max_tokens + 1
    assert_error(
        chat(client, model_name, max_tokens=too_many),
        400,
        "max_tokens",
        str(too_many),
        str(shared_settings.max_tokens),
    )


def test_body_over_limit_is_413(client: FlaskClient, shared_settings: Settings) -> None:
    size = shared_settings.max_body_bytes + 10
    resp = client.post("/v1/chat/completions", data=b" " * size, content_type="application/json")
    assert_error(resp, 413, None, str(size), str(shared_settings.max_body_bytes))


def test_unknown_route_and_method_in_openai_shape(client: FlaskClient) -> None:
    assert_error(client.get("/v1/nothing"), 404, None, "/v1/nothing")
    assert_error(client.get("/v1/chat/completions"), 405, None, "GET")


def test_token_prompt_out_of_vocabulary(client: FlaskClient, model_name: str) -> None:
    resp = client.post("/v1/completions", json={"model": model_name, "prompt": [1, 10**9]})
    assert_error(resp, 400, "prompt", "1000000000")


def test_empty_prompt(client: FlaskClient, model_name: str) -> None:
    resp = client.post("/v1/completions", json={"model": model_name, "prompt": ""})
    assert_error(resp, 400, "prompt", "empty")


JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)
FIELDS = sorted(ChatCompletionRequest.model_fields)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(extra=st.dictionaries(st.sampled_from(FIELDS), JSONISH, max_size=4))
def test_no_client_mistake_is_a_500(
    client: FlaskClient, model_name: str, extra: dict[str, Any]
) -> None:
    body = {"model": model_name, "messages": USER, "max_tokens": 2, **extra}
    if body.get("stream") is True:
        body["stream"] = False
    resp = client.post("/v1/chat/completions", json=body)
    assert resp.status_code in (200, 400, 404, 503), resp.data
    if resp.status_code != 200:
        assert set(resp.get_json()["error"]) == {"message", "type", "param", "code"}


def test_openapi_document_is_valid_and_generated(client: FlaskClient, app: Flask) -> None:
    doc = client.get("/openapi.json").get_json()
    validate(doc)
    schema = doc["components"]["schemas"]["ChatCompletionRequest"]
    assert set(schema["properties"]) == {
        (f.alias or name) for name, f in ChatCompletionRequest.model_fields.items()
    }
    assert "/v1/chat/completions" in doc["paths"] and "/v1/models" in doc["paths"]


def test_stop_strings_are_bounded(client: FlaskClient, model_name: str) -> None:
    """Each stop string is matched after every token: one past 256 characters is a 400
    naming which one, the limit and its length."""
    long_one = chat(client, model_name, max_tokens=2, stop=["ok", "x" * 257])
    assert long_one.status_code == 400
    error = long_one.get_json()["error"]
    assert error["param"] == "stop[1]" and "257 characters" in error["message"]
    assert "at most 256" in error["message"]
    single = chat(client, model_name, max_tokens=2, stop="y" * 300)
    assert single.status_code == 400 and single.get_json()["error"]["param"] == "stop"
    assert chat(client, model_name, max_tokens=2, stop=["z" * 256]).status_code == 200


def test_tokenize_round_trips_and_counts_a_chat_as_usage_does(
    client: FlaskClient, model_name: str
) -> None:
    text = "Give 30 ml/kg of crystalloid — in the first three hours."
    tokens = client.post("/tokenize", json={"model": model_name, "content": text}).get_json()
    assert tokens["count"] == len(tokens["tokens"]) > 5
    back = client.post("/detokenize", json={"model": model_name, "tokens": tokens["tokens"]})
    assert back.get_json()["content"].strip() == text
    pieces = client.post("/tokenize", json={"content": text, "with_pieces": True}).get_json()
    assert pieces["model"] == model_name  # the default model when none is named
    assert "".join(t["piece"] for t in pieces["tokens"]).strip() == text
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}]
    counted = client.post("/tokenize", json={"model": model_name, "messages": messages})
    answer = chat(client, model_name, messages=messages, max_tokens=2).get_json()
    assert counted.get_json()["count"] == answer["usage"]["prompt_tokens"]


def test_tokenize_refusals_name_the_problem(client: FlaskClient, model_name: str) -> None:
    assert_error(client.post("/tokenize", json={"model": model_name}), 400, "content", "content")
    bad = client.post("/detokenize", json={"model": model_name, "tokens": [1, 10**7]})
    assert_error(bad, 400, "tokens", "tokens[1] is 10000000", "token ids run from 0 to")
    unknown = client.post("/tokenize", json={"model": "no-such", "content": "a"})
    assert unknown.status_code == 404
