"""The clinicians' page in a real browser (Debian's Chromium driven by Playwright)
against the real server: sign in, ask, read the answer as it streams, stop it, sign
out, idle timeout, keyboard only, nothing kept in the browser, nothing fetched from
anywhere but the appliance. Screenshots of the main states go to test-artifacts/."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, Page, Route

from appliance.auth.store import AuthStore
from appliance.config import Settings, load_settings

from helpers import (
    REPO,
    Server,
    ServerFactory,
    add_garden,
    make_state,
    model_state,
    start_server,
    wait_for,
)

pytestmark = pytest.mark.server

ARTIFACTS = REPO / "test-artifacts"
PASSWORD = "correct horse battery"


def add_user(state: Path, name: str, role: str = "clinician") -> None:
    store = AuthStore(load_settings(env={}, overrides={"state_dir": state}))
    try:
        store.add_user(name, role, PASSWORD)
    finally:
        store.close()


@pytest.fixture(scope="module")
def web(
    tmp_path_factory: pytest.TempPathFactory, model_file: Path, garden_manifests: dict[str, Any]
) -> Iterator[Server]:
    state = make_state(tmp_path_factory.mktemp("web") / "state", model_file)
    add_garden(state, garden_manifests)  # a second chat model, and an embedding model
    for name in ("nurse.ana", "nurse.ben", "nurse.cy", "nurse.dee"):
        add_user(state, name)
    add_user(state, "it.admin", "admin")
    server = start_server(state)
    yield server
    server.stop()


def shot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def sign_in(page: Page, server: Server, name: str) -> None:
    page.goto(f"{server.url}/login")
    page.fill("#username", name)
    page.fill("#password", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(f"{server.url}/")
    page.wait_for_selector("#model option", state="attached")


def questions_with(page: Page, **fields: Any) -> None:
    """Every question the page sends goes out with ``fields`` set over its own body: a
    long answer to watch or stop, a greedy one, or a short one for the tests that are
    not about an answer's length. Left to the server, a sampled answer may run to the
    site's max_tokens (2048), over a minute on a slow 2-core host, and a pretrained base
    (gemma-3-270m) always does, never ending its turn."""

    def rewritten(route: Route) -> None:
        body = json.loads(route.request.post_data or "{}")
        route.continue_(post_data=json.dumps({**body, **fields}))

    page.route("**/v1/chat/completions", rewritten)


def questions_sent(page: Page) -> list[dict[str, Any]]:
    """The bodies of the chat completions the page sends, as it sends them."""
    bodies: list[dict[str, Any]] = []
    page.on(
        "request",
        lambda r: (
            bodies.append(json.loads(r.post_data or "{}"))
            if r.url.endswith("/v1/chat/completions")
            else None
        ),
    )
    return bodies


def answers(page: Page) -> Any:
    return page.locator(".message.assistant .content")


def test_sign_in_ask_stream_multi_turn_and_sign_out(browser: Browser, web: Server) -> None:
    context = browser.new_context()
    page = context.new_page()
    requests: list[str] = []
    bodies = questions_sent(page)
    keys: list[str | None] = []  # X-Conversation-Id each question was sent with
    page.on("request", lambda r: requests.append(r.url))
    page.on(
        "request",
        lambda r: (
            keys.append(r.headers.get("x-conversation-id"))
            if r.url.endswith("/v1/chat/completions")
            else None
        ),
    )
    questions_with(page, max_tokens=80, ignore_eos=True)  # long enough to watch it grow
    sign_in(page, web, "nurse.ana")
    assert page.inner_text("#notice") == "Processed on this appliance. Nothing leaves the site."
    assert "nurse.ana" in page.inner_text("#user")
    shot(page, "01-signed-in")

    page.fill("#question", "Tell me about the sea.")
    page.click("#ask")
    seen: list[int] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and page.locator(".audit-id").count() == 0:
        if answers(page).count():
            seen.append(len(answers(page).first.inner_text()))
        time.sleep(0.02)
    assert page.locator(".audit-id").count() == 1, page.inner_text("#status")
    partial = sorted({n for n in seen if n > 0})
    assert len(partial) >= 2, f"the answer did not grow token by token: {partial}"
    first_answer = answers(page).first.inner_text()
    assert first_answer
    assert re.fullmatch(r"Audit id: [0-9a-f]{32}", page.inner_text(".audit-id"))
    shot(page, "02-answered")

    page.fill("#question", "And what lives in it?")
    page.keyboard.press("Control+Enter")
    page.locator(".audit-id").nth(1).wait_for(timeout=60000)
    assert bodies[0]["temperature"] == 0.7  # a plain model: a little cooler than 1
    second = bodies[-1]["messages"]
    assert [m["role"] for m in second] == ["user", "assistant", "user"]
    assert second[1]["content"] == first_answer  # the conversation goes along
    # ... with the key its first answer carried, so a balancer keeps it on one box.
    assert keys[0] is None and keys[1] is not None and keys[1].startswith("c-"), keys
    page.click("#clear")
    page.fill("#question", "Something new.")
    page.click("#ask")
    page.locator(".audit-id").first.wait_for(timeout=60000)
    assert keys[2] is None  # a new conversation starts without one

    storage = page.evaluate("""async () => ({
        local: localStorage.length, session: sessionStorage.length,
        idb: (await indexedDB.databases()).length, cookie: document.cookie})""")
    assert storage == {"local": 0, "session": 0, "idb": 0, "cookie": ""}
    assert [c["name"] for c in context.cookies()] == ["appliance_session"]

    page.click("#signout")
    page.wait_for_url(f"{web.url}/login")
    assert first_answer not in page.content()
    page.goto(f"{web.url}/")
    assert page.url == f"{web.url}/login"  # the session is over
    shot(page, "03-signed-out")
    assert requests and all(url.startswith(web.url + "/") for url in requests), requests
    context.close()


def test_stop_stops_the_stream(browser: Browser, web: Server, model_name: str) -> None:
    context = browser.new_context()
    page = context.new_page()
    questions_with(page, max_tokens=1500, ignore_eos=True)  # something to stop
    sign_in(page, web, "nurse.ben")
    page.fill("#question", "Write a very long story.")
    page.click("#ask")
    assert wait_for(
        lambda: answers(page).count() > 0 and len(answers(page).first.inner_text()) > 20, 60
    )
    assert page.is_enabled("#stop")
    page.click("#stop")
    page.wait_for_selector(".audit-id")
    assert page.inner_text("#status") == "Stopped."
    stopped = answers(page).first.inner_text()
    # The server has dropped the generation: no token is on its way any more ...
    assert wait_for(lambda: model_state(web.url, model_name)["busy"] is False, 5)
    # ... and none already in the page's queue is shown: once the tasks queued before
    # this one have run, the answer still stands where it stopped.
    page.evaluate("() => new Promise(done => setTimeout(done, 0))")
    assert answers(page).first.inner_text() == stopped
    shot(page, "04-stopped")
    context.close()


def test_keyboard_only(browser: Browser, web: Server) -> None:
    context = browser.new_context()
    page = context.new_page()
    questions_with(page, max_tokens=48)
    page.goto(f"{web.url}/login")
    # The name field takes the focus by itself (autofocus): type once it has it.
    assert wait_for(lambda: page.evaluate("document.activeElement.id") == "username", 10)
    page.keyboard.type("nurse.cy")
    page.keyboard.press("Tab")
    page.keyboard.type(PASSWORD)
    page.keyboard.press("Enter")
    page.wait_for_url(f"{web.url}/")
    page.wait_for_selector("#model option", state="attached")
    for _ in range(12):
        if page.evaluate("document.activeElement.id") == "question":
            break
        page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "question"
    page.keyboard.type("What is a pulse oximeter?")
    page.keyboard.press("Control+Enter")
    page.wait_for_selector(".audit-id", timeout=60000)
    labels = page.evaluate("""() => [...document.querySelectorAll('select, textarea')]
        .map(e => !!document.querySelector(`label[for="${e.id}"]`))""")
    assert labels == [True, True, True]  # model, sources, question: each labelled
    assert page.get_attribute("#conversation", "aria-live") == "polite"
    shot(page, "05-keyboard")
    context.close()


def test_idle_timeout_signs_out(browser: Browser, web: Server) -> None:
    context = browser.new_context()
    page = context.new_page()
    page.clock.install()
    sign_in(page, web, "nurse.dee")
    idle = int(page.get_attribute("body", "data-idle-seconds") or "0")
    assert idle == 15 * 60
    page.clock.fast_forward(idle * 1000 + 1000)
    page.wait_for_url(f"{web.url}/login?expired=1")
    assert "inactivity" in page.inner_text("main")
    page.goto(f"{web.url}/")
    assert page.url == f"{web.url}/login"  # the appliance ended the session too
    shot(page, "06-idle-timeout")
    context.close()


def test_signed_out_and_network_lost_states(
    browser: Browser, server_factory: ServerFactory, tmp_path: Path, model_file: Path
) -> None:
    state = make_state(tmp_path / "state", model_file)
    add_user(state, "nurse.eve")
    server = server_factory(state)
    context = browser.new_context()
    page = context.new_page()
    sign_in(page, server, "nurse.eve")
    store = AuthStore(load_settings(env={}, overrides={"state_dir": state}))
    store.disable_user("nurse.eve")  # IT disables the account meanwhile
    store.close()
    page.fill("#question", "Hello?")
    page.click("#ask")
    page.wait_for_selector("#status a[href='/login']")
    assert "signed out" in page.inner_text("#status")
    assert answers(page).count() == 0
    shot(page, "07-signed-out-state")

    add_user(state, "nurse.fay")
    other = browser.new_context().new_page()
    sign_in(other, server, "nurse.fay")
    server.stop()
    other.fill("#question", "Are you there?")
    other.click("#ask")
    other.wait_for_selector("#status:has-text('Network lost')")
    assert other.input_value("#question") == "Are you there?"  # kept for another try
    shot(other, "08-network-lost")
    context.close()


def test_the_picker_offers_chat_models_and_says_which_load_on_first_use(
    browser: Browser, web: Server
) -> None:
    """The embedding model is for search, not for questions: it is not offered. A chat
    model that is not loaded says it takes a moment on its first question, and
    answers."""
    context = browser.new_context()
    page = context.new_page()
    questions_with(page, max_tokens=24)
    sign_in(page, web, "nurse.cy")
    options = page.locator("#model option").all_inner_texts()
    assert not any("minilm" in o for o in options), options
    [gemma] = [o for o in options if o.startswith("gemma-3-270m")]
    assert "loads when first asked" in gemma
    [smol] = [o for o in options if o.startswith("smollm2-135m-instruct")]
    assert "loads when first asked" not in smol  # pinned: always loaded
    page.select_option("#model", "gemma-3-270m")
    page.fill("#question", "Name a colour.")
    page.click("#ask")
    page.wait_for_selector(".message.assistant .content:not(:empty)", timeout=90_000)
    page.wait_for_selector("#ask:not([disabled])", timeout=90_000)
    assert page.locator(".message.assistant .audit-id").count() == 1  # answered, and audited
    shot(page, "10-second-model")
    assert model_state(web.url, "gemma-3-270m")["state"] == "ready"
    context.close()


def test_status_page_for_it(browser: Browser, web: Server) -> None:
    context = browser.new_context()
    page = context.new_page()
    sign_in(page, web, "it.admin")
    page.goto(f"{web.url}/status")
    text = page.inner_text("main")
    for fragment in (
        "smollm2-135m-instruct",
        "line-anomaly",
        "audit chain",
        "tls certificate",
        "memory",
        "Memory for models",
        "embedding (onnx)",
        "ready, pinned",
    ):
        assert fragment in text
    rows = {r.split("\t")[0]: r for r in page.inner_text("table tbody").splitlines()}
    assert "unloaded" in rows["minilm-l6-v2"]  # nobody asked it anything
    assert page.inner_text("#drain").startswith("Taking work")
    shot(page, "09-status")
    try:  # a drained box says so where IT looks
        web.http.post("/admin/drain", json={"draining": True, "reason": "kernel update"})
        page.goto(f"{web.url}/status")
        drain = page.inner_text("#drain")
        assert drain.startswith("Draining since") and "kernel update" in drain, drain
    finally:
        web.http.post("/admin/drain", json={"draining": False})
    # The same header as the questions page: who, sign-out, and the way back.
    assert "it.admin" in page.inner_text("#user") and page.locator("#signout").count() == 1
    page.click("#nav-ask")
    page.wait_for_url(f"{web.url}/")
    page.click("#nav-status")
    page.wait_for_url(f"{web.url}/status")
    clinician = browser.new_context().new_page()
    sign_in(clinician, web, "nurse.ana")
    assert clinician.locator("#nav-status").count() == 0  # IT's page is not offered
    refused = clinician.goto(f"{web.url}/status")
    assert refused is not None and refused.status == 403
    assert clinician.inner_text("h1") == "This page is for IT"
    assert "nurse.ana: role clinician may not use /status" in clinician.inner_text("#forbidden")
    assert "administrators" in clinician.inner_text("#forbidden")
    assert clinician.locator("#signout").count() == 1
    context.close()


def test_the_caution_and_the_icon(browser: Browser, web: Server) -> None:
    """The caution shows when the page opens and under every answer; the icon is the
    appliance's own (no 404 in the console)."""
    page = browser.new_context().new_page()
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    questions_with(page, max_tokens=24)
    sign_in(page, web, "nurse.cy")
    wording = Settings.__dataclass_fields__["answer_caution"].default
    assert page.inner_text("#caution-text") == wording
    assert page.is_visible("#caution")
    page.click("#caution-ok")
    assert not page.is_visible("#caution")
    page.fill("#question", "Say hello.")
    page.click("#ask")
    page.locator(".audit-id").wait_for(timeout=60000)
    assert page.inner_text(".message.assistant .caution-note") == wording
    assert problems == []
    href = page.get_attribute("link[rel=icon]", "href")
    assert href == "/favicon.ico"
    icon = page.request.get(f"{web.url}{href}")  # as the browser would, with its session
    assert icon.status == 200 and icon.headers["content-type"] == "image/svg+xml"
    assert httpx.get(f"{web.url}/favicon.ico").status_code == 200  # no session needed


