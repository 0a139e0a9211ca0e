"""The standing attack campaign's parts (issue #14), shared by the tests (short) and
bench/ (long): kill -9 under mixed load, then check the audit log."""

from __future__ import annotations

import json
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from helpers import Server, audit_rows, run_cli, start_server

READINGS = [[2.0, 50.0, 55.0, 12.0], [6.0, 70.0, 55.0, 12.0]]


@dataclass
class Cycle:
    answered: list[str] = field(default_factory=list)  # request ids a client got in full
    errors: int = 0  # requests cut by the kill (or refused): expected, not counted against


def _one(client: httpx.Client, server: Server, model: str, rng: random.Random) -> str | None:
    """One request of a mixed load; its request id if the client got the whole answer."""
    kind = rng.choice(("chat", "stream", "tensor", "models", "anonymous"))
    headers = {} if kind == "anonymous" else server.auth
    chat = {
        "model": model,
        "max_tokens": rng.randint(1, 12),
        "temperature": 0,
        "messages": [{"role": "user", "content": f"Count to {rng.randint(2, 9)}."}],
    }
    if kind == "stream":
        with client.stream(
            "POST", "/v1/chat/completions", headers=headers, json={**chat, "stream": True}
        ) as resp:
            text = "".join(resp.iter_text())
            complete = resp.status_code == 200 and "data: [DONE]" in text
            return resp.headers.get("X-Request-Id") if complete else None
    if kind == "tensor":
        body = {
            "inputs": [
                {
                    "name": "readings",
                    "shape": [2, 4],
                    "datatype": "FP32",
                    "data": [v for row in READINGS for v in row],
                }
            ]
        }
        resp = client.post("/v2/models/line-anomaly/infer", headers=headers, json=body)
    elif kind == "models":
        resp = client.get("/v1/models", headers=headers)
    else:
        resp = client.post("/v1/chat/completions", headers=headers, json=chat)
    resp.read()
    ok = resp.status_code in (200, 401)  # a refusal is an answer, and has its record too
    return resp.headers.get("X-Request-Id") if ok else None


def load_until_killed(
    server: Server, model: str, rng: random.Random, clients: int, kill_after: float
) -> Cycle:
    """`clients` threads send mixed requests; after `kill_after` s the server is killed
    (SIGKILL, its whole process group); the threads stop at their next failure."""
    cycle = Cycle()
    lock = threading.Lock()

    def client_loop(seed: int) -> None:
        own = random.Random(seed)
        with httpx.Client(base_url=server.url, timeout=30) as client:
            for _ in range(10_000):  # bounded; ends at the kill
                try:
                    rid = _one(client, server, model, own)
                except (httpx.HTTPError, OSError):
                    with lock:
                        cycle.errors += 1
                    return
                if rid:
                    with lock:
                        cycle.answered.append(rid)

    threads = [
        threading.Thread(target=client_loop, args=(rng.randrange(1 << 30),)) for _ in range(clients)
    ]
    for t in threads:
        t.start()
    time.sleep(kill_after)
    server.kill()
    for t in threads:
        t.join(60)
    return cycle


def check_log(state: Path, answered: list[str]) -> dict[str, Any]:
    """After a crash: the log verifies (requests cut off show as incomplete, not as
    tampering), and every request a client got an answer to has its record."""
    verified = run_cli("audit", "verify", "--json", state=state)
    report: dict[str, Any] = json.loads(verified.stdout)
    try:
        ids = {row["request_id"] for row in audit_rows(state)}
    except AssertionError as failed:  # the export failed: said, for bench/crashloop.py too
        return {"ok": False, "report": report, "missing": answered, "export": str(failed)}
    missing = [rid for rid in answered if rid not in ids]
    return {"ok": report["ok"] and not missing, "report": report, "missing": missing}


def crash_loop(state: Path, model: str, cycles: int, seed: int = 7) -> list[dict[str, Any]]:
    """`cycles` times: start the server, load it, kill -9 at a random moment, check."""
    rng = random.Random(seed)
    results = []
    for n in range(cycles):
        server = start_server(state)
        cycle = load_until_killed(server, model, rng, clients=3, kill_after=rng.uniform(0.3, 2))
        checked = check_log(state, cycle.answered)
        checked.update(cycle=n, answered=len(cycle.answered), cut=cycle.errors)
        results.append(checked)
        if not checked["ok"]:
            break
    return results


# -- fuzzing from /openapi.json ---------------------------------------------------------


def from_schema(schema: dict[str, Any], components: dict[str, Any]) -> Any:
    """A hypothesis strategy for values of a JSON schema (the subset pydantic writes:
    $ref, anyOf, enum, const, object, array, string, integer, number, boolean, null),
    now and then off the schema: any JSON value instead, a required field dropped, an
    unknown one added. The server must answer all of it without a 5xx."""
    from hypothesis import strategies as st

    anything = st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
        lambda inner: (
            st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
        ),
        max_leaves=8,
    )

    def build(node: dict[str, Any], depth: int) -> Any:
        if "$ref" in node:
            return build(components[node["$ref"].rsplit("/", 1)[-1]], depth + 1)
        if depth > 6:
            return anything
        if "anyOf" in node:
            return st.one_of([build(option, depth + 1) for option in node["anyOf"]])
        if "enum" in node:
            return st.sampled_from(node["enum"])
        if "const" in node:
            return st.just(node["const"])
        kind = node.get("type")
        if kind == "object" or "properties" in node:
            props = node.get("properties", {})
            required = [k for k in node.get("required", []) if k in props]
            optional = [k for k in props if k not in required]
            fixed = {k: build(props[k], depth + 1) for k in required}
            extra = {k: build(props[k], depth + 1) for k in optional}
            return st.fixed_dictionaries(fixed, optional=extra)
        if kind == "array":
            items = node.get("items", {})
            return st.lists(build(items, depth + 1) if items else anything, max_size=5)
        if kind == "string":
            return st.text(max_size=min(node.get("maxLength", 60), 300))
        if kind == "integer":
            low, high = node.get("minimum", -(2**40)), node.get("maximum", 2**40)
            return st.integers(min_value=low, max_value=high) | st.integers()
        if kind == "number":
            return st.floats(allow_nan=False) | st.floats()
        if kind == "boolean":
            return st.booleans()
        if kind == "null":
            return st.none()
        return anything

    valid = build(schema, 0)
    broken = valid.flatmap(
        lambda v: st.one_of(
            st.just(v),
            anything,
            st.just({k: x for k, x in v.items() if k != next(iter(v), None)})
            if isinstance(v, dict)
            else st.just(v),
            st.just({**v, "surprise": 1}) if isinstance(v, dict) else st.just(v),
        )
    )
    return st.one_of(valid, valid, broken)
