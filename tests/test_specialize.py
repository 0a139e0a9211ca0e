"""A specialist made on the box, end to end: the line's maintenance log (made by
models/line/maintenance.py), `appliance specialize` on the default model, stopped by
its memory bound and resumed, scored on held-out examples before and after through
llama.cpp, installed with its provenance, and served: it answers the plant's defect
codes that neither the base model nor the larger generalist knows."""

from __future__ import annotations

import hashlib
import json
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from openai import OpenAI

from appliance.config import load_settings
from appliance.registry import Manifest, load_manifests
from appliance.training.specialize import TrainingError, read_examples

from helpers import REPO, Server, add_garden, audit_rows, make_state, run_cli, start_server

# The module's training (two `appliance specialize` runs) took 135-145 s on 2-core
# hosts; its subprocess limits (900 s, 1,500 s) say when it ran too long, not pytest's 300.
pytestmark = pytest.mark.timeout(2500)

NAME = "line-codes"
GEMMA = "gemma-3-270m"


def test_the_training_model_is_llama_cpp_s_model(model_file: Path) -> None:
    """The torch model training runs on reads the GGUF's own weights in llama.cpp's
    layout: its next-token choice is llama.cpp's, but for near-ties (llama.cpp's 8-bit
    activations move the logits a little, well under their spread)."""
    import llama_cpp

    from appliance.engines import kernels
    from appliance.training.llama_torch import LlamaLora, read_weights

    kernels.plan()
    shape, weights = read_weights(model_file)
    model = LlamaLora(shape, weights)
    llm = llama_cpp.Llama(str(model_file), n_ctx=128, logits_all=True, verbose=False)
    try:
        ids = llm.tokenize(b"The pump on line 3 leaks oil at the seal, so the", add_bos=True)
        llm.eval(ids)
        theirs = np.array(llm.scores[: len(ids)])
    finally:
        llm.close()
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0].numpy()
    same = ours.argmax(-1) == theirs.argmax(-1)
    assert same.mean() >= 0.9, same
    for position in np.flatnonzero(~same):  # only near-ties may go the other way
        theirs_pick = theirs[position].argmax()
        assert ours[position].max() - ours[position][theirs_pick] < 0.5, position
    assert np.abs(ours - theirs).max() < 0.25 * theirs.std()


def test_examples_are_checked_line_by_line(tmp_path: Path) -> None:
    data = tmp_path / "bad.jsonl"
    good = json.dumps(
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    )
    data.write_text(good + "\n" + good + "\n" + '{"messages": [{"role": "user"}]}\n')
    with pytest.raises(TrainingError, match=r"bad.jsonl:3: needs 'messages', at least two"):
        read_examples(data)
    data.write_text(
        good
        + "\n"
        + json.dumps(
            {"messages": [{"role": "user", "content": "x"}, {"role": "user", "content": "y"}]}
        )
        + "\n"
    )
    with pytest.raises(TrainingError, match=r":2: the last message must be the answer"):
        read_examples(data)
    data.write_text(good + "\n")
    with pytest.raises(TrainingError, match="has 1 examples; at least 5"):
        read_examples(data)


@pytest.fixture(scope="module")
def trained(
    tmp_path_factory: pytest.TempPathFactory,
    model_file: Path,
    garden_manifests: dict[str, Manifest],
) -> Iterator[tuple[Path, dict[str, Any], Path]]:
    """`appliance specialize` run as IT runs it: stopped by its memory bound once,
    then resumed to the end."""
    work = tmp_path_factory.mktemp("specialize")
    state = make_state(work / "state", model_file)
    add_garden(state, garden_manifests)
    data = work / "maintenance.jsonl"
    subprocess.run(
        [sys.executable, str(REPO / "models/line/maintenance.py"), str(data), "--count", "150"],
        check=True,
    )
    args = [
        "specialize", "--base", "smollm2-135m-instruct", "--data", str(data), "--name", NAME,
        "--epochs", "4", "--learning-rate", "0.004", "--targets",
        "attn_q,attn_k,attn_v,attn_output", "--json",
    ]  # fmt: skip
    stopped = run_cli(*args, "--max-memory-mb", "256", state=state, timeout=900)
    assert stopped.returncode == 1
    assert "over the bound of 256 MiB (--max-memory-mb)" in stopped.stderr
    assert "--resume continues" in stopped.stderr
    resumed = run_cli(*args, "--resume", state=state, timeout=1500)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    yield state, json.loads(resumed.stdout), data


