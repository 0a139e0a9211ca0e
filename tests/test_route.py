"""Routing, evals and promotion for real: the default model as the generalist and as a
line specialist (its base with the handbook as system prompt), MiniLM comparing
questions with domains, the real server, the `openai` SDK and the CLI.

A route is refused until calibrated; `appliance route calibrate` measures its
thresholds on a suite through the server and writes them with the suite's hash; then
in-domain questions go to the specialist first and off-domain ones to the generalist,
a forced unconfident specialist falls back, a forced double-low answer is the
referral, and each decision is in the audit record with its scores. `appliance eval
run` grades answers as a hand-written grading does; `models promote` refuses a worse
candidate and the champion keeps serving."""

from __future__ import annotations

import hashlib
import json
import math
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import OpenAI
from playwright.sync_api import Browser
from test_adapters import adapter_toml, specialist_toml
from test_browser import add_user, questions_sent, questions_with, sign_in

from appliance.audit.reader import records
from appliance.audit.store import AuditStore
from appliance.config import load_settings
from appliance.registry import Manifest

from helpers import (
    REPO,
    Server,
    add_garden,
    give_up,
    make_state,
    metric,
    run_cli,
    start_server,
    wait_for,
)
from loras import write_lora

sys.path.insert(0, str(REPO / "models" / "line"))
import maintenance

pytestmark = pytest.mark.server
ROUTE = "line-desk"
REFERRAL = "Please ask the line supervisor: the appliance cannot answer this."
HANDBOOK = "Reply with the defect code only. Codes: " + "; ".join(
    f"{code}: {symptoms[0]}" for code, symptoms in maintenance.SYMPTOMS.items()
)
IN_DOMAIN = "Shift note: line 4, press 2: grinding noise from the spindle bearing."
OFF_DOMAIN = "What is the capital of France?"
GENERAL = [
    ("What is the capital of France? Answer in one word.", "Paris"),
    ("What colour is the sky on a clear day?", "blue"),
    ("What is 2 + 2?", "4"),
    ("Which animal says moo?", "cow"),
]


def suite_lines() -> list[dict[str, Any]]:
    header = {
        "suite": {
            "name": "line desk",
            "grader": "contains",
            "max_tokens": 16,
            "threshold": 0.0,
            "margin": 0.1,
        }
    }
    cases: list[dict[str, Any]] = [header]
    for i, example in enumerate(maintenance.examples(6, seed=11)):
        note, code = example["messages"][1]["content"], example["messages"][2]["content"]
        cases.append(
            {"id": f"note-{i}", "prompt": note, "expected": code, "tags": {"domain": "defects"}}
        )
    for i, (question, answer) in enumerate(GENERAL):
        cases.append(
            {
                "id": f"general-{i}",
                "prompt": question,
                "expected": answer,
                "tags": {"domain": "general"},
            }
        )
    return cases


