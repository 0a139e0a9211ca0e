"""Adapters imported for real: PEFT adapters (adapter_config.json and
adapter_model.safetensors, written here with known random matrices) converted to
llama.cpp's GGUF adapter format for the default model, tensor by tensor as expected; the
converted adapter served by the real server as a specialist answers as one written in
GGUF by hand from the same matrices, and unlike one whose q/k rows were left in Hugging
Face's order; every refusal leaves nothing behind; `appliance adapters import` then
`appliance adapters specialist` make a specialist the server serves."""

from __future__ import annotations

import functools
import hashlib
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
from click.testing import CliRunner
from openai import OpenAI
from safetensors.numpy import save_file

from appliance.adapters import (
    AdapterRefused,
    check_gguf_adapter,
    install_adapter,
    peft_to_gguf,
    write_specialist,
)
from appliance.cli import main
from appliance.config import Settings, load_settings
from appliance.gguf import read_info
from appliance.registry import Manifest, load_manifests

from helpers import Server, audit_rows, make_state, run_cli, start_server
from loras import write_lora

PROMPT = "Name three colours of the rainbow."
RANK, ALPHA = 4, 8.0
LAYERS, N_EMBD, N_HEAD, N_HEAD_KV, HEAD_DIM = 30, 576, 9, 3, 64  # SmolLM2-135M
OUTS = {"q_proj": N_HEAD * HEAD_DIM, "k_proj": N_HEAD_KV * HEAD_DIM, "v_proj": N_HEAD_KV * HEAD_DIM}
GGUF_NAMES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v"}
HEADS = {"q_proj": N_HEAD, "k_proj": N_HEAD_KV}  # the heads each reorder is done over
Matrices = dict[tuple[int, str], tuple[np.ndarray, np.ndarray]]


def peft_name(layer: int, module: str, which: str) -> str:
    return f"base_model.model.model.layers.{layer}.self_attn.{module}.lora_{which}.weight"


def matrices(modules: tuple[str, ...], seed: int = 0, strength: float = 0.05) -> Matrices:
    """lora_A (rank, n_embd) and lora_B (out, rank) per layer and module, as PEFT holds
    them; ``strength`` is high enough to change a greedy answer, low enough that the
    model still writes sentences (at 0.12 it babbles, and two babbles may agree)."""
    rng = np.random.default_rng(seed)
    found: Matrices = {}
    for layer in range(LAYERS):
        for module in modules:
            a = rng.standard_normal((RANK, N_EMBD)).astype(np.float32) * strength
            b = rng.standard_normal((OUTS[module], RANK)).astype(np.float32) * strength
            found[(layer, module)] = (a, b)
    return found


def write_peft(
    directory: Path,
    mats: Matrices,
    config: dict[str, Any] | None = None,
    tensors: dict[str, np.ndarray] | None = None,
) -> Path:
    """A PEFT adapter directory as `PeftModel.save_pretrained` writes it."""
    directory.mkdir(parents=True, exist_ok=True)
    modules = sorted({module for _, module in mats})
    (directory / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct",
                "r": RANK,
                "lora_alpha": ALPHA,
                "lora_dropout": 0.05,
                "target_modules": modules,
                "bias": "none",
                "fan_in_fan_out": False,
                "use_rslora": False,
                "use_dora": False,
                "task_type": "CAUSAL_LM",
                **(config or {}),
            }
        )
    )
    found = {}
    for (layer, module), (a, b) in mats.items():
        found[peft_name(layer, module, "A")] = a
        found[peft_name(layer, module, "B")] = b
    save_file(found if tensors is None else tensors, directory / "adapter_model.safetensors")
    return directory