def test_the_specialist_learns_what_the_base_does_not_know(
    trained: tuple[Path, dict[str, Any], Path],
) -> None:
    state, report, data = trained
    assert report["held_out"] == 30 and report["steps"] > 0
    assert report["held_out_before"] <= 0.1  # the plant's own codes: the base cannot know
    assert report["held_out_after"] >= report["held_out_before"] + 0.5, report
    settings = load_settings(env={}, overrides={"state_dir": state})
    manifests = load_manifests(settings)
    adapter, specialist = manifests[f"{NAME}-lora"], manifests[NAME]
    assert adapter.adapter is not None and specialist.specialist is not None
    provenance = dict(adapter.adapter.provenance)
    kept = state / "training" / NAME / "data.jsonl"
    assert provenance["training_data_sha256"] == hashlib.sha256(data.read_bytes()).hexdigest()
    # Written to three places, as the manifest shows it (28 of 30 is 0.933).
    assert provenance["held_out_exact_after"] == f"{report['held_out_after']:.3f}"
    assert json.loads(provenance["hyperparameters"])["epochs"] == 4
    assert specialist.specialist.adapters == ((f"{NAME}-lora", 1.0),)
    assert (
        specialist.specialist.system_prompt and "defect code" in specialist.specialist.system_prompt
    )
    # The examples stay in the state directory, the service user's alone.
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600
    assert stat.S_IMODE(kept.parent.stat().st_mode) == 0o700
    # The run is an audited event: who, which data, which result.
    actions = [row["content"] for row in audit_rows(state) if row["kind"] == "admin"]
    [run] = [a for a in actions if a and a.get("action") == "specialize"]
    assert run["training_data_sha256"] == report["training_data_sha256"]
    assert run["held_out_after"] == report["held_out_after"]


@pytest.fixture(scope="module")
def served(trained: tuple[Path, dict[str, Any], Path]) -> Iterator[Server]:
    state, _, _ = trained
    server = start_server(state, "--context-size", "512", "--parallel-streams", "2")
    yield server
    server.stop()


def held_out_examples(state: Path) -> list[dict[str, Any]]:
    """The examples the training kept back, as it recorded them (by line)."""
    work = state / "training" / NAME
    lines = set(json.loads((work / "held_out.json").read_text()))
    examples = read_examples(work / "data.jsonl")
    return [{"messages": e.messages} for e in examples if e.line in lines]


def exact(client: OpenAI, model: str, examples: list[dict[str, Any]], system: bool) -> float:
    right = 0
    for example in examples:
        messages = example["messages"] if system else example["messages"][1:]
        reply = client.chat.completions.create(
            model=model, messages=messages[:-1], max_tokens=8, temperature=0
        )
        answer = " ".join((reply.choices[0].message.content or "").split()).casefold()
        right += answer == messages[-1]["content"].casefold()
    return right / len(examples)


def test_served_it_beats_the_base_and_the_larger_generalist(
    served: Server, trained: tuple[Path, dict[str, Any], Path]
) -> None:
    """Through the real server and the openai SDK, on the held-out examples: the
    specialist (its system prompt given by its manifest, so the request sends only the
    note) against the base and Gemma 3 270M, each given the handbook's instruction."""
    state, _, _ = trained
    client = OpenAI(base_url=f"{served.url}/v1", api_key=served.token, max_retries=0, timeout=120)
    assert NAME in [m.id for m in client.models.list().data]
    examples = held_out_examples(state)[:12]
    specialist = exact(client, NAME, examples, system=False)
    base = exact(client, "smollm2-135m-instruct", examples, system=True)
    generalist = exact(client, GEMMA, examples, system=True)
    assert specialist >= base + 0.5 and specialist >= generalist + 0.5, (
        specialist,
        base,
        generalist,
    )


def test_serving_never_imports_training() -> None:
    """The training extra is optional: the app, the CLI and the server import no torch
    (and `appliance specialize` says which extra to install when it is missing)."""
    code = (
        "import sys; import appliance.app, appliance.cli, appliance.server; "
        "assert 'torch' not in sys.modules and 'appliance.training' not in sys.modules, "
        "sorted(m for m in sys.modules if 'torch' in m or 'training' in m)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def test_a_name_is_a_name_not_a_path(tmp_path: Path, model_file: Path) -> None:
    from appliance.training.specialize import TrainConfig, train

    state = make_state(tmp_path / "state", model_file)
    settings = load_settings(env={}, overrides={"state_dir": state})
    data = tmp_path / "d.jsonl"
    data.write_text("")
    for bad in ("../outside", "UPPER", "a/b"):
        with pytest.raises(TrainingError, match="must match"):
            train(settings, data, "smollm2-135m-instruct", bad, TrainConfig())
    with pytest.raises(TrainingError, match="exists already"):
        train(settings, data, "smollm2-135m-instruct", "smollm2-135m-instruct", TrainConfig())
    assert not (tmp_path / "outside").exists() and not (state / "training").exists()