@pytest.fixture(scope="module")
def desk(
    tmp_path_factory: pytest.TempPathFactory,
    model_file: Path,
    default_model: Manifest,
    garden_manifests: dict[str, Manifest],
) -> Iterator[tuple[Server, Path, Path]]:
    work = tmp_path_factory.mktemp("route")
    state = make_state(work / "state", model_file)
    add_garden(state, garden_manifests)
    manifests = state / "manifests"
    manifests.mkdir()
    base = default_model.name
    (manifests / "defects.toml").write_text(
        f'name = "defects"\nkind = "specialist"\nbase = "{base}"\n'
        f"system_prompt = {json.dumps(HANDBOOK)}\n[sampling]\ntemperature = 0.0\nmax_tokens = 8\n"
    )
    # A deliberately worse candidate: a wrong adapter (random, strong) on the same base.
    lora = write_lora(state / "models" / "noise-lora.gguf", model_file, strength=3.0, seed=5)
    sha = hashlib.sha256(lora.read_bytes()).hexdigest()
    (manifests / "noise-lora.toml").write_text(
        adapter_toml("noise-lora", default_model, sha, default_model.sha256)
    )
    (manifests / "noise.toml").write_text(specialist_toml("noise", base, "noise-lora", 1.0))
    # An equal candidate: the base through a specialist of its own, nothing added.
    (manifests / "plain.toml").write_text(f'name = "plain"\nkind = "specialist"\nbase = "{base}"\n')
    routes = state / "routes"
    routes.mkdir()
    examples = [s for symptoms in maintenance.SYMPTOMS.values() for s in symptoms[:3]]
    (routes / f"{ROUTE}.toml").write_text(
        'description = "The maintenance desk of the line"\n'
        'embedding = "minilm-l6-v2"\n'
        f'generalist = "{base}"\n'
        f"referral = {json.dumps(REFERRAL)}\n"
        "[[specialists]]\n"
        'model = "defects"\n'
        'description = "defect codes for technicians\' notes about machines on the line"\n'
        f"examples = {json.dumps(examples)}\n"
    )
    suite = work / "desk.jsonl"
    suite.write_text("".join(json.dumps(line) + "\n" for line in suite_lines()))
    add_user(state, "tech.ida")
    server = start_server(state, "--parallel-streams", "2")
    yield server, state, suite
    server.stop()


def sdk(server: Server) -> OpenAI:
    return OpenAI(base_url=f"{server.url}/v1", api_key=server.token, max_retries=0, timeout=120)


def ask(server: Server, question: str) -> tuple[dict[str, Any], httpx.Response]:
    resp = server.http.post(
        "/v1/chat/completions",
        json={
            "model": ROUTE,
            "messages": [{"role": "user", "content": question}],
            "max_tokens": 16,
            "temperature": 0,
        },
    )
    assert resp.status_code == 200, resp.text
    return resp.json(), resp


def cli(state: Path, server: Server, *args: str) -> Any:
    done = run_cli(
        *args,
        "--port",
        str(server.port),
        "--json",
        state=state,
        timeout=300,
        env={"APPLIANCE_TOKEN": server.token},
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def local(state: Path, *args: str) -> Any:
    """A command that needs no server."""
    done = run_cli(*args, "--json", state=state)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def audit(state: Path, action: str | None = None) -> list[dict[str, Any]]:
    store = AuditStore(load_settings(env={}, overrides={"state_dir": state}))
    try:
        rows = list(records(store))
    finally:
        store.close()
    if action is None:
        return rows
    return [r for r in rows if (r.get("content") or {}).get("action") == action]


def route_answers(server: Server, answered_by: str, outcome: str) -> float:
    """appliance_route_answers_total for the route, this answerer and outcome (0 if none)."""
    labels = {"answered_by": answered_by, "outcome": outcome, "route": ROUTE}
    return metric(server, "appliance_route_answers_total", 0.0, **labels)


def set_thresholds(state: Path, **thresholds: float) -> None:
    path = state / "routes" / f"{ROUTE}.calibration.json"
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, **thresholds}))


def test_an_uncalibrated_route_is_refused(desk: tuple[Server, Path, Path]) -> None:
    server, _, _ = desk
    resp = server.http.post(
        "/v1/chat/completions",
        json={"model": ROUTE, "messages": [{"role": "user", "content": IN_DOMAIN}]},
    )
    assert resp.status_code == 503, resp.text
    error = resp.json()["error"]
    assert error["code"] == "route_uncalibrated" and "appliance route calibrate" in error["message"]
    card = server.http.get(f"/v1/models/{ROUTE}").json()
    assert card["kind"] == "route" and card["state"] == "uncalibrated"


@pytest.fixture(scope="module")
def calibrated(desk: tuple[Server, Path, Path]) -> dict[str, Any]:
    """`appliance route calibrate` through the server, once: what it printed."""
    server, state, suite = desk
    result: dict[str, Any] = cli(
        state, server, "route", "calibrate", ROUTE, "--suite", str(suite), "--target-error", "0.3"
    )
    return result


