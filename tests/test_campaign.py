"""The standing campaign, short (issue #14): kill -9 under mixed load, fuzzing every
route from /openapi.json, and no network use but loopback. bench/crashloop.py and
bench/soak.py run the long forms."""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from campaign import crash_loop, from_schema
from helpers import MINILM, REPO, ServerFactory, add_garden, audit_rows, make_state, run_cli

# Twenty kill -9 cycles, 5,000 fuzzed requests: ~100 s each on a 2-core Xeon.
pytestmark = [pytest.mark.server, pytest.mark.timeout(900)]


def test_kill_9_under_load_loses_no_answered_request(
    tmp_path: Path, model_file: Path, model_name: str
) -> None:
    """20 times: the server under mixed load (chat, streams, tensors, listings,
    refusals) is killed at a random moment; after each, `audit verify` passes and every
    request a client saw answered has its record."""
    state = make_state(tmp_path / "state", model_file)
    results = crash_loop(state, model_name, cycles=20)
    assert len(results) == 20 and all(r["ok"] for r in results), results[-1]
    assert sum(r["answered"] for r in results) >= 40  # there was load to lose
    assert any(r["report"]["incomplete"] for r in results)  # and kills mid-request


# Cases per operation of /openapi.json: 5,000 in all.
FUZZ_CASES = {
    ("post", "/v1/chat/completions"): 1400,
    ("post", "/v1/completions"): 1200,
    ("post", "/v1/embeddings"): 300,
    ("get", "/v1/models/{name}"): 500,
    ("get", "/v1/models"): 50,
    ("post", "/v1/retrieve"): 300,
    ("get", "/v1/collections"): 20,
    ("post", "/tokenize"): 400,
    ("post", "/detokenize"): 300,
    ("post", "/v2/models/{name}/infer"): 300,
    ("get", "/v2/models/{name}"): 100,
    ("get", "/v2/models/{name}/ready"): 50,
    ("get", "/v2"): 10,
    ("get", "/v2/health/live"): 10,
    ("get", "/v2/health/ready"): 10,
    ("get", "/healthz"): 20,
    ("get", "/readyz"): 20,
    ("get", "/livez"): 20,
    ("get", "/metrics"): 10,
    ("get", "/openapi.json"): 10,
    ("get", "/api"): 10,
    ("get", "/audit/verify"): 10,
    ("get", "/admin/tokens"): 10,
    ("get", "/admin/users"): 10,
}
# Not fuzzed, each for its reason: what changes who may sign in or call (tokens, users,
# sessions: covered by test_auth.py and test_admin_api), whether the box takes work (the
# drain: test_fleet_contract.py), the pages a browser renders
# (test_browser.py), the versioned /v2 spellings (the same views as the plain ones),
# and the export (a stream of the whole log: test_audit_server.py).
NOT_FUZZED = {
    ("post", "/admin/tokens"),
    ("delete", "/admin/tokens/{token_id}"),
    ("post", "/admin/users"),
    ("post", "/admin/users/{name}/disable"),
    ("post", "/admin/users/{name}/password"),
    ("post", "/admin/drain"),
    ("get", "/"),
    ("get", "/login"),
    ("post", "/login"),
    ("post", "/logout"),
    ("get", "/status"),
    ("get", "/favicon.ico"),
    ("get", "/static/{filename}"),
    ("get", "/v2/models/{name}/versions/{version}"),
    ("get", "/v2/models/{name}/versions/{version}/ready"),
    ("post", "/v2/models/{name}/versions/{version}/infer"),
    ("get", "/audit/export"),
}
TENSOR = "line-anomaly"