def to_llama_rows(b: np.ndarray, n_head: int) -> np.ndarray:
    """lora_B's rows in the order llama.cpp's llama architecture wants, written from the
    rotary layouts rather than from the converter: Hugging Face rotates row i of each
    head with row i + head_dim/2, llama.cpp rows 2i and 2i+1, so GGUF row 2i of a head
    is HF row i and GGUF row 2i+1 is HF row i + head_dim/2."""
    head_dim = b.shape[0] // n_head
    half = head_dim // 2
    out = np.empty_like(b)
    for head in range(n_head):
        start = head * head_dim
        for i in range(half):
            out[start + 2 * i] = b[start + i]
            out[start + 2 * i + 1] = b[start + half + i]
    return out


def write_gguf_by_hand(path: Path, mats: Matrices, reorder: bool = True) -> Path:
    """The GGUF adapter the PEFT one should become, written with the gguf package as
    tests/loras.py does: lora_a = A, lora_b = B (its rows reordered for q and k, unless
    ``reorder`` is False: what a converter that forgot the rotary layout would write)."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_string("general.type", "adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", ALPHA)
    for (layer, module), (a, b) in sorted(mats.items()):
        if reorder and module in HEADS:
            b = to_llama_rows(b, HEADS[module])
        writer.add_tensor(f"blk.{layer}.{GGUF_NAMES[module]}.weight.lora_a", a)
        writer.add_tensor(f"blk.{layer}.{GGUF_NAMES[module]}.weight.lora_b", b)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def gguf_tensors(path: Path) -> dict[str, np.ndarray]:
    reader = gguf.GGUFReader(str(path))
    return {t.name: np.array(t.data) for t in reader.tensors}


def settings_for(state: Path) -> Settings:
    return load_settings(env={}, overrides={"state_dir": state})


def read_sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def listing(state: Path) -> list[str]:
    """Every file under the model and manifest directories, hidden ones too."""
    found = []
    for sub in ("models", "manifests"):
        root = state / sub
        if root.is_dir():
            found += sorted(str(p.relative_to(state)) for p in root.rglob("*"))
    return found


# -- conversion -------------------------------------------------------------------------


@pytest.mark.parametrize("modules", [("q_proj", "v_proj"), ("q_proj", "k_proj", "v_proj")])
def test_peft_converts_tensor_by_tensor(
    tmp_path: Path, model_file: Path, modules: tuple[str, ...]
) -> None:
    mats = matrices(modules)
    out = tmp_path / "out.gguf"
    facts = peft_to_gguf(write_peft(tmp_path / "peft", mats), model_file, out)
    assert (facts.architecture, facts.rank, facts.alpha) == ("llama", RANK, ALPHA)
    assert facts.target_modules == tuple(sorted(GGUF_NAMES[m] for m in modules))
    assert facts.tensors == 2 * LAYERS * len(modules) and facts.quantization == "F32"
    assert facts.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    reader = gguf.GGUFReader(str(out))
    meta = {k: reader.fields[k].contents() for k in reader.fields if not k.startswith("GGUF.")}
    assert meta["general.type"] == "adapter" and meta["adapter.type"] == "lora"
    assert meta["general.architecture"] == "llama" and meta["adapter.lora.alpha"] == ALPHA
    got = gguf_tensors(out)
    assert len(got) == facts.tensors
    for (layer, module), (a, b) in mats.items():
        stem = f"blk.{layer}.{GGUF_NAMES[module]}.weight"
        want_b = to_llama_rows(b, HEADS[module]) if module in HEADS else b
        assert got[f"{stem}.lora_a"].dtype == np.float32
        np.testing.assert_array_equal(got[f"{stem}.lora_a"], a)
        np.testing.assert_array_equal(got[f"{stem}.lora_b"], want_b)
        if module in HEADS:  # the reorder is no identity: the check above has teeth
            assert not np.array_equal(want_b, b)
    # What was written is what check_gguf_adapter accepts, with the same facts.
    checked = check_gguf_adapter(out, model_file)
    assert (checked.rank, checked.alpha, checked.target_modules) == (
        RANK,
        ALPHA,
        facts.target_modules,
    )
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_f16_stays_f16_and_bf16_is_widened_exactly(tmp_path: Path, model_file: Path) -> None:
    mats = matrices(("v_proj",))
    half = {k: (a.astype(np.float16), b.astype(np.float16)) for k, (a, b) in mats.items()}
    out = tmp_path / "f16.gguf"
    assert peft_to_gguf(write_peft(tmp_path / "f16", half), model_file, out).quantization == "F16"
    got = gguf_tensors(out)
    np.testing.assert_array_equal(got["blk.0.attn_v.weight.lora_b"], half[(0, "v_proj")][1])
    # bfloat16, which numpy lacks: the file written by hand (header, then raw bytes).
    peft = write_peft(tmp_path / "bf16", mats)
    header: dict[str, Any] = {}
    blobs, offset = [], 0
    for (layer, module), (a, b) in mats.items():
        for which, array in (("A", a), ("B", b)):
            raw = (array.view(np.uint32) >> 16).astype("<u2").tobytes()  # truncated to bf16
            header[peft_name(layer, module, which)] = {
                "dtype": "BF16",
                "shape": list(array.shape),
                "data_offsets": [offset, offset + len(raw)],
            }
            blobs.append(raw)
            offset += len(raw)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    (peft / "adapter_model.safetensors").write_bytes(
        len(text).to_bytes(8, "little") + text + b"".join(blobs)
    )
    a = mats[(3, "v_proj")][0]
    want = ((a.view(np.uint32) >> 16) << 16).view(np.float32)
    # Both ways numpy may meet bfloat16: unknown to it (a fresh process), or known
    # once ml_dtypes is imported (onnx and tritonclient import it: the whole suite).
    plain = tmp_path / "bf16-plain.gguf"
    code = (
        "import sys; from pathlib import Path; from appliance.adapters import peft_to_gguf; "
        "assert 'ml_dtypes' not in sys.modules; "
        f"print(peft_to_gguf(Path({str(peft)!r}), Path({str(model_file)!r}), "
        f"Path({str(plain)!r})).quantization)"
    )
    fresh = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert fresh.returncode == 0 and fresh.stdout.strip() == "F32", fresh.stderr[-2000:]
    np.testing.assert_array_equal(gguf_tensors(plain)["blk.3.attn_v.weight.lora_a"], want)
    import ml_dtypes  # noqa: F401  # numpy now knows bfloat16

    out = tmp_path / "bf16.gguf"
    assert peft_to_gguf(peft, model_file, out).quantization == "F32"
    np.testing.assert_array_equal(gguf_tensors(out)["blk.3.attn_v.weight.lora_a"], want)


def refused(call: Any, *fragments: str) -> str:
    with pytest.raises(AdapterRefused) as caught:
        call()
    message = str(caught.value)
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_peft_refusals_name_the_tensor_the_expected_and_the_got(
    tmp_path: Path, model_file: Path
) -> None:
    mats = matrices(("q_proj", "v_proj"))
    out = tmp_path / "out.gguf"

    def convert(
        name: str,
        config: dict[str, Any] | None = None,
        tensors: dict[str, np.ndarray] | None = None,
    ) -> Any:
        return lambda: peft_to_gguf(
            write_peft(tmp_path / name, mats, config, tensors), model_file, out
        )

    def changed(key: str, value: np.ndarray | None, *more: Any) -> dict[str, np.ndarray]:
        """The adapter's tensors with ``key`` set to ``value`` (None: left out), and
        ``more`` keys and values likewise."""
        found = {}
        for (layer, module), (a, b) in mats.items():
            found[peft_name(layer, module, "A")] = a
            found[peft_name(layer, module, "B")] = b
        pairs = [(key, value), *zip(more[::2], more[1::2], strict=True)]
        for name, array in pairs:
            if array is None:
                del found[name]
            else:
                found[name] = array
        return found

    q_b = peft_name(7, "q_proj", "B")
    refused(convert("missing", tensors=changed(q_b, None)), q_b, "missing")
    refused(
        convert(
            "embd", tensors=changed(peft_name(2, "v_proj", "A"), np.ones((RANK, 512), np.float32))
        ),
        peft_name(2, "v_proj", "A"),
        f"expected shape ({RANK}, {N_EMBD})",
        f"got ({RANK}, 512)",
    )
    refused(
        convert("out", tensors=changed(q_b, np.ones((512, RANK), np.float32))),
        q_b,
        f"expected shape ({N_HEAD * HEAD_DIM}, {RANK})",
        "n_head*head_dim",
    )
    refused(
        convert(
            "layer",
            tensors=changed(
                peft_name(LAYERS, "v_proj", "A"),
                mats[(0, "v_proj")][0],
                peft_name(LAYERS, "v_proj", "B"),
                mats[(0, "v_proj")][1],
            ),
        ),
        peft_name(LAYERS, "v_proj", "A"),
        f"has {LAYERS} layers",
    )
    refused(
        convert(
            "nan", tensors=changed(q_b, np.full((N_HEAD * HEAD_DIM, RANK), np.nan, np.float32))
        ),
        q_b,
        "not finite",
    )
    o_a = "base_model.model.model.layers.0.self_attn.qkv_proj.lora_A.weight"
    refused(
        convert("qkv", {"target_modules": "all-linear"}, changed(o_a, mats[(0, "v_proj")][0])),
        o_a,
        "unknown target module 'qkv_proj'",
    )
    refused(
        convert("declared", {"target_modules": ["q_proj", "v_proj", "k_proj"]}),
        "'k_proj'",
        "no tensors",
    )
    for key, value, says in (
        ("fan_in_fan_out", True, "fan_in_fan_out must be false"),
        ("use_dora", True, "use_dora is not supported"),
        ("use_rslora", True, "use_rslora is not supported"),
        ("bias", "lora_only", "bias must be 'none'"),
        ("modules_to_save", ["lm_head"], "modules_to_save"),
        ("r", 0, "r must be a positive integer"),
    ):
        refused(convert(key, {key: value}), "adapter_config.json", says)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_gguf_refusals(tmp_path: Path, model_file: Path) -> None:
    refused(lambda: check_gguf_adapter(model_file, model_file), "not a LoRA adapter", "'model'")
    gemma = write_lora(tmp_path / "gemma.gguf", model_file, architecture="gemma3")
    refused(lambda: check_gguf_adapter(gemma, model_file), "'gemma3'", "'llama'")
    whole = write_gguf_by_hand(tmp_path / "whole.gguf", matrices(("v_proj",)))
    data = whole.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:-64])
    refused(lambda: check_gguf_adapter(cut, model_file), "truncated", "blk.29.attn_v.weight.lora_b")
    cut.write_bytes(data[:300])
    refused(lambda: check_gguf_adapter(cut, model_file), "not a whole GGUF file")
    mixed = matrices(("v_proj",))
    a, b = mixed[(5, "v_proj")]
    mixed[(5, "v_proj")] = (a[:2], b[:, :2])  # rank 2 in one layer, 4 elsewhere
    uneven = write_gguf_by_hand(tmp_path / "uneven.gguf", mixed)
    refused(
        lambda: check_gguf_adapter(uneven, model_file),
        "blk.5.attn_v.weight.lora_a",
        "rank mismatch, 2 against 4",
    )


# -- installing: the CLI's refusals, and what it leaves ----------------------------------


@pytest.fixture(scope="module")
def cli_state(tmp_path_factory: pytest.TempPathFactory, model_file: Path) -> Path:
    return make_state(tmp_path_factory.mktemp("import") / "state", model_file)


def cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


def cli_import(state: Path, source: Path, name: str, base: str, *extra: str) -> tuple[int, str]:
    return cli(
        "adapters", "import", str(source), "--name", name, "--base", base, *extra,
        "--state-dir", str(state),
    )  # fmt: skip


def test_import_refusals_exit_1_and_leave_nothing(
    cli_state: Path, tmp_path: Path, model_file: Path, default_model: Manifest
) -> None:
    base = default_model.name
    good = write_peft(tmp_path / "good", matrices(("q_proj", "v_proj")))
    code, out = cli_import(cli_state, good, "kept", base)
    assert code == 0, out
    kept = cli_state / "models" / "kept.gguf"
    kept_bytes = kept.read_bytes()
    kept_manifest = (cli_state / "manifests" / "kept.toml").read_text()
    before = listing(cli_state)

    unknown = write_peft(
        tmp_path / "unknown", matrices(("v_proj",)), {"target_modules": ["v_proj", "lm_head"]}
    )
    wrong_rank = dict(matrices(("v_proj",)))
    a, b = wrong_rank[(4, "v_proj")]
    wrong_rank[(4, "v_proj")] = (np.vstack([a, a]), np.hstack([b, b]))  # rank 8 against r = 4
    truncated = write_peft(tmp_path / "truncated", matrices(("v_proj",)))
    weights = truncated / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    cases = [
        (unknown, "nova", "unknown target module 'lm_head'"),
        (write_peft(tmp_path / "rank", wrong_rank), "nova", "rank mismatch, 8 against 4"),
        (truncated, "nova", "is not a whole safetensors file"),
        (
            write_lora(tmp_path / "gemma.gguf", model_file, architecture="gemma3"),
            "nova",
            "is for architecture 'gemma3'; base",
        ),
        (good, base, f"a model named {base!r} exists already"),
        (good, "kept", "a model named 'kept' exists already"),
        (good, "Bad Name", "must match"),
    ]
    for source, name, says in cases:
        code, out = cli_import(cli_state, source, name, base)
        assert code == 1 and says in out, (source, out)
        assert listing(cli_state) == before, source
    # A file in the way of NAME.gguf is not replaced, though no manifest names it.
    (cli_state / "models" / "stray.gguf").write_bytes(b"not mine")
    code, out = cli_import(cli_state, good, "stray", base)
    assert code == 1 and "stray.gguf exists already" in out
    assert (cli_state / "models" / "stray.gguf").read_bytes() == b"not mine"
    (cli_state / "models" / "stray.gguf").unlink()
    code, out = cli_import(cli_state, good, "orphan", "line-anomaly")
    assert code == 1 and "is kind tensor, not chat" in out
    assert kept.read_bytes() == kept_bytes
    assert (cli_state / "manifests" / "kept.toml").read_text() == kept_manifest
    assert listing(cli_state) == before


def test_a_base_that_fails_its_hash_takes_no_adapter(
    tmp_path: Path, model_file: Path, default_model: Manifest
) -> None:
    state = make_state(tmp_path / "state", model_file)
    target = state / "models" / default_model.file
    target.unlink()
    data = bytearray(model_file.read_bytes())
    data[-1] ^= 1
    target.write_bytes(bytes(data))
    lora = write_gguf_by_hand(tmp_path / "v.gguf", matrices(("v_proj",)))
    before = listing(state)
    refused(
        lambda: install_adapter(settings_for(state), lora, "v", default_model.name),
        "cannot take an adapter",
        f"expected {default_model.sha256}",
    )
    assert listing(state) == before


def test_import_list_and_manifest(cli_state: Path, tmp_path: Path, default_model: Manifest) -> None:
    mats = matrices(("q_proj", "v_proj"), seed=3)
    source = write_peft(tmp_path / "ward", mats)
    code, out = cli_import(
        cli_state, source, "ward-notes", default_model.name,
        "--scale", "0.5", "--domain", "wards", "--license", "Apache-2.0", "--json",
    )  # fmt: skip
    assert code == 0, out
    shown = json.loads(out)
    assert shown["name"] == "ward-notes" and shown["base"] == default_model.name
    assert (shown["rank"], shown["alpha"], shown["scale"]) == (RANK, ALPHA, 0.5)
    manifest = load_manifests(settings_for(cli_state))["ward-notes"]
    assert manifest.kind == "adapter" and manifest.file == "ward-notes.gguf"
    assert manifest.domain == "wards" and manifest.license == "Apache-2.0"
    assert manifest.quantization == "F32" and manifest.sha256 == shown["sha256"]
    fit = manifest.adapter
    assert fit is not None and fit.base_sha256 == default_model.sha256
    provenance = dict(fit.provenance)
    assert provenance["format"] == "peft" and provenance["imported_from"] == str(source.resolve())
    assert provenance["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    np.testing.assert_array_equal(
        gguf_tensors(cli_state / "models" / "ward-notes.gguf")["blk.9.attn_v.weight.lora_b"],
        mats[(9, "v_proj")][1],
    )
    code, out = cli("adapters", "list", "--json", "--state-dir", str(cli_state))
    rows = {r["name"]: r for r in json.loads(out)}
    assert rows["ward-notes"]["installed"] is True and rows["ward-notes"]["scale"] == 0.5
    assert rows["ward-notes"]["base_sha256"] == default_model.sha256
    (cli_state / "models" / "ward-notes.gguf").rename(tmp_path / "away.gguf")
    code, out = cli("adapters", "list", "--json", "--state-dir", str(cli_state))
    assert {r["name"]: r for r in json.loads(out)}["ward-notes"]["installed"] is False
    (tmp_path / "away.gguf").rename(cli_state / "models" / "ward-notes.gguf")


def test_a_specialist_needs_adapters_made_for_its_base(
    cli_state: Path, tmp_path: Path, model_file: Path, default_model: Manifest
) -> None:
    settings = settings_for(cli_state)
    lora = write_gguf_by_hand(tmp_path / "v.gguf", matrices(("v_proj",)))
    install_adapter(
        settings, lora, "v-only", default_model.name, provenance={"trained_on": "notes"}
    )
    fit = load_manifests(settings)["v-only"].adapter
    assert fit is not None and dict(fit.provenance)["trained_on"] == "notes"
    # An adapter whose manifest names another file of the base (by hash) is refused, as the
    # pool would refuse the specialist.
    text = (cli_state / "manifests" / "v-only.toml").read_text()
    (cli_state / "manifests" / "v-other.toml").write_text(
        text.replace('"v-only"', '"v-other"').replace(default_model.sha256, "ab" * 32)
    )
    try:
        before = listing(cli_state)
        base = default_model.name
        for adapters, extra, says in (
            (["v-other"], [], f"base {base!r} has sha256 {default_model.sha256}"),
            (["nothing"], [], "adapter 'nothing' does not exist"),
            ([base], [], "is kind chat, not adapter"),
            (["v-only"], ["--role", "nurse"], "role 'nurse' is not one of"),
            (["v-only"], ["--temperature", "3"], "temperature must be a number from 0.0 to 2.0"),
        ):
            args = [a for n in adapters for a in ("--adapter", n)]
            code, out = cli(
                "adapters",
                "specialist",
                "nope",
                "--base",
                base,
                *args,
                *extra,
                "--state-dir",
                str(cli_state),
            )
            assert code == 1 and says in out, out
            assert listing(cli_state) == before
    finally:
        (cli_state / "manifests" / "v-other.toml").unlink()
    manifest = write_specialist(
        settings,
        "v-notes",
        default_model.name,
        [("v-only", 0.75)],
        system_prompt="Be brief.",
        roles=["clinician"],
        sampling={"temperature": 0.2, "max_tokens": 64},
    )
    spec = manifest.specialist
    assert spec is not None and spec.adapters == (("v-only", 0.75),)
    assert (spec.system_prompt, spec.roles, spec.temperature, spec.max_tokens) == (
        "Be brief.",
        ("clinician",),
        0.2,
        64,
    )
    assert load_manifests(settings)["v-notes"] == manifest
    refused(lambda: write_specialist(settings, "v-notes", default_model.name, []), "exists already")


# -- served ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory, model_file: Path, default_model: Manifest
) -> Iterator[tuple[Server, Path]]:
    """One server with specialists of: the converted PEFT adapter (q, k, v), the same
    matrices written in GGUF by hand, the same with q/k rows left in Hugging Face's order,
    and a GGUF adapter imported and made a specialist through the CLI."""
    root = tmp_path_factory.mktemp("served")
    state = make_state(root / "state", model_file)
    settings = settings_for(state)
    base = default_model.name
    mats = matrices(("q_proj", "k_proj", "v_proj"), seed=1)
    install_adapter(settings, write_peft(root / "peft", mats), "peft-qkv", base)
    install_adapter(settings, write_gguf_by_hand(root / "hand.gguf", mats), "hand-qkv", base)
    raw = write_gguf_by_hand(root / "raw.gguf", mats, reorder=False)
    install_adapter(settings, raw, "raw-qkv", base)
    for name in ("peft", "hand", "raw"):
        write_specialist(settings, f"spec-{name}", base, [(f"{name}-qkv", 1.0)])
    lora = write_lora(root / "cli-lora.gguf", model_file, seed=5)
    imported = run_cli(
        "adapters", "import", str(lora), "--name", "cli-lora", "--base", base, state=state
    )
    assert imported.returncode == 0, imported.stderr
    made = run_cli(
        "adapters", "specialist", "cli-spec", "--base", base, "--adapter", "cli-lora:1", state=state
    )
    assert made.returncode == 0, made.stderr
    server = start_server(state, "--context-size", "512", "--parallel-streams", "1")
    yield server, state
    server.stop()


@functools.cache
def greedy(url: str, token: str, model: str) -> str:
    client = OpenAI(base_url=f"{url}/v1", api_key=token, max_retries=0, timeout=120)
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": PROMPT}], max_tokens=12, temperature=0
    )
    return reply.choices[0].message.content or ""


def answer(server: Server, model: str) -> str:
    """The model's greedy answer, asked once per server (a tie-free greedy answer of
    one model does not change between requests: tests/test_adapters.py checks that)."""
    return greedy(server.url, server.token, model)


@pytest.mark.server
def test_the_converted_adapter_answers_as_the_hand_written_one(
    served: tuple[Server, Path], default_model: Manifest
) -> None:
    server, _ = served
    base = answer(server, default_model.name)
    converted, hand, raw = (answer(server, f"spec-{n}") for n in ("peft", "hand", "raw"))
    assert converted == hand
    assert converted != base  # the adapter is applied
    # The rows' order matters to the answer: left in Hugging Face's order, it differs.
    assert raw != converted, raw


@pytest.mark.server
def test_cli_import_then_specialist_is_served_and_audited(
    served: tuple[Server, Path], default_model: Manifest
) -> None:
    server, state = served
    text = answer(server, "cli-spec")
    assert text and text != answer(server, default_model.name)
    card = next(m for m in server.http.get("/v1/models").json()["data"] if m["id"] == "cli-spec")
    lora = state / "models" / "cli-lora.gguf"
    assert card["adapters"] == [{"name": "cli-lora", "sha256": read_sha(lora), "scale": 1.0}]
    actions = {r["route"]: r["content"] for r in audit_rows(state) if r["kind"] == "admin"}
    imported = actions["adapters import"]
    assert imported["name"] == "cli-lora" and imported["base"] == default_model.name
    assert imported["base_sha256"] == default_model.sha256
    assert imported["sha256"] == read_sha(lora)
    assert actions["adapters specialist"]["adapters"] == [{"name": "cli-lora", "scale": 1.0}]


def test_a_converted_adapter_reads_as_the_loader_reads_it(tmp_path: Path, model_file: Path) -> None:
    # The loader compares architectures through appliance.gguf.read_info.
    out = tmp_path / "x.gguf"
    peft_to_gguf(write_peft(tmp_path / "p", matrices(("v_proj",))), model_file, out)
    info = read_info(out)
    assert info.architecture == "llama" and info.quantization == "F32"