def test_calibration_writes_thresholds_with_the_suite_hash(
    desk: tuple[Server, Path, Path], calibrated: dict[str, Any]
) -> None:
    server, state, suite = desk
    result = calibrated
    sha = hashlib.sha256(suite.read_bytes()).hexdigest()
    written = json.loads((state / "routes" / f"{ROUTE}.calibration.json").read_text())
    assert written["suite_sha256"] == sha == result["suite_sha256"]
    m = written["measured"]
    assert m["cases"] == 10
    # The thresholds it chose meet the target it was given, on its own observations.
    assert m["refers_everything"] or m["wrong_among_answered"] <= 0.3
    # MiniLM tells technicians' notes from general questions: every case routed right.
    assert m["routing_accuracy"] == 1.0
    observations = {o["case"]: o for o in m["observations"]}
    for case, o in observations.items():
        above = o["similarity"] >= written["similarity"]
        assert above == case.startswith("note-"), (case, o, written["similarity"])
    (record,) = audit(state, "route.calibrate")
    assert record["content"]["suite_sha256"] == sha
    assert record["content"]["similarity"] == written["similarity"]
    card = server.http.get(f"/v1/models/{ROUTE}").json()
    assert card["state"] == "ready" and card["route"]["calibration"]["suite_sha256"] == sha


def decision(answer: dict[str, Any]) -> dict[str, Any]:
    route: dict[str, Any] = answer["appliance_route"]
    return route


def test_in_domain_goes_to_the_specialist_first(
    desk: tuple[Server, Path, Path],
    calibrated: dict[str, Any],
) -> None:
    server, _, _ = desk
    answer = sdk(server).chat.completions.with_raw_response.create(
        model=ROUTE,
        messages=[{"role": "user", "content": IN_DOMAIN}],
        max_tokens=16,
        temperature=0,
    )
    body = json.loads(answer.text)
    route = decision(body)
    assert route["domain"] == "defects"
    assert route["tried"][0]["model"] == "defects"
    assert route["similarities"]["defects"] >= route["similarity_threshold"]
    assert answer.headers["X-Appliance-Route"].startswith(f"{ROUTE}; answered_by=")
    by = route["answered_by"]
    if by != "referral":
        answered = next(t for t in route["tried"] if t["model"] == by)
        assert body["choices"][0]["message"]["content"] == answered["answer"]
        assert answered["confidence"] >= answered["threshold"]


def test_off_domain_goes_to_the_generalist(
    desk: tuple[Server, Path, Path], calibrated: dict[str, Any], default_model: Manifest
) -> None:
    server, _, _ = desk
    body, _ = ask(server, OFF_DOMAIN)
    route = decision(body)
    assert route["domain"] is None
    assert [t["model"] for t in route["tried"]] == [default_model.name]
    assert route["similarities"]["defects"] < route["similarity_threshold"]


def test_unconfident_specialist_falls_back(
    desk: tuple[Server, Path, Path], calibrated: dict[str, Any], default_model: Manifest
) -> None:
    server, state, _ = desk
    set_thresholds(state, specialist_confidence=1.01, generalist_confidence=0.0)
    body, resp = ask(server, IN_DOMAIN)
    route = decision(body)
    assert [t["model"] for t in route["tried"]] == ["defects", default_model.name]
    assert route["tried"][0]["confident"] is False
    assert route["answered_by"] == default_model.name and route["outcome"] == "fallback"
    assert body["choices"][0]["message"]["content"] == route["tried"][1]["answer"]
    assert "outcome=fallback" in resp.headers["X-Appliance-Route"]
    rows = [r for r in audit(state) if r["request_id"] == resp.headers["X-Request-Id"]]
    request, outcome = (r for r in rows if r["kind"] in ("request", "outcome"))
    assert request["model"] == ROUTE
    recorded = outcome["content"]["route"]
    assert recorded["outcome"] == "fallback"
    assert [t["confidence"] for t in recorded["tried"]] == [t["confidence"] for t in route["tried"]]
    assert outcome["model"] == default_model.name


