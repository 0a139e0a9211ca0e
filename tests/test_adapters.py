"""Specialists for real: LoRA adapters made by the tests (tests/loras.py, the `gguf`
package) on the default model, served by the real server to the `openai` SDK. Scale 0
is the base model's answer, scale 1 another; concurrent streams to the base and to
specialists each get their own model's answer; a wrong base or architecture is
refused with both values; the audit names every file; roles are kept."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI

from appliance.auth.store import AuthStore
from appliance.config import load_settings
from appliance.registry import Manifest

from helpers import Server, audit_rows, make_state, metric, start_server
from loras import write_lora

pytestmark = pytest.mark.server
PROMPT = "Name three colours of the rainbow."
WRONG = "ab" * 32


def adapter_toml(name: str, base: Manifest, sha: str, base_sha256: str) -> str:
    return (
        f'name = "{name}"\nkind = "adapter"\nfile = "{name}.gguf"\nsha256 = "{sha}"\n'
        'format = "gguf"\nlicense = "Apache-2.0"\nsource = "made by tests/loras.py"\n'
        f'[adapter]\nbase = "{base.name}"\nbase_sha256 = "{base_sha256}"\nrank = 4\n'
        'alpha = 4\n[provenance]\nmade_by = "tests"\n'
    )


def specialist_toml(name: str, base: str, adapter: str, scale: float, extra: str = "") -> str:
    return (
        f'name = "{name}"\nkind = "specialist"\nbase = "{base}"\n{extra}\n'
        f'[[adapters]]\nname = "{adapter}"\nscale = {scale}\n'
    )


@pytest.fixture(scope="module")
def specialists(
    tmp_path_factory: pytest.TempPathFactory, model_file: Path, default_model: Manifest
) -> Iterator[tuple[Server, Path, str]]:
    state = make_state(tmp_path_factory.mktemp("adapters") / "state", model_file)
    manifests = state / "manifests"
    manifests.mkdir()
    for name, arch in (("ward-lora", None), ("alien-lora", None), ("gemma-lora", "gemma3")):
        path = write_lora(state / "models" / f"{name}.gguf", model_file, architecture=arch)
        sha = hashlib.sha256(path.read_bytes()).hexdigest()
        claimed = WRONG if name == "alien-lora" else default_model.sha256
        (manifests / f"{name}.toml").write_text(adapter_toml(name, default_model, sha, claimed))
    base = default_model.name
    for name, adapter, scale, extra in (
        ("zero", "ward-lora", 0.0, ""),
        ("ward", "ward-lora", 1.0, 'roles = ["admin", "line"]'),
        ("wrong-base", "alien-lora", 1.0, ""),
        ("wrong-arch", "gemma-lora", 1.0, ""),
    ):
        (manifests / f"{name}.toml").write_text(specialist_toml(name, base, adapter, scale, extra))
    store = AuthStore(load_settings(env={}, overrides={"state_dir": state}))
    try:
        clinician = str(store.create_token("nurse", "clinician")["token"])
    finally:
        store.close()
    server = start_server(state, "--context-size", "512", "--parallel-streams", "2")
    yield server, state, clinician
    server.stop()


def sdk(server: Server, token: str | None = None) -> OpenAI:
    return OpenAI(
        base_url=f"{server.url}/v1", api_key=token or server.token, max_retries=0, timeout=120
    )


def answer(client: OpenAI, model: str, stream: bool = False) -> str:
    messages: Any = [{"role": "user", "content": PROMPT}]
    if not stream:
        reply = client.chat.completions.create(
            model=model, messages=messages, max_tokens=12, temperature=0
        )
        return reply.choices[0].message.content or ""
    parts = []
    for chunk in client.chat.completions.create(
        model=model, messages=messages, max_tokens=12, temperature=0, stream=True
    ):
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
    return "".join(parts)


def test_scale_0_is_the_base_and_scale_1_is_not(
    specialists: tuple[Server, Path, str], default_model: Manifest
) -> None:
    server, _, _ = specialists
    client = sdk(server)
    base = answer(client, default_model.name)
    assert base and answer(client, "zero") == base
    ward = answer(client, "ward")
    assert ward and ward != base
    cards = {m.id: m.model_extra for m in client.models.list().data}
    assert cards["ward"]["kind"] == "specialist" and cards["ward"]["base"] == default_model.name  # type: ignore[index]
    assert cards["ward"]["adapters"][0]["scale"] == 1.0  # type: ignore[index]
    assert "ward-lora" not in cards  # an adapter is no model of its own
    # It runs where its base runs (one copy of the weights), counted once in /metrics.
    assert cards["ward"]["placement"] == cards[default_model.name]["placement"]  # type: ignore[index]
    assert metric(server, "appliance_llama_layers", model=default_model.name, on="cpu") == 31
    assert metric(server, "appliance_llama_layers", -1, model="ward", on="cpu") == -1


def test_prefixes_never_cross_adapters_in_either_order_or_at_once(
    specialists: tuple[Server, Path, str], default_model: Manifest
) -> None:
    server, _, _ = specialists
    client = sdk(server)
    base_name = default_model.name
    solo = {name: answer(client, name) for name in (base_name, "ward", "zero")}
    # One after the other, both orders: the same prompt, each model its own answer.
    for order in ((base_name, "ward"), ("ward", base_name), ("zero", "ward", base_name)):
        for name in order:
            assert answer(client, name, stream=True) == solo[name], (order, name)
    # And all at once, twice each, as streams.
    got: dict[str, list[str]] = {}
    lock = threading.Lock()

    def run(name: str) -> None:
        text = answer(sdk(server), name, stream=True)
        with lock:
            got.setdefault(name, []).append(text)

    threads = [threading.Thread(target=run, args=(n,)) for n in solo for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert got == {name: [text, text] for name, text in solo.items()}


def test_a_wrong_base_or_architecture_is_refused_with_both_values(
    specialists: tuple[Server, Path, str], default_model: Manifest
) -> None:
    server, _, _ = specialists
    body = httpx.get(f"{server.url}/readyz").json()
    states = {m["name"]: m for m in body["models"]}
    reason = states["wrong-base"]["reason"]
    assert WRONG in reason and default_model.sha256 in reason
    assert body["ready"]  # a refused specialist is not pinned: the service serves
    client = sdk(server)
    with pytest.raises(openai.APIStatusError) as refused:
        answer(client, "wrong-base")
    assert refused.value.status_code == 503
    with pytest.raises(openai.APIStatusError) as arch:
        answer(client, "wrong-arch")
    assert arch.value.status_code == 503
    message = str(arch.value)
    assert "architecture 'gemma3'" in message and "is 'llama'" in message


def test_every_answer_names_its_specialist_base_and_adapters(
    specialists: tuple[Server, Path, str], default_model: Manifest
) -> None:
    server, state, _ = specialists
    reply = sdk(server).chat.completions.with_raw_response.create(
        model="ward", messages=[{"role": "user", "content": "Hi"}], max_tokens=4
    )
    request_id = reply.headers["X-Request-Id"]
    request, outcome = [r for r in audit_rows(state) if r["request_id"] == request_id]
    served = request["content"]["served_by"]
    assert request["model"] == outcome["model"] == "ward"
    assert served["base_sha256"] == default_model.sha256
    lora = (Path(state) / "models" / "ward-lora.gguf").read_bytes()
    assert served["adapters"] == [
        {"name": "ward-lora", "sha256": hashlib.sha256(lora).hexdigest(), "scale": 1.0}
    ]
    assert request["model_sha256"] == outcome["model_sha256"] == served["sha256"]


def test_a_role_not_allowed_a_specialist_gets_403(specialists: tuple[Server, Path, str]) -> None:
    server, _, clinician = specialists
    client = sdk(server, clinician)
    with pytest.raises(openai.PermissionDeniedError) as denied:
        answer(client, "ward")
    assert "role 'clinician' may not use specialist 'ward'" in str(denied.value)
    assert "ward" not in [m.id for m in client.models.list().data]
    assert answer(client, "zero")  # a specialist without roles: anyone the route allows


def test_a_server_with_specialists_loaded_stops_cleanly(
    specialists: tuple[Server, Path, str],
) -> None:
    """Specialists are closed before their base: the base's weights (and the adapters
    llama.cpp ties to them) outlive every context over them. The other order crashed
    the process in a specialist's last step, before the audit log was sealed."""
    server, _, _ = specialists
    answer(sdk(server), "ward")  # loaded, with its base
    assert server.stop() == 0, server.stderr[-20:]  # a crash would be -11 (SIGSEGV)
