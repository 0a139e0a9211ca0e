"""The appliance's side of the balancer contract, in seconds: the answers given while the
models load (a real listening socket, no model), and the conversation key."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import httpx
import pytest

from appliance.api.conversation import derived_key
from appliance.loading import LoadingResponder, request_path


@pytest.fixture
def loading() -> Iterator[tuple[LoadingResponder, str]]:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    responder = LoadingResponder([listener], None)
    responder.start()
    yield responder, f"http://127.0.0.1:{listener.getsockname()[1]}"
    responder.stop()
    listener.close()


def test_while_loading_probes_see_alive_but_not_ready(
    loading: tuple[LoadingResponder, str],
) -> None:
    _, url = loading
    for path in ("/livez", "/healthz", "/v2/health/live"):
        resp = httpx.get(url + path, timeout=5)
        assert resp.status_code == 200, path
        assert resp.json()["loading"] is True
    ready = httpx.get(url + "/readyz", timeout=5)
    assert ready.status_code == 503
    assert ready.json()["ready"] is False and ready.json()["loading"] is True
    assert "loading the models" in ready.json()["reasons"][0]
    oip = httpx.get(url + "/v2/health/ready", timeout=5)
    assert oip.status_code == 503 and oip.json()["error"].startswith("not ready: loading")


def test_while_loading_work_is_refused_in_each_protocols_shape(
    loading: tuple[LoadingResponder, str],
) -> None:
    responder, url = loading
    chat = httpx.post(url + "/v1/chat/completions?x=1", json={"model": "m"}, timeout=5)
    assert chat.status_code == 503
    assert chat.headers["Retry-After"] == "5"
    assert chat.headers["Connection"] == "close"
    assert chat.json()["error"]["code"] == "loading"
    assert "loading its models" in chat.json()["error"]["message"]
    infer = httpx.post(url + "/v2/models/press/infer", json={}, timeout=5)
    assert infer.status_code == 503 and "loading its models" in infer.json()["error"]
    # The count moves after the last byte is sent, so a client can read its answer
    # before it does: stop() joins the thread, which finishes the answer in hand.
    responder.stop()
    assert responder.answered == 2


def test_after_stop_the_socket_is_left_to_the_app(
    loading: tuple[LoadingResponder, str],
) -> None:
    responder, url = loading
    assert httpx.get(url + "/livez", timeout=5).status_code == 200
    responder.stop()
    # The connection waits in the backlog for the app, unanswered by the responder.
    with pytest.raises(httpx.ReadTimeout):
        httpx.get(url + "/livez", timeout=0.5)
    assert responder.answered == 1


def test_a_request_line_is_read_strictly() -> None:
    assert request_path(b"GET /readyz?verbose=1 HTTP/1.1\r\nHost: x\r\n\r\n") == "/readyz"
    assert request_path(b"\x16\x03\x01 garbage") is None  # TLS sent to plain HTTP
    assert request_path(b"GET /readyz\r\n\r\n") is None


def test_the_key_is_the_same_for_every_turn_of_a_conversation() -> None:
    first = [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": "What is a torque wrench?"},
    ]
    follow_up = [
        *first,
        {"role": "assistant", "content": "A wrench that sets a torque."},
        {"role": "user", "content": "And its accuracy?"},
    ]
    other = [first[0], {"role": "user", "content": "What is a caliper?"}]
    key = derived_key({"model": "m", "messages": first})
    assert key is not None and key.startswith("c-")
    assert derived_key({"model": "m", "messages": follow_up}) == key
    assert derived_key({"model": "m", "messages": other}) != key
    assert derived_key({"model": "n", "messages": first}) != key  # another model's cache


def test_the_key_of_a_completion_is_its_prompts_beginning() -> None:
    base = "x" * 300
    key = derived_key({"model": "m", "prompt": base})
    assert derived_key({"model": "m", "prompt": base + " and more"}) == key
    assert derived_key({"model": "m", "prompt": "y" + base}) != key
    assert derived_key({"model": "m", "prompt": [base]}) == derived_key(
        {"model": "m", "prompt": [base + "!"]}
    )
    assert derived_key({"model": "m"}) is None
    assert derived_key({"model": "m", "messages": []}) is None