def test_double_low_gets_the_referral(
    desk: tuple[Server, Path, Path],
    calibrated: dict[str, Any],
) -> None:
    server, state, _ = desk
    set_thresholds(state, specialist_confidence=1.01, generalist_confidence=1.01)
    body, resp = ask(server, IN_DOMAIN)
    route = decision(body)
    assert route["answered_by"] == "referral" and route["outcome"] == "referral"
    assert len(route["tried"]) == 2 and not any(t["confident"] for t in route["tried"])
    assert body["choices"][0]["message"]["content"] == REFERRAL
    # What the referral cost: both models ran.
    assert body["usage"]["completion_tokens"] == sum(t["completion_tokens"] for t in route["tried"])
    assert body["usage"]["completion_tokens"] > 0
    (outcome,) = [
        r
        for r in audit(state)
        if r["request_id"] == resp.headers["X-Request-Id"] and r["kind"] == "outcome"
    ]
    assert outcome["content"]["output"] == REFERRAL
    assert outcome["content"]["route"]["outcome"] == "referral"
    assert route_answers(server, "referral", "referral") >= 1


def test_a_routed_stream_ends_with_the_decision(
    desk: tuple[Server, Path, Path],
    calibrated: dict[str, Any],
) -> None:
    server, state, _ = desk
    set_thresholds(state, specialist_confidence=1.01, generalist_confidence=1.01)
    body = {
        "model": ROUTE,
        "messages": [{"role": "user", "content": IN_DOMAIN}],
        "max_tokens": 16,
        "stream": True,
    }
    with server.http.stream("POST", "/v1/chat/completions", json=body) as resp:
        assert resp.status_code == 200
        assert resp.headers["X-Appliance-Route"] == ROUTE
        events = [json.loads(line[6:]) for line in resp.iter_lines() if line.startswith("data: {")]
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
    assert text == REFERRAL
    assert events[-1]["appliance_route"]["outcome"] == "referral"


def test_a_route_answers_at_the_temperature_it_was_calibrated_at(
    desk: tuple[Server, Path, Path], calibrated: dict[str, Any]
) -> None:
    """Its confidence thresholds hold at the temperature they were measured at (greedy):
    left out, that is what the models it tries answer at (not the API's default of 1);
    asked at another, the route refuses with a plain 400 naming both, streamed or not."""
    server, state, _ = desk
    set_thresholds(state, specialist_confidence=0.0, generalist_confidence=0.0)
    card = server.http.get(f"/v1/models/{ROUTE}").json()
    assert card["route"]["calibration"]["temperature"] == 0.0, card
    question = [{"role": "user", "content": OFF_DOMAIN}]
    resp = server.http.post(
        "/v1/chat/completions", json={"model": ROUTE, "messages": question, "max_tokens": 32}
    )
    assert resp.status_code == 200, resp.text
    decision = resp.json()["appliance_route"]
    assert decision["temperature"] == 0.0 and decision["outcome"] == "generalist", decision
    # The generalist's greedy answer: sampled at 1, 32 tokens of it would differ.
    greedy = server.http.post(
        "/v1/chat/completions",
        json={
            "model": decision["answered_by"],
            "messages": question,
            "max_tokens": 32,
            "temperature": 0,
        },
    )
    text = resp.json()["choices"][0]["message"]["content"]
    assert text == greedy.json()["choices"][0]["message"]["content"]
    outcome = next(
        r
        for r in audit(state)
        if r["request_id"] == resp.headers["X-Request-Id"] and r["kind"] == "outcome"
    )
    assert outcome["content"]["route"]["temperature"] == 0.0
    for stream in (False, True):
        refused = server.http.post(
            "/v1/chat/completions",
            json={"model": ROUTE, "messages": question, "temperature": 0.7, "stream": stream},
        )
        assert refused.status_code == 400, refused.text
        error = refused.json()["error"]
        assert (error["param"], error["code"]) == ("temperature", "temperature_not_calibrated")
        assert "calibrated at temperature 0" in error["message"], error
        assert "not 0.7" in error["message"], error
    # What else shapes the answers the thresholds were measured on is refused too.
    shaping = {
        "presence_penalty": 0.5,
        "frequency_penalty": 0.5,
        "response_format": {"type": "json_object"},
    }
    for param, value in shaping.items():
        refused = server.http.post(
            "/v1/chat/completions", json={"model": ROUTE, "messages": question, param: value}
        )
        assert refused.status_code == 400, refused.text
        error = refused.json()["error"]
        assert (error["param"], error["code"]) == (param, "sampling_not_calibrated"), error
    asked_greedy = server.http.post(
        "/v1/chat/completions",
        json={"model": ROUTE, "messages": question, "max_tokens": 32, "temperature": 0},
    )
    assert asked_greedy.status_code == 200
    assert asked_greedy.json()["choices"][0]["message"]["content"] == text


