"""HTTP/1.1 keep-alive through the server's worker, which serves a connection's next
request in the thread that answered the last one when it comes at once (server.py's
LingeringWorker): pipelined requests are answered in order, a thread that lingers
never keeps another connection waiting, and every answer keeps its audit pair."""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path

from helpers import ServerFactory, audit_pairs, wait_for

INFER = "/v2/models/line-anomaly/infer"


def request(port: int, token: str, body: dict[str, object]) -> bytes:
    payload = json.dumps(body).encode()
    head = (
        f"POST {INFER} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    )
    return head.encode() + payload


def reading(request_id: str) -> dict[str, object]:
    data = [2.0, 50.0, 55.0, 12.0]
    return {
        "id": request_id,
        "inputs": [{"name": "readings", "shape": [1, 4], "datatype": "FP32", "data": data}],
    }


def read_answers(sock: socket.socket, count: int) -> list[dict[str, object]]:
    """`count` whole answers (status 200 checked), in the order they came, each with
    its X-Request-Id header under "x-request-id"."""
    answers, buffer = [], b""
    while len(answers) < count:
        while (end := buffer.find(b"\r\n\r\n")) < 0:
            chunk = sock.recv(65536)
            assert chunk, "the server closed the connection"
            buffer += chunk
        head = buffer[:end].decode("latin-1").split("\r\n")
        assert head[0].split(" ")[1] == "200", head
        length = next(int(h.split(":")[1]) for h in head if h.lower().startswith("content-length"))
        while len(buffer) < end + 4 + length:
            buffer += sock.recv(65536)
        answer = json.loads(buffer[end + 4 : end + 4 + length])
        # The audit's id for it, beside the body (the v2 body's own "id" is the client's).
        answer["x-request-id"] = next(
            h.split(":", 1)[1].strip() for h in head if h.lower().startswith("x-request-id:")
        )
        answers.append(answer)
        buffer = buffer[end + 4 + length :]
    return answers


def test_pipelined_and_back_to_back_requests_are_answered_in_order(
    state_dir: Path, server_factory: ServerFactory
) -> None:
    server = server_factory(state_dir, "--http-threads", "2", "--rate-limit-per-minute", "0")
    answered: list[str] = []
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        # Three requests in one write: the second and third are read ahead.
        sock.sendall(
            b"".join(request(server.port, server.token, reading(f"p{i}")) for i in range(3))
        )
        pipelined = read_answers(sock, 3)
        assert [a["id"] for a in pipelined] == ["p0", "p1", "p2"]
        answered += [str(a["x-request-id"]) for a in pipelined]
        # Then one at a time, each sent as soon as the last answer is in.
        for i in range(20):
            sock.sendall(request(server.port, server.token, reading(f"b{i}")))
            [answer] = read_answers(sock, 1)
            assert answer["id"] == f"b{i}"
            answered.append(str(answer["x-request-id"]))
    server.stop()
    # Each of the 23 answers has its own request and outcome records, the client's id
    # in the request's content: no answer shares or lacks its pair.
    pairs = audit_pairs(state_dir, answered)
    assert [pairs[rid][0]["content"]["input"]["id"] for rid in answered] == [
        *(f"p{i}" for i in range(3)),
        *(f"b{i}" for i in range(20)),
    ]


def test_a_lingering_thread_keeps_no_other_connection_waiting(
    state_dir: Path, server_factory: ServerFactory
) -> None:
    """One thread, and a connection sending back to back. A thread lingers only while
    another one is idle: with none idle it hands its connection back to the poller
    after each answer, so another connection is answered within a few of the busy
    one's answers, not after LingeringWorker.LINGER_REQUESTS of them."""
    server = server_factory(state_dir, "--http-threads", "1", "--rate-limit-per-minute", "0")
    stop = threading.Event()
    busy_answers = 0

    def busy() -> None:
        nonlocal busy_answers
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
            while not stop.is_set():
                sock.sendall(request(server.port, server.token, reading("busy")))
                read_answers(sock, 1)
                busy_answers += 1

    thread = threading.Thread(target=busy)
    thread.start()
    try:
        assert wait_for(lambda: busy_answers > 10, 30)
        for i in range(5):  # new connections, one after another
            with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
                before = busy_answers
                sock.sendall(request(server.port, server.token, reading(f"other{i}")))
                assert read_answers(sock, 1)[0]["id"] == f"other{i}"
                assert busy_answers - before < 20
    finally:
        stop.set()
        thread.join(30)