def test_the_caution_is_the_sites_wording(
    browser: Browser, server_factory: ServerFactory, tmp_path: Path, model_file: Path
) -> None:
    state = make_state(tmp_path / "state", model_file)
    add_user(state, "nurse.fay")
    server = server_factory(state, "--answer-caution", "Check with the ward pharmacist.")
    page = browser.new_context().new_page()
    sign_in(page, server, "nurse.fay")
    assert page.inner_text("#caution-text") == "Check with the ward pharmacist."


def test_the_page_answers_on_a_site_that_allows_shorter_answers(
    browser: Browser, server_factory: ServerFactory, tmp_path: Path, model_file: Path
) -> None:
    """The page asks for no answer length of its own: the server's bound decides (the
    site's max_tokens, what the context has left, a specialist's default), so a site
    that allows fewer tokens than a page might ask for still answers its clinicians."""
    state = make_state(tmp_path / "state", model_file)
    add_user(state, "nurse.hal")
    server = server_factory(state, "--max-tokens", "24")
    page = browser.new_context().new_page()
    bodies = questions_sent(page)
    sign_in(page, server, "nurse.hal")
    page.fill("#question", "Tell me about the sea.")
    page.click("#ask")
    page.locator(".audit-id").first.wait_for(timeout=60000)
    assert answers(page).first.inner_text()
    assert "max_tokens" not in bodies[0]
    # The request's log line is written when the stream closes, after its last byte.
    assert wait_for(lambda: any(r.get("completion_tokens") for r in server.request_logs()), 10)
    completion = next(r for r in server.request_logs() if r.get("completion_tokens"))
    assert completion["completion_tokens"] <= 24