def test_a_routed_stream_whose_client_leaves_stops_its_models(
    desk: tuple[Server, Path, Path], calibrated: dict[str, Any], default_model: Manifest
) -> None:
    """The client leaves while the route still runs (it has read only the first
    keep-alive comment): the model running for it stops at the server's next keep-alive,
    no further model runs, and the records say cancelled."""
    server, state, _ = desk
    set_thresholds(state, specialist_confidence=1.01, generalist_confidence=1.01)
    asked = 1900  # ~15 s of answer on a 2-core box, if nothing stopped it (~4 s does)
    body = {
        "model": ROUTE,
        "messages": [{"role": "user", "content": OFF_DOMAIN}],
        "max_tokens": asked,
        "ignore_eos": True,
        "stream": True,
    }
    before = route_answers(server, "cancelled", "cancelled")
    with server.http.stream("POST", "/v1/chat/completions", json=body) as resp:
        assert resp.status_code == 200
        request_id = resp.headers["X-Request-Id"]
        assert next(resp.iter_lines()).startswith(": routing")

    def outcomes() -> list[dict[str, Any]]:
        return [r for r in audit(state) if r["request_id"] == request_id and r["kind"] == "outcome"]

    assert wait_for(outcomes, 60, interval=0.5)
    [outcome] = outcomes()
    route = outcome["content"]["route"]
    assert (route["answered_by"], route["outcome"]) == ("cancelled", "cancelled")
    [tried] = route["tried"]  # the generalist, stopped: nothing ran after it
    assert tried["model"] == default_model.name and tried["finish_reason"] == "cancelled"
    assert tried["completion_tokens"] < asked  # stopped, not run to its length
    assert outcome["finish_reason"] == "cancelled"
    assert outcome["completion_tokens"] == tried["completion_tokens"]
    assert route_answers(server, "cancelled", "cancelled") == before + 1


def test_a_plain_routed_answer_whose_client_leaves_runs_no_further_model(
    desk: tuple[Server, Path, Path], calibrated: dict[str, Any]
) -> None:
    """Not streamed, the client's leaving is seen on its connection: it gives up while
    the specialist answers (not confident, so the generalist would run next); the
    specialist stops, the generalist never runs, and the request is recorded as 499."""
    server, state, _ = desk
    set_thresholds(state, specialist_confidence=1.01, generalist_confidence=1.01)
    # ~15 s of answer on a 2-core box if nothing stopped it; the client leaves at 2 s
    # (a box that makes 1900 tokens in 2 s would need a longer answer here).
    asked = 1900
    body = {
        "model": ROUTE,
        "messages": [{"role": "user", "content": IN_DOMAIN}],
        "max_tokens": asked,
        "ignore_eos": True,
    }
    before = route_answers(server, "cancelled", "cancelled")
    give_up(server, body)

    def outcomes() -> list[dict[str, Any]]:
        return [r for r in audit(state) if r["kind"] == "outcome" and r["status"] == 499]

    assert wait_for(outcomes, 15, interval=0.5)
    [outcome] = outcomes()
    assert outcome["error_type"] == "client_disconnected", outcome
    assert outcome["finish_reason"] == "cancelled"
    # No answer was given, not even the referral; what the specialist made is in its try.
    assert "output" not in outcome["content"], outcome["content"]
    route = outcome["content"]["route"]
    assert (route["answered_by"], route["outcome"]) == ("cancelled", "cancelled")
    [tried] = route["tried"]  # the specialist, stopped: the generalist never ran
    assert tried["model"] == route["domain"] and tried["finish_reason"] == "cancelled"
    assert 0 < tried["completion_tokens"] < asked
    assert route_answers(server, "cancelled", "cancelled") == before + 1


