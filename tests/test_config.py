"""Settings: one schema; defaults < file < env < flags; clear errors naming the value."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from appliance.cli import main
from appliance.config import (
    Settings,
    SettingsError,
    docs_markdown,
    load_settings,
    sample_toml,
    schema,
)


def test_defaults() -> None:
    s = load_settings(env={})
    assert (s.host, s.port, s.queue_depth, s.gpu_layers) == ("127.0.0.1", 8080, 8, 0)
    assert s.models_path == s.state_dir / "models"


def test_precedence_defaults_file_env_flags(tmp_path: Path) -> None:
    cfg = tmp_path / "appliance.toml"
    cfg.write_text('port = 9001\nqueue_depth = 3\nhost = "127.0.0.2"\nthreads = 1\n')
    env = {"APPLIANCE_PORT": "9002", "APPLIANCE_QUEUE_DEPTH": "5"}
    s = load_settings(cfg, env=env, overrides={"port": 9003})
    assert s.port == 9003  # flag beats env and file
    assert s.queue_depth == 5  # env beats file
    assert s.host == "127.0.0.2"  # file beats default
    assert s.threads == 1
    assert s.context_size == Settings().context_size  # default where nobody spoke


def test_config_file_from_env(tmp_path: Path) -> None:
    cfg = tmp_path / "site.toml"
    cfg.write_text("max_tokens = 77\n")
    assert load_settings(env={"APPLIANCE_CONFIG": str(cfg)}).max_tokens == 77


def test_state_dir_env_and_model_dir(tmp_path: Path) -> None:
    s = load_settings(env={"APPLIANCE_STATE_DIR": str(tmp_path)})
    assert s.state_dir == tmp_path and s.models_path == tmp_path / "models"
    s = load_settings(env={"APPLIANCE_MODEL_DIR": str(tmp_path / "m")})
    assert s.models_path == tmp_path / "m"


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"APPLIANCE_PORT": "eighty"}, "port (APPLIANCE_PORT) must be an integer, got 'eighty'"),
        (
            {"APPLIANCE_QUEUE_DEPTH": "-1"},
            "queue_depth (APPLIANCE_QUEUE_DEPTH) must be at least 0, got -1",
        ),
        ({"APPLIANCE_LOG_LEVEL": "loud"}, "log_level (APPLIANCE_LOG_LEVEL) must be one of"),
        ({"APPLIANCE_AUDIT_CONTENT": "all"}, "audit_content (APPLIANCE_AUDIT_CONTENT) must be one"),
    ],
)
def test_bad_env_values_are_named(env: dict[str, str], expected: str) -> None:
    with pytest.raises(SettingsError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        load_settings(env=env)


def test_bad_config_files(tmp_path: Path) -> None:
    cfg = tmp_path / "a.toml"
    cfg.write_text("prot = 1\n")
    with pytest.raises(SettingsError, match="unknown setting\\(s\\) prot"):
        load_settings(cfg, env={})
    cfg.write_text("port = \n")
    with pytest.raises(SettingsError, match="not valid TOML"):
        load_settings(cfg, env={})
    cfg.write_text('port = "x"\n')
    with pytest.raises(SettingsError, match=r"port .* must be an integer, got 'x'"):
        load_settings(cfg, env={})
    with pytest.raises(SettingsError, match="does not exist"):
        load_settings(tmp_path / "missing.toml", env={})


def test_docs_and_sample_cover_every_setting() -> None:
    docs, sample = docs_markdown(), sample_toml()
    for spec in schema():
        assert f"`{spec.name}`" in docs and spec.env in docs and spec.flag in docs
        assert f"# {spec.name} = " in sample


def test_sample_parses_when_uncommented(tmp_path: Path) -> None:
    lines = [ln[2:] for ln in sample_toml().splitlines() if ln.startswith("# ") and " = " in ln]
    lines = [ln for ln in lines if not ln.endswith('""')]  # optional paths stay unset
    cfg = tmp_path / "all.toml"
    cfg.write_text("\n".join(lines) + "\n")
    s = load_settings(cfg, env={})
    assert s.port == 8080 and s.context_size == Settings().context_size


def test_cli_config_show_honours_file_env_and_flags(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text("port = 7001\nqueue_depth = 2\n")
    result = CliRunner().invoke(
        main,
        ["config", "show", "--json", "--config", str(cfg), "--queue-depth", "6"],
        env={"APPLIANCE_STATE_DIR": str(tmp_path / "st"), "APPLIANCE_PORT": "7002"},
    )
    assert result.exit_code == 0, result.output
    shown = json.loads(result.output)
    assert shown["port"] == 7002
    assert shown["queue_depth"] == 6
    assert shown["state_dir"] == str(tmp_path / "st")


def test_cli_reports_bad_setting_without_traceback(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["config", "show"], env={"APPLIANCE_PORT": "x"})
    assert result.exit_code == 1
    assert "port (APPLIANCE_PORT) must be an integer" in result.output
    assert "Traceback" not in result.output
