"""Grounded answers for real: a corpus the tests write (Markdown, HTML, PDF, with facts
no model knows), added with `appliance docs add`, the default model and MiniLM, the
real server, the `openai` SDK. The citation points to the passage with the fact; a
question nothing answers gets "no source found"; a role without access gets nothing
from a collection; a changed document's old version is no longer cited; the audit
record lists the passages seen and cited."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import OpenAI
from pdfs import write_pdf
from playwright.sync_api import Browser
from test_browser import add_user, questions_sent, questions_with, sign_in

from appliance.audit.reader import records
from appliance.audit.store import AuditStore
from appliance.auth.store import AuthStore
from appliance.config import load_settings
from appliance.registry import Manifest

from helpers import Server, add_garden, make_state, run_cli, start_server

pytestmark = pytest.mark.server
SEPSIS = """# Sepsis bundle at Saint Aldric Hospital

## Antibiotics

Give the first dose of cefazolin-Q within {minutes} minutes of triage. Draw blood
cultures before the first dose.

## Fluids

Give 30 ml/kg of crystalloid in the first three hours.
"""
HYGIENE = """<html><head><title>Ward 7B hand hygiene</title><script>var leak = 1;</script>
</head><body><h1>Ward 7B hand hygiene</h1>
<p>Rub hands with zorbex gel for 27 seconds before touching a patient.</p>
<h2>Gloves</h2><p>Change gloves between patients &amp; after every procedure.</p>
</body></html>"""
TORQUE = ["Line 3 press maintenance", "Tighten the flange bolts to 88 Nm with the K-12 wrench."]
QUESTION = "How soon after triage is the first cefazolin-Q dose given?"


def token(state: Path, name: str, role: str) -> str:
    store = AuthStore(load_settings(env={}, overrides={"state_dir": state}))
    try:
        return str(store.create_token(name, role)["token"])
    finally:
        store.close()


def cli(state: Path, *args: str) -> Any:
    done = run_cli(*args, "--json", state=state, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def library(
    tmp_path_factory: pytest.TempPathFactory,
    model_file: Path,
    default_model: Manifest,
    garden_manifests: dict[str, Manifest],
) -> Iterator[tuple[Server, Path, Path, dict[str, str]]]:
    work = tmp_path_factory.mktemp("grounding")
    state = make_state(work / "state", model_file)
    add_garden(state, garden_manifests)
    corpus = work / "corpus"
    corpus.mkdir()
    (corpus / "sepsis.md").write_text(SEPSIS.format(minutes=42))
    (corpus / "hygiene.html").write_text(HYGIENE)
    write_pdf(work / "torque.pdf", TORQUE, title="Press torque card")
    added = cli(state, "docs", "add", str(corpus), "--collection", "protocols")
    assert [a["status"] for a in added] == ["added", "added"]
    cli(state, "docs", "add", str(work / "torque.pdf"), "--collection", "plant")
    cli(state, "docs", "access", "protocols", "--role", "clinician", "--role", "admin")
    cli(state, "docs", "access", "plant", "--role", "line", "--role", "admin")
    manifests = state / "manifests"
    manifests.mkdir()
    (manifests / "ward-desk.toml").write_text(
        f'name = "ward-desk"\nkind = "specialist"\nbase = "{default_model.name}"\n'
        'collections = ["protocols"]\n[sampling]\ntemperature = 0.0\n'
    )
    tokens = {
        "clinician": token(state, "nurse", "clinician"),
        "line": token(state, "fitter", "line"),
    }
    add_user(state, "nurse.eve")
    server = start_server(state)
    yield server, state, work, tokens
    server.stop()


def sdk(server: Server, key: str) -> OpenAI:
    return OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, timeout=120)


def grounded(server: Server, key: str, question: str, model: str, **extra: Any) -> dict[str, Any]:
    raw = sdk(server, key).chat.completions.with_raw_response.create(
        model=model,
        messages=[{"role": "user", "content": question}],
        max_tokens=40,
        temperature=0,
        extra_body=extra,
    )
    body: dict[str, Any] = json.loads(raw.text)
    body["request_id"] = raw.headers["X-Request-Id"]
    return body


def audit_rows(state: Path) -> list[dict[str, Any]]:
    store = AuditStore(load_settings(env={}, overrides={"state_dir": state}))
    try:
        return list(records(store))
    finally:
        store.close()


def test_docs_are_listed_with_their_kinds_and_versions(
    library: tuple[Server, Path, Path, dict[str, str]],
) -> None:
    _, state, work, _ = library
    listed = cli(state, "docs", "list")
    kinds = {d["title"]: (d["kind"], d["version"], d["collection"]) for d in listed["documents"]}
    assert kinds == {
        "Sepsis bundle at Saint Aldric Hospital": ("markdown", 1, "protocols"),
        "Ward 7B hand hygiene": ("html", 1, "protocols"),
        "Press torque card": ("pdf", 1, "plant"),
    }
    assert listed["collections"]["plant"]["roles"] == ["line", "admin"]
    added = [r for r in audit_rows(state) if (r.get("content") or {}).get("action") == "docs.add"]
    assert {r["content"]["sha256"] for r in added} >= {
        hashlib.sha256((work / "torque.pdf").read_bytes()).hexdigest()
    }


def test_a_grounded_answer_cites_the_passage_with_the_fact(
    library: tuple[Server, Path, Path, dict[str, str]], model_name: str
) -> None:
    server, state, work, tokens = library
    body = grounded(
        server,
        tokens["clinician"],
        QUESTION,
        model_name,
        appliance_grounding={"collections": ["protocols"]},
    )
    g = body["appliance_grounding"]
    assert g["no_source"] is False and g["sources"]
    (cited,) = g["citations"]
    assert "42 minutes" in cited["text"] and cited["document"].startswith("Sepsis bundle")
    assert cited["version"] == 1
    assert (
        cited["document_sha256"]
        == hashlib.sha256((work / "corpus" / "sepsis.md").read_bytes()).hexdigest()
    )
    answer = body["choices"][0]["message"]["content"]
    assert f"[{cited['source']}]" in answer
    assert "42" in answer
    (outcome,) = [
        r
        for r in audit_rows(state)
        if r["request_id"] == body["request_id"] and r["kind"] == "outcome"
    ]
    recorded = outcome["content"]["grounding"]
    assert [s["passage_id"] for s in recorded["seen"]] == [s["passage_id"] for s in g["sources"]]
    assert recorded["cited"][0]["passage_id"] == cited["passage_id"]
    assert recorded["cited"][0]["document_sha256"] == cited["document_sha256"]


def test_a_specialist_that_binds_collections_is_grounded(
    library: tuple[Server, Path, Path, dict[str, str]],
) -> None:
    server, _, _, tokens = library
    body = grounded(
        server, tokens["clinician"], "How long do I rub my hands with zorbex gel?", "ward-desk"
    )
    g = body["appliance_grounding"]
    assert g["collections"] == ["protocols"]
    assert "27 seconds" in g["sources"][0]["text"] and "leak" not in g["sources"][0]["text"]


def test_nothing_relevant_says_no_source_found(
    library: tuple[Server, Path, Path, dict[str, str]], model_name: str
) -> None:
    server, _, _, tokens = library
    body = grounded(
        server,
        tokens["clinician"],
        "What is the capital of Peru?",
        model_name,
        appliance_grounding={},
    )
    g = body["appliance_grounding"]
    assert g["no_source"] is True and g["sources"] == [] and g["citations"] == []
    assert body["choices"][0]["message"]["content"].startswith("No source found")
    assert g["best_similarity"] < g["threshold"]


def test_a_role_gets_no_passage_from_a_collection_it_may_not_read(
    library: tuple[Server, Path, Path, dict[str, str]], model_name: str
) -> None:
    server, _, _, tokens = library
    nurse = {"Authorization": f"Bearer {tokens['clinician']}"}
    fitter = {"Authorization": f"Bearer {tokens['line']}"}
    question = {"query": "What torque for the flange bolts on the line 3 press?", "top_k": 5}
    seen = httpx.post(f"{server.url}/v1/retrieve", json=question, headers=nurse).json()
    assert seen["collections"] == ["protocols"]
    assert all(d["collection"] == "protocols" for d in seen["data"])
    assert not any("88 Nm" in d["text"] for d in seen["data"])
    theirs = httpx.post(f"{server.url}/v1/retrieve", json=question, headers=fitter).json()
    assert theirs["collections"] == ["plant"] and "88 Nm" in theirs["data"][0]["text"]
    assert theirs["data"][0]["relevant"] is True
    refused = httpx.post(
        f"{server.url}/v1/retrieve", json={**question, "collections": ["plant"]}, headers=nurse
    )
    assert refused.status_code == 403 and refused.json()["error"]["param"] == "collections"
    listed = httpx.get(f"{server.url}/v1/collections", headers=nurse).json()
    assert [c["id"] for c in listed["data"]] == ["protocols"]
    unknown = httpx.post(
        f"{server.url}/v1/retrieve", json={**question, "collections": ["nope"]}, headers=fitter
    )
    assert unknown.status_code == 400 and "protocols" in unknown.json()["error"]["message"]


def test_a_grounded_stream_ends_with_its_sources(
    library: tuple[Server, Path, Path, dict[str, str]], model_name: str
) -> None:
    server, _, _, tokens = library
    body = {
        "model": model_name,
        "messages": [{"role": "user", "content": QUESTION}],
        "max_tokens": 40,
        "temperature": 0,
        "stream": True,
        "appliance_grounding": {"collections": ["protocols"]},
    }
    headers = {"Authorization": f"Bearer {tokens['clinician']}"}
    with httpx.stream(
        "POST", f"{server.url}/v1/chat/completions", json=body, headers=headers, timeout=120
    ) as resp:
        events = [json.loads(line[6:]) for line in resp.iter_lines() if line.startswith("data: {")]
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
    g = events[-1]["appliance_grounding"]
    (cited,) = g["citations"]
    assert f"[{cited['source']}]" in text and "42 minutes" in cited["text"]


def test_the_page_shows_the_sources_and_opens_their_text(
    library: tuple[Server, Path, Path, dict[str, str]], browser: Browser
) -> None:
    server, _, _, _ = library
    page = browser.new_context().new_page()
    sent = questions_sent(page)
    questions_with(page, max_tokens=40, temperature=0)  # the page's request, deterministic
    sign_in(page, server, "nurse.eve")
    page.locator("#sources option[value=protocols]").wait_for(state="attached")
    assert page.locator("#sources option[value=plant]").count() == 0  # not hers to read
    page.select_option("#sources", "protocols")
    page.fill("#question", QUESTION)
    page.click("#ask")
    page.locator(".sources").wait_for(timeout=60000)
    assert sent[-1]["appliance_grounding"] == {"collections": ["protocols"]}
    answer = page.locator(".message.assistant .content").last.inner_text()
    assert "[1]" in answer
    summary = page.locator(".sources summary").first
    assert summary.inner_text().startswith("[1] Sepsis bundle at Saint Aldric Hospital, version 1")
    summary.click()
    assert "42 minutes" in page.locator(".sources .passage").first.inner_text()
    page.fill("#question", "Who painted the Mona Lisa?")
    page.click("#ask")
    page.locator(".no-source").wait_for(timeout=60000)
    assert page.locator(".no-source").inner_text() == "No source found in protocols."


def test_a_changed_document_is_cited_in_its_new_version_only(
    library: tuple[Server, Path, Path, dict[str, str]], model_name: str
) -> None:
    server, state, work, tokens = library
    (work / "corpus" / "sepsis.md").write_text(SEPSIS.format(minutes=35))
    (changed,) = [
        a
        for a in cli(
            state, "docs", "add", str(work / "corpus" / "sepsis.md"), "--collection", "protocols"
        )
    ]
    assert changed["status"] == "new version" and changed["version"] == 2
    assert changed["retired"] == 1
    body = grounded(
        server,
        tokens["clinician"],
        QUESTION,
        model_name,
        appliance_grounding={"collections": ["protocols"]},
    )
    g = body["appliance_grounding"]
    assert all(s["version"] == 2 for s in g["sources"] if s["document"].startswith("Sepsis"))
    assert not any("42 minutes" in s["text"] for s in g["sources"])
    (cited,) = g["citations"]
    assert cited["version"] == 2 and "35 minutes" in cited["text"]
    again = cli(
        state, "docs", "add", str(work / "corpus" / "sepsis.md"), "--collection", "protocols"
    )
    assert again[0]["status"] == "unchanged"


def test_a_collections_threshold_is_calibrated_on_questions(
    library: tuple[Server, Path, Path, dict[str, str]], model_name: str
) -> None:
    server, state, work, tokens = library
    cases = [
        ("How long do I rub my hands with zorbex gel?", "yes", "27 seconds"),
        ("When are gloves changed on ward 7B?", "yes", "between patients"),
        ("How much crystalloid in the sepsis bundle?", "yes", "30 ml/kg"),
        ("What is the capital of Peru?", "no", "-"),
        ("Who painted the Mona Lisa?", "no", "-"),
        ("How do I bake pancakes?", "no", "-"),
    ]
    suite = work / "relevance.jsonl"
    suite.write_text(
        "".join(
            json.dumps({"prompt": q, "expected": e, "tags": {"answerable": a}}) + "\n"
            for q, a, e in cases
        )
    )
    done = run_cli(
        "docs",
        "calibrate",
        "protocols",
        "--suite",
        str(suite),
        "--port",
        str(server.port),
        "--json",
        state=state,
        timeout=300,
        env={"APPLIANCE_TOKEN": server.token},
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["accuracy"] == 1.0 and result["recall_at_k"] == 1.0
    recalls = result["recall_at_k_by_weight"]
    assert set(recalls) == {"0.0", "0.1", "0.2", "0.3", "0.5", "0.7", "1.0"}
    # The largest weight among those that find the most passages.
    best = max(recalls.values())
    assert result["vector_weight"] == max(float(w) for w, r in recalls.items() if r == best)
    chosen = result["min_similarity"]
    nurse = {"Authorization": f"Bearer {tokens['clinician']}"}
    for question, answerable, _ in cases:
        best = httpx.post(
            f"{server.url}/v1/retrieve",
            headers=nurse,
            json={"query": question, "collections": ["protocols"]},
        ).json()
        assert (best["data"][0]["similarity"] >= chosen) == (answerable == "yes"), question
        assert best["min_similarity"] == pytest.approx(chosen)
    listed = httpx.get(f"{server.url}/v1/collections", headers=nurse).json()["data"]
    assert listed[0]["min_similarity"] == pytest.approx(chosen)
    assert listed[0]["vector_weight"] == result["vector_weight"]
    (record,) = [
        r for r in audit_rows(state) if (r.get("content") or {}).get("action") == "docs.calibrate"
    ]
    assert record["content"]["suite_sha256"] == hashlib.sha256(suite.read_bytes()).hexdigest()
    body = grounded(
        server,
        tokens["clinician"],
        "Who painted the Mona Lisa?",
        model_name,
        appliance_grounding={"collections": ["protocols"]},
    )
    assert body["appliance_grounding"]["no_source"] is True
    assert body["appliance_grounding"]["threshold"] == pytest.approx(chosen, abs=1e-4)


def test_the_status_page_lists_the_collections(
    library: tuple[Server, Path, Path, dict[str, str]],
) -> None:
    server, _, _, _ = library
    page = server.http.get("/status").text
    assert "<tr><td>plant</td><td>1</td><td>line, admin</td>" in page
    assert "<tr><td>protocols</td><td>2</td><td>clinician, admin</td>" in page