def hand_grade(answer: str, expected: str) -> bool:
    """The suite's 'contains' grader, written again: whole words, case and punctuation
    aside."""
    words = re.sub(r"[^0-9a-z]+", " ", answer.lower()).split()
    wanted = re.sub(r"[^0-9a-z]+", " ", expected.lower()).split()
    return any(words[i : i + len(wanted)] == wanted for i in range(len(words)))


def test_eval_scores_equal_a_hand_grading(
    desk: tuple[Server, Path, Path], default_model: Manifest
) -> None:
    server, state, suite = desk
    report = cli(
        state,
        server,
        "eval",
        "run",
        str(suite),
        "--model",
        "defects",
        "--model",
        default_model.name,
    )
    assert [m["model"] for m in report["models"]] == ["defects", default_model.name]
    # A specialist's hash is what answers: its base, adapters, prompt and sampling, the
    # hash its answers carry in the audit log.
    defects_sha = report["models"][0]["sha256"]
    assert defects_sha and defects_sha != report["models"][1]["sha256"]
    answered = [r for r in audit(state) if r.get("kind") == "request" and r["model"] == "defects"]
    assert answered and {r["model_sha256"] for r in answered} == {defects_sha}
    expected = {c["id"]: c for c in suite_lines()[1:]}
    for entry in report["models"]:
        passed = [hand_grade(r["answer"], expected[r["id"]]["expected"]) for r in entry["results"]]
        assert [r["passed"] for r in entry["results"]] == passed
        n, k = len(passed), sum(passed)
        assert entry["score"] == pytest.approx(k / n)
        z, p = 1.959964, k / n  # the Wilson interval, by hand
        centre, half = (p + z * z / (2 * n)), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
        assert entry["ci95"][0] == pytest.approx((centre - half) / (1 + z * z / n), abs=1e-9)
        general = [
            ok
            for r, ok in zip(entry["results"], passed, strict=True)
            if r["tags"]["domain"] == "general"
        ]
        assert entry["tags"]["domain"]["general"]["score"] == pytest.approx(sum(general) / 4)
        assert entry["latency_ms"]["p50"] > 0 and entry["peak_memory_mb"] > 0
    where = Path(report["report_dir"])
    html = (where / "report.html").read_text()
    assert html.count('class="point"') == 2
    (record,) = [r for r in audit(state, "eval.run") if r["content"]["run_id"] == report["run_id"]]
    content = record["content"]
    assert content["suite"]["sha256"] == report["suite"]["sha256"]
    assert [m["sha256"] for m in content["models"]] == [m["sha256"] for m in report["models"]]
    assert [m["score"] for m in content["models"]] == [m["score"] for m in report["models"]]
    assert (
        content["report"]["sha256"]
        == hashlib.sha256((where / "report.json").read_bytes()).hexdigest()
    )