def run_cases(
    client: Any,
    method: str,
    path: str,
    bodies: Any,
    cases: int,
    model_name: str,
    seen: list[tuple[str, int, str]],
) -> None:
    @settings(
        max_examples=cases,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(body=bodies, name=st.text(max_size=40), real=st.booleans())
    def case(body: Any, name: str, real: bool) -> None:
        if isinstance(body, dict) and real:
            body["model"] = model_name  # most fuzzing is worth more past the lookup
        url = path.replace("{name}", model_name if real else quote(name or "x", safe=""))
        if method == "post":  # json.dumps writes NaN and Infinity too: fuzz them as well
            sent = json.dumps(body).encode()
            resp = client.post(url, content=sent, headers={"Content-Type": "application/json"})
        else:
            resp = client.get(url)
        assert resp.status_code < 500, (url, body, resp.status_code, resp.text[:300])
        seen.append((path, resp.status_code, resp.headers["X-Request-Id"]))

    case()


def test_fuzzing_every_route_of_the_openapi_document(
    tmp_path: Path,
    model_file: Path,
    model_name: str,
    server_factory: ServerFactory,
    garden_manifests: dict[str, Any],
) -> None:
    """5,000 requests made from /openapi.json's own schemas (mostly valid, some off the
    schema), through the real server: no 5xx, no hang, every one that is audited has
    its record, and the log verifies at the end."""
    state = make_state(tmp_path / "state", model_file)
    add_garden(state, garden_manifests)  # the embedding model, for /v1/embeddings
    server = server_factory(
        state, "--max-tokens", "4", "--rate-limit-per-minute", "0", "--queue-depth", "16"
    )
    document = server.http.get("/openapi.json").json()
    components = document["components"]["schemas"]
    operations = {(m, p): op for p, ops in document["paths"].items() for m, op in ops.items()}
    # A new route: fuzz it, or say here why not.
    assert set(operations) == set(FUZZ_CASES) | NOT_FUZZED, sorted(operations)
    assert not set(FUZZ_CASES) & NOT_FUZZED
    seen: list[tuple[str, int, str]] = []  # route, status, request id
    with server.client(timeout=30) as client:
        for (method, path), cases in FUZZ_CASES.items():
            operation = operations[(method, path)]
            body_schema = (
                operation.get("requestBody", {}).get("content", {}).get("application/json", {})
            ).get("schema")
            bodies = from_schema(body_schema, components) if body_schema else st.none()

            real_model = (
                MINILM
                if path == "/v1/embeddings"
                else TENSOR
                if path.startswith("/v2/models")
                else model_name
            )
            run_cases(client, method, path, bodies, cases, real_model, seen)
    assert len(seen) >= 5000
    assert {status for _, status, _ in seen} >= {200, 400, 404}
    server.stop()
    recorded = {row["request_id"] for row in audit_rows(state)}
    unaudited = {"/healthz", "/livez", "/readyz", "/metrics", "/v2/health/live", "/v2/health/ready"}
    missing = [rid for path, _, rid in seen if path not in unaudited and rid not in recorded]
    assert not missing, missing[:5]
    verified = run_cli("audit", "verify", "--json", state=state)
    assert json.loads(verified.stdout)["ok"], verified.stdout[-2000:]


ADDRESS = re.compile(
    r'sa_family=AF_INET6?,[^}]*?(?:inet_addr\("([^"]+)"\)|inet_pton\(AF_INET6, "([^"]+)")'
)


def outbound(trace: str) -> list[str]:
    """The calls in an strace record that reach for an address off this machine."""
    found = []
    for line in trace.splitlines():
        if re.search(r"\b(connect|sendto|sendmsg)\(", line):
            for v4, v6 in ADDRESS.findall(line):
                if not ipaddress.ip_address(v4 or v6).is_loopback:
                    found.append(line.strip())
    return found


def test_outbound_is_what_it_looks_for() -> None:
    seen = (
        "12 connect(7, {sa_family=AF_INET, sin_port=htons(443), "
        'sin_addr=inet_addr("10.1.2.3")}, 16) = -1 ENETUNREACH\n'
        "12 connect(8, {sa_family=AF_INET, sin_port=htons(80), "
        'sin_addr=inet_addr("127.0.0.1")}, 16) = 0\n'
        '13 sendto(9, "x", 1, 0, {sa_family=AF_INET6, sin6_port=htons(53), '
        'inet_pton(AF_INET6, "2001:db8::1", &sin6_addr)}, 28) = -1\n'
    )
    assert len(outbound(seen)) == 2


def test_no_network_use_but_loopback(tmp_path: Path, model_file: Path, model_name: str) -> None:
    """In a network namespace with only loopback, under strace: a chat, a stream, a
    tensor inference, the pages and the audit check make no connect, sendto or sendmsg
    to any address off the machine (model fetches are the only network use, and only
    when IT runs them)."""
    if os.geteuid() != 0:
        pytest.skip("needs root: a network namespace of its own (CI runs as root)")
    for tool in ("unshare", "ip", "strace"):
        assert shutil.which(tool), f"{tool} is missing (scripts/test installs it)"
    state = make_state(tmp_path / "state", model_file)
    trace = tmp_path / "trace"
    probe = subprocess.run(
        [
            "unshare",
            "--net",
            "sh",
            "-c",
            'ip link set lo up && exec "$0" "$@"',
            sys.executable,
            str(REPO / "tests" / "egress_probe.py"),
            str(state),
            str(trace),
            model_name,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert probe.returncode == 0, (probe.stdout + probe.stderr)[-3000:]
    record = trace.read_text()
    assert re.search(r'bind\(\d+, \{sa_family=AF_INET, .*inet_addr\("127.0.0.1"\)', record)
    assert outbound(record) == []