def test_busy_state_says_when_to_retry(
    browser: Browser,
    server_factory: ServerFactory,
    tmp_path: Path,
    model_file: Path,
    model_name: str,
) -> None:
    state = make_state(tmp_path / "state", model_file)
    add_user(state, "nurse.gil")
    server = server_factory(state, "--queue-depth", "0", "--parallel-streams", "1")
    with (
        server.client() as client,
        client.stream(
            "POST",
            "/v1/completions",
            json={
                "model": model_name,
                "prompt": "Once",
                "max_tokens": 1500,
                "ignore_eos": True,
                "stream": True,
            },
        ) as occupying,
    ):
        lines = occupying.iter_lines()
        next(line for line in lines if line.startswith("data: {"))
        context = browser.new_context(viewport={"width": 820, "height": 1180})  # a tablet
        page = context.new_page()
        sign_in(page, server, "nurse.gil")
        page.fill("#question", "Is anyone free?")
        page.click("#ask")
        page.wait_for_selector("#status:has-text('busy')")
        assert re.search(r"try again in \d+ s", page.inner_text("#status"))
        assert page.input_value("#question") == "Is anyone free?"
        shot(page, "10-busy-tablet")
        context.close()


def _luminance(hex_colour: str) -> float:
    channels = [int(hex_colour[i : i + 2], 16) / 255 for i in (1, 3, 5)]
    linear = [c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in channels]
    return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]


def test_colours_meet_wcag_aa_contrast() -> None:
    css = (REPO / "appliance" / "web" / "static" / "site.css").read_text()
    colours = dict(re.findall(r"--(\w+): (#[0-9a-f]{6})", css))
    disabled = re.search(r"button:disabled \{ background: (#[0-9a-f]{6})", css)
    assert disabled is not None
    pairs = [
        ("ink", "#ffffff"),
        ("brand", "#ffffff"),
        ("muted", "#ffffff"),
        ("error", "#ffffff"),
        ("#ffffff", "brand"),
        ("#ffffff", disabled[1]),
    ]
    for fg, bg in pairs:
        a = _luminance(colours.get(fg, fg))
        b = _luminance(colours.get(bg, bg))
        ratio = (max(a, b) + 0.05) / (min(a, b) + 0.05)
        assert ratio >= 4.5, (fg, bg, ratio)