def test_a_worse_candidate_is_refused_and_the_champion_keeps_serving(
    desk: tuple[Server, Path, Path], default_model: Manifest
) -> None:
    server, state, suite = desk
    base = default_model.name
    first = cli(state, server, "models", "promote", "desk", "--to", base, "--suite", str(suite))
    assert first["promoted"] is True and first["champion"] is None
    served = server.http.post(
        "/v1/chat/completions",
        json={
            "model": "desk",
            "messages": [{"role": "user", "content": OFF_DOMAIN}],
            "max_tokens": 4,
        },
    )
    assert served.status_code == 200 and served.json()["model"] == "desk"
    card = server.http.get("/v1/models/desk").json()
    assert card["id"] == "desk" and card["champion"] == base and card["kind"] == "chat"
    listed = {m["id"]: m for m in server.http.get("/v1/models").json()["data"]}
    assert listed["desk"]["champion"] == base and listed[base]["champion"] is None
    clash = run_cli("models", "promote", ROUTE, "--to", base, "--suite", str(suite), state=state)
    assert clash.returncode != 0 and "a route's name" in clash.stderr
    done = run_cli(
        "models",
        "promote",
        "desk",
        "--to",
        "noise",
        "--suite",
        str(suite),
        "--port",
        str(server.port),
        state=state,
        timeout=300,
        env={"APPLIANCE_TOKEN": server.token},
    )
    assert done.returncode != 0
    assert "is not promoted" in done.stderr and "against champion" in done.stderr
    refused = audit(state, "models.promote.refused")
    assert refused and refused[-1]["content"]["candidate"]["model"] == "noise"
    assert json.loads((state / "aliases.json").read_text())["desk"]["champion"] == base
    rows = [
        r
        for r in audit(state)
        if r.get("kind") == "request"
        and (r.get("content") or {}).get("input", {}).get("model") == "desk"
    ]
    assert rows and rows[-1]["model"] == base  # the served name reached the champion


def test_the_page_says_who_answered_a_route(
    desk: tuple[Server, Path, Path], calibrated: dict[str, Any], browser: Browser
) -> None:
    server, state, _ = desk
    set_thresholds(state, specialist_confidence=1.01, generalist_confidence=1.01)
    page = browser.new_context().new_page()
    sent = questions_sent(page)  # as the page sends them, before the bound below
    questions_with(page, max_tokens=64)  # the generalist's greedy answer, left alone, may run long
    sign_in(page, server, "tech.ida")
    page.select_option("#model", ROUTE)
    page.fill("#question", IN_DOMAIN)
    page.click("#ask")
    page.locator(".route").wait_for(timeout=60000)
    assert page.locator(".message.assistant .content").last.inner_text() == REFERRAL
    note = page.locator(".route").last
    assert note.get_attribute("data-outcome") == "referral"
    assert note.inner_text() == f"Route {ROUTE}: neither model was confident: referred"
    # The route's own temperature (its calibration's, greedy), not one the page picks.
    assert sent[-1]["model"] == ROUTE and "temperature" not in sent[-1]
    # A specialist answers with its own sampling (defects: temperature 0, 8 tokens).
    page.unroute("**/v1/chat/completions")  # its own bound, not the one above
    page.click("#clear")
    page.select_option("#model", "defects")
    page.fill("#question", IN_DOMAIN)
    page.click("#ask")
    page.locator(".audit-id").last.wait_for(timeout=60000)
    assert sent[-1]["model"] == "defects" and "temperature" not in sent[-1]


def test_the_status_page_shows_the_route(
    desk: tuple[Server, Path, Path], calibrated: dict[str, Any]
) -> None:
    server, _, _ = desk
    ask(server, OFF_DOMAIN)  # at least one answer counted
    page = server.http.get("/status")
    assert page.status_code == 200
    row = re.search(rf"<tr><td>{ROUTE}</td>.*?</tr>", page.text, re.S)
    assert row is not None, page.text
    assert "defects" in row.group(0) and "suite " + calibrated["suite_sha256"][:12] in row.group(0)
    assert re.search(r"(generalist|referral|specialist|fallback) [1-9]", row.group(0))


def test_an_equal_candidate_is_promoted_and_rolled_back(
    desk: tuple[Server, Path, Path], default_model: Manifest
) -> None:
    server, state, suite = desk
    base = default_model.name
    cli(state, server, "models", "promote", "floor", "--to", base, "--suite", str(suite))
    promoted = cli(
        state, server, "models", "promote", "floor", "--to", "plain", "--suite", str(suite)
    )
    assert promoted["promoted"] is True
    assert promoted["candidate"]["score"] == promoted["champion"]["score"]  # the same answers
    assert local(state, "models", "aliases")["floor"]["champion"] == "plain"
    back = local(state, "models", "rollback", "floor")
    assert back == {"name": "floor", "from": "plain", "to": base}
    (record,) = [r for r in audit(state, "models.rollback") if r["content"]["name"] == "floor"]
    assert record["content"]["to"] == base
    served = server.http.post(
        "/v1/chat/completions",
        json={
            "model": "floor",
            "messages": [{"role": "user", "content": OFF_DOMAIN}],
            "max_tokens": 2,
        },
    )
    assert served.status_code == 200
    (row,) = [
        r
        for r in audit(state)
        if r["request_id"] == served.headers["X-Request-Id"] and r["kind"] == "request"
    ]
    assert row["model"] == base
    again = run_cli("models", "rollback", "floor", state=state)
    assert again.returncode != 0 and "no earlier champion" in again.stderr


def test_a_tensor_suite_is_scored_as_by_hand(
    desk: tuple[Server, Path, Path], tmp_path: Path
) -> None:
    import numpy as np
    import onnxruntime as ort

    sys.path.insert(0, str(REPO / "models" / "line"))
    import build as line_build

    server, state, _ = desk
    x, y = line_build.generate(np.random.default_rng(3), 40)
    rows = ["vib,freq,temp,amps,label,tag:shift"]
    for i, (features, label) in enumerate(zip(x, y, strict=True)):
        rows.append(",".join(f"{v:.4f}" for v in features) + f",{int(label)},{'ab'[i % 2]}")
    folder = tmp_path / "anomaly"
    folder.mkdir()
    (folder / "cases.csv").write_text("\n".join(rows) + "\n")
    (folder / "suite.toml").write_text(
        'kind = "tensor"\ninput = "readings"\noutput = "anomaly_score"\nmetric = "accuracy"\n'
    )
    report = cli(state, server, "eval", "run", str(folder), "--model", "line-anomaly")
    (entry,) = report["models"]
    session = ort.InferenceSession(str(state / "models" / "line-anomaly.onnx"))
    readings = np.array([[round(v, 4) for v in f] for f in x], dtype=np.float32)
    scores = session.run(["anomaly_score"], {"readings": readings})[0].ravel()
    predicted = (scores > 0.5).astype(int)
    right = predicted == y.astype(int)
    assert [r["passed"] for r in entry["results"]] == right.tolist()
    assert entry["score"] == pytest.approx(right.mean())
    shift_a = right[::2]
    assert entry["tags"]["shift"]["a"]["score"] == pytest.approx(shift_a.mean())
    assert entry["metric"] == "accuracy" and entry["latency_ms"]["p50"] > 0


def test_an_edited_route_must_be_calibrated_again(
    desk: tuple[Server, Path, Path], calibrated: dict[str, Any]
) -> None:
    server, state, _ = desk
    config = state / "routes" / f"{ROUTE}.toml"
    original = config.read_text()
    config.write_text(original.replace("The maintenance desk", "The line's maintenance desk"))
    try:
        resp = server.http.post(
            "/v1/chat/completions",
            json={"model": ROUTE, "messages": [{"role": "user", "content": IN_DOMAIN}]},
        )
        assert resp.status_code == 503
        assert "changed since it was calibrated" in resp.json()["error"]["message"]
    finally:
        config.write_text(original)
    body, _ = ask(server, OFF_DOMAIN)  # the config it was measured for: served again
    assert body["appliance_route"]["route"] == ROUTE
