"""systemd as PID 1, for real: a minimal Debian 12 (debootstrap, cached under
.test-cache/nspawn/) is booted with systemd-nspawn on a private network, and the bundle
is installed in it by provisioning/install itself (no --root: the user, the venv, the
keys, the unit enabled and started). Then, checked from inside the container: the unit
becomes active only once the appliance has said READY=1; it answers a chat completion
and a /v2 inference with the token the installer printed; the watchdog restarts it when
the worker hangs; an upgrade to a newer bundle keeps the audit log, which still
verifies. Needs root; scripts/test installs debootstrap and systemd-container."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from test_watchdog import PTRACE_DETACH, WALL, Frozen, in_engine, ptrace, thread_named

from helpers import CACHE, REPO, wait_for

pytestmark = [
    pytest.mark.slow,
    pytest.mark.server,
    pytest.mark.timeout(900),
    pytest.mark.skipif(
        os.geteuid() != 0, reason="needs root: boots a container with systemd-nspawn"
    ),
]

SUITE = "bookworm"  # Debian 12: its python3 is 3.11, as the bundle's cp311 wheels need
PACKAGES = ("systemd", "systemd-sysv", "dbus", "python3", "python3-venv", "ca-certificates")
FALLBACK_MIRROR = "http://deb.debian.org/debian"
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
URL = "http://127.0.0.1:8080"  # the installed appliance's default, inside the container
LLM = "smollm2-135m-instruct"
READINGS = [[2.0, 50.0, 55.0, 12.0], [6.0, 70.0, 55.0, 12.0], [2.1, 49.0, 88.0, 12.5]]
ARTIFACTS = REPO / "test-artifacts" / "nspawn"
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
CLI = ("runuser", "-u", "appliance", "--", "env", "APPLIANCE_STATE_DIR=/var/lib/appliance")
APPLIANCE = ("/opt/appliance/venv/bin/appliance",)
CONFIG = ("--config", "/etc/appliance/appliance.toml")


def tool(name: str) -> str:
    found = shutil.which(name, path=f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin")
    if found is None:
        pytest.fail(
            f"{name} is missing: apt-get install debootstrap systemd-container "
            "(scripts/test does it)"
        )
    return found


# The Debian tree: made once by debootstrap from the mirror apt uses here.


def apt_entries() -> list[tuple[list[str], list[str], list[str]]]:
    """(URIs, suites, components) of every enabled `deb` source, both formats."""
    etc = Path("/etc/apt")
    entries: list[tuple[list[str], list[str], list[str]]] = []
    for path in [etc / "sources.list", *sorted((etc / "sources.list.d").glob("*.list"))]:
        if not path.is_file():
            continue
        for line in path.read_text().splitlines():
            line = re.sub(r"\[[^\]]*\]", " ", line.split("#", 1)[0])  # drop [options]
            words = line.split()
            if len(words) >= 4 and words[0] == "deb":
                entries.append(([words[1]], [words[2]], words[3:]))
    for path in sorted((etc / "sources.list.d").glob("*.sources")):
        for stanza in re.split(r"\n\s*\n", path.read_text()):
            fields: dict[str, list[str]] = {}
            for line in stanza.splitlines():
                if line[:1] not in ("", "#", " ", "\t") and ":" in line:
                    key, value = line.split(":", 1)
                    fields[key.strip().lower()] = value.split()
            if "deb" in fields.get("types", []) and fields.get("enabled") != ["no"]:
                entries.append(
                    (fields.get("uris", []), fields.get("suites", []), fields.get("components", []))
                )
    return entries


def apt_mirror() -> str:
    """The Debian archive apt uses on this host for SUITE (CI reaches only the package
    mirrors), else deb.debian.org."""
    for uris, suites, components in apt_entries():
        usable = [u for u in uris if u.startswith(("http://", "https://", "file:/"))]
        if SUITE in suites and "main" in components and usable:
            return usable[0].rstrip("/")
    return FALLBACK_MIRROR


def apt_proxy() -> dict[str, str]:
    """apt's HTTP proxy, if it has one, for debootstrap (which reads only http_proxy)."""
    if "http_proxy" in os.environ:
        return {}
    shown = subprocess.run(
        ["apt-config", "shell", "PROXY", "Acquire::http::Proxy"],
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout
    words = shlex.split(shown.replace("PROXY=", "", 1)) if shown.startswith("PROXY=") else []
    return {"http_proxy": words[0]} if words and words[0] not in ("", "DIRECT") else {}


def unmount_below(path: Path) -> None:
    """Lazily unmount whatever is mounted inside `path` (a failed debootstrap can leave
    /proc and /sys mounted in its target), deepest first, so removing it stays inside."""
    prefix = str(path.resolve()) + "/"
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].encode().decode("unicode_escape")
        if point.startswith(prefix):
            points.append(point)
    for point in sorted(points, key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True, timeout=30)


def remove_tree(path: Path) -> None:
    if path.exists():
        unmount_below(path)
        shutil.rmtree(path, ignore_errors=True)


def debian_tree() -> Path:
    """A minimal Debian with systemd and python3, made by debootstrap the first time
    (about a minute or two) and kept under .test-cache/nspawn/; each run boots a copy."""
    variant = ("--variant=minbase", f"--include={','.join(PACKAGES)}", SUITE)
    key = hashlib.sha256(" ".join(variant).encode()).hexdigest()[:12]
    cache = CACHE / "nspawn"
    tree = cache / f"{SUITE}-{key}"
    if (tree / "usr/bin/python3").exists():  # renamed into place only once complete
        return tree
    cache.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{SUITE}-partial-", dir=cache))
    try:
        partial.chmod(0o755)  # it becomes the container's /
        made = subprocess.run(
            [tool("debootstrap"), *variant, str(partial), apt_mirror()],
            capture_output=True,
            text=True,
            timeout=1800,
            env={**os.environ, **apt_proxy()},
        )
        assert made.returncode == 0, (made.stdout + made.stderr)[-3000:]
        try:
            partial.rename(tree)
        except OSError:  # another run put its tree there first: use that one
            assert (tree / "usr/bin/python3").exists()
    finally:
        remove_tree(partial)
    for stale in cache.glob(f"{SUITE}-*"):  # trees made for another package list
        if stale != tree:
            remove_tree(stale)
    return tree


# The container: booted with systemd as PID 1, driven with nsenter.


@dataclass
class Response:
    status: int
    text: str

    def json(self) -> Any:
        return json.loads(self.text)


# Runs inside the container with its python3 (stdlib only): one HTTP request on its own
# loopback, answered as JSON {status, text}; status 0 when nothing answers.
CLIENT = r"""
import json, sys, urllib.error, urllib.request
method, url, token, body = json.loads(sys.argv[1])
headers = {"Content-Type": "application/json"}
if token:
    headers["Authorization"] = "Bearer " + token
data = None if body is None else json.dumps(body).encode()
request = urllib.request.Request(url, data=data, method=method, headers=headers)
try:
    with urllib.request.urlopen(request, timeout=120) as response:
        status, text = response.status, response.read().decode()
except urllib.error.HTTPError as exc:
    status, text = exc.code, exc.read().decode()
except OSError as exc:
    status, text = 0, str(exc)
print(json.dumps({"status": status, "text": text}))
"""


def own_cgroup(name: str) -> tuple[list[str], dict[str, str], list[Path]]:
    """A cgroup of the container's own. systemd-nspawn --keep-unit puts its `payload` and
    `supervisor` cgroups beside itself: in the root cgroup they would be shared with any
    other run. Under a host systemd: a delegated scope; without one (a plain container
    host): directories made here, in each hierarchy systemd uses. The command prefix, its
    environment and the directories to remove afterwards."""
    if Path("/run/systemd/system").is_dir():
        scope = ["systemd-run", "--quiet", "--scope", "--collect", "-p", "Delegate=yes"]
        return [*scope, f"--unit={name}"], {}, []
    base = Path("/sys/fs/cgroup")
    hierarchies = (
        [base]
        if (base / "cgroup.procs").exists()
        else [h for h in (base / "unified", base / "systemd") if (h / "cgroup.procs").exists()]
    )
    made = []
    for hierarchy in hierarchies:
        try:
            (hierarchy / name).mkdir(exist_ok=True)
        except OSError:
            continue
        made.append(hierarchy / name)
    enter = 'for d in $CGROUPS; do echo $$ > "$d/cgroup.procs"; done; exec "$@"'
    return ["sh", "-c", enter, "sh"], {"CGROUPS": " ".join(map(str, made))}, made


def remove_cgroups(dirs: list[Path]) -> None:
    for top in dirs:
        if top.is_dir():
            for sub in sorted(
                (p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)
            ):
                with contextlib.suppress(OSError):
                    sub.rmdir()
            with contextlib.suppress(OSError):
                top.rmdir()


class Container:
    """A copy of the Debian tree booted by systemd-nspawn (systemd as PID 1, a private
    network: its loopback is its own, so port 8080 collides with nothing on the host)."""

    def __init__(self, tree: Path, work: Path) -> None:
        self.root = work / "root"
        self.console = work / "console.log"
        self.name = f"appliance-test-{os.getpid()}"
        subprocess.run(
            ["cp", "-a", "--reflink=auto", str(tree), str(self.root)], check=True, timeout=600
        )
        prefix, env, self.cgroups = own_cgroup(self.name)
        nspawn = [
            tool("systemd-nspawn"),
            "--quiet",
            f"--directory={self.root}",
            f"--machine={self.name}",
            "--register=no",
            "--keep-unit",
            "--private-network",
            "--system-call-filter=bpf",  # for the unit's IPAddressDeny= (BPF firewall)
            "--console=read-only",
            "--boot",
        ]
        with self.console.open("wb") as console:
            self.proc = subprocess.Popen(
                [*prefix, *nspawn],
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                env={**os.environ, **env, "SYSTEMD_NSPAWN_UNIFIED_HIERARCHY": "1"},
                start_new_session=True,
            )
        self.leader = 0
        self.pidns = ""

    def boot(self, timeout: float = 120) -> None:
        """Wait (bounded) for the container's systemd, then for its boot to finish."""
        deadline = time.monotonic() + timeout
        while not self.leader:
            self.alive()
            assert time.monotonic() < deadline, "no systemd in the container: " + self.log()
            self.leader = self._find_leader()
            time.sleep(0.1)
        self.pidns = os.readlink(f"/proc/{self.leader}/ns/pid")
        while True:
            self.alive()
            left = deadline - time.monotonic()
            assert left > 0, "the container did not finish booting: " + self.log()
            try:
                state = self.run("systemctl", "is-system-running", "--wait", timeout=left)
            except subprocess.TimeoutExpired:
                continue
            if state.stdout.strip() in ("running", "degraded"):
                return
            time.sleep(0.2)  # its bus is not up yet

    def _find_leader(self) -> int:
        own = os.readlink("/proc/self/ns/pid")
        for entry in Path("/proc").iterdir():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                if (
                    ppid == self.proc.pid
                    and (entry / "comm").read_text().strip() == "systemd"
                    and os.readlink(entry / "ns/pid") != own
                ):
                    return int(entry.name)
            except (OSError, ValueError, IndexError):
                continue
        return 0

    def alive(self) -> None:
        assert self.proc.poll() is None, f"systemd-nspawn exited: {self.log()}"

    def log(self) -> str:
        return self.console.read_text(errors="replace")[-3000:]

    def run(
        self, *argv: str, timeout: float = 120, check: bool = False
    ) -> subprocess.CompletedProcess[str]:
        """A command inside the container (all its namespaces, a clean environment)."""
        result = subprocess.run(
            [
                "nsenter",
                "--target",
                str(self.leader),
                "--all",
                "--root",
                "--wd",
                "--",
                "/usr/bin/env",
                "-i",
                f"PATH={PATH}",
                "LANG=C.UTF-8",
                "HOME=/root",
                "SYSTEMD_COLORS=0",
                "SYSTEMD_PAGER=",
                *argv,
            ],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check:
            assert result.returncode == 0, f"{argv}: {result.stdout[-2000:]}{result.stderr[-2000:]}"
        return result

    def show(self, *properties: str) -> dict[str, str]:
        shown = self.run(
            "systemctl",
            "show",
            "appliance",
            "--timestamp=us+utc",
            f"--property={','.join(properties)}",
        ).stdout
        return dict(line.split("=", 1) for line in shown.splitlines() if "=" in line)

    def http(
        self, method: str, path: str, token: str | None = None, body: object = None
    ) -> Response:
        sent = self.run("python3", "-c", CLIENT, json.dumps([method, URL + path, token, body]))
        assert sent.returncode == 0, sent.stderr[-2000:]
        return Response(**json.loads(sent.stdout))

    def serving(self) -> bool:
        return self.show("ActiveState")["ActiveState"] == "active" and (
            self.http("GET", "/readyz").status == 200
        )

    def cursor(self) -> str:
        """Where the unit's journal ends now."""
        last = self.run("journalctl", "-u", "appliance", "-n", "1", "-o", "json", "--no-pager")
        lines = last.stdout.strip().splitlines()
        return str(json.loads(lines[-1])["__CURSOR"]) if lines else ""

    def journal(self, after: str) -> list[dict[str, Any]]:
        """The unit's journal entries (its own output and systemd's lines about it)."""
        since = [f"--after-cursor={after}"] if after else []
        shown = self.run("journalctl", "-u", "appliance", "-o", "json", "--no-pager", *since)
        return [json.loads(line) for line in shown.stdout.splitlines() if line.strip()]

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """`appliance ARGS` as the service's user, on the service's settings."""
        return self.run(*CLI, *APPLIANCE, *args, *CONFIG, timeout=300)

    def install(self, bundle: Path, public_key: Path) -> subprocess.CompletedProcess[str]:
        """provisioning/install, the real one (no --root), run as root in the container."""
        inbox = self.root / "root" / "bundles"
        inbox.mkdir(exist_ok=True)
        for source in (bundle, public_key, REPO / "provisioning" / "install"):
            target = inbox / source.name
            target.unlink(missing_ok=True)
            try:
                os.link(source, target)
            except OSError:
                shutil.copy2(source, target)
        where = "/root/bundles/"
        return self.run(
            where + "install",
            where + bundle.name,
            "--public-key",
            where + public_key.name,
            timeout=600,
        )

    def save_journal(self) -> None:
        """The container's journal, for a failure's post-mortem (its console is kept
        beside it once the container is down)."""
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        if self.leader and self.proc.poll() is None:
            journal = self.run("journalctl", "-b", "--no-pager", "-o", "short-precise")
            (ARTIFACTS / "journal.txt").write_text(journal.stdout)

    def stop(self) -> None:
        """Power the container off (nspawn turns SIGTERM into a clean shutdown); kill it
        if that takes longer than a minute."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        if self.leader:
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{self.leader}/ns/pid") == self.pidns:
                    os.kill(self.leader, signal.SIGKILL)  # PID 1: the namespace goes with it
        remove_cgroups(self.cgroups)
        with contextlib.suppress(OSError):
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            shutil.copy(self.console, ARTIFACTS / "console.log")
        # The installer makes the checkpoint file append-only (chattr +a), which nobody,
        # root included, can delete: lift it, or pytest cannot remove this copy and each
        # run leaves ~3 GB behind (it filled this machine's disk once).
        subprocess.run(
            ["chattr", "-R", "-a", "-i", str(self.root / "var/log/appliance")],
            capture_output=True,
            timeout=60,
        )


@dataclass
class Appliance:
    box: Container
    token: str  # the first admin token, as the installer printed it
    public_key: Path


@pytest.fixture(scope="module")
def appliance(
    bundle: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Appliance]:
    tree = debian_tree()
    work = tmp_path_factory.mktemp("nspawn")
    box = Container(tree, work)
    try:
        box.boot()
        tar, pub = bundle
        installed = box.install(tar, pub)
        assert installed.returncode == 0, (installed.stdout + installed.stderr)[-3000:]
        lines = installed.stdout.splitlines()
        header = next(i for i, line in enumerate(lines) if "first admin token" in line)
        token = lines[header + 1].strip()
        assert token.startswith("apl_")
        yield Appliance(box, token, pub)
    finally:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            box.save_journal()
        box.stop()
        remove_tree(work)


def app_logs(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The service's JSON log lines, as it wrote them (with its own timestamps)."""
    found = []
    for entry in entries:
        message = entry.get("MESSAGE")
        if isinstance(message, str) and message.startswith("{"):
            try:
                found.append(json.loads(message))
            except ValueError:
                continue
    return found


def logged_at(record: dict[str, Any]) -> int:
    """A log line's own time, in microseconds since the epoch (milliseconds resolution)."""
    moment = datetime.strptime(record["ts"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    return (moment - EPOCH) // timedelta(microseconds=1)


def unit_time(value: str) -> int:
    """A `systemctl show --timestamp=us+utc` time, in microseconds since the epoch."""
    moment = datetime.strptime(value, "%a %Y-%m-%d %H:%M:%S.%f UTC").replace(tzinfo=UTC)
    return (moment - EPOCH) // timedelta(microseconds=1)


def messages(entries: list[dict[str, Any]]) -> list[str]:
    return [m for m in (e.get("MESSAGE") for e in entries) if isinstance(m, str)]


def chat(appliance: Appliance) -> Response:
    return appliance.box.http(
        "POST",
        "/v1/chat/completions",
        appliance.token,
        {
            "model": LLM,
            "messages": [{"role": "user", "content": "Name one vital sign."}],
            "max_tokens": 8,
            "temperature": 0,
        },
    )


def test_active_only_once_the_appliance_said_ready(appliance: Appliance) -> None:
    box = appliance.box
    assert box.show("ActiveState")["ActiveState"] == "active"  # the installer started it
    box.run("systemctl", "stop", "appliance", timeout=120, check=True)
    stopped = box.show("ActiveState", "Result", "ExecMainStatus")
    assert stopped == {"ActiveState": "inactive", "Result": "success", "ExecMainStatus": "0"}

    cursor = box.cursor()
    box.run("systemctl", "start", "appliance", timeout=300, check=True)  # Type=notify: waits
    ready = box.http("GET", "/readyz")  # at once: no waiting after `systemctl start`
    assert ready.status == 200 and ready.json()["ready"], ready.text
    unit = box.show("ActiveState", "StatusText", "ExecMainStartTimestamp", "ActiveEnterTimestamp")
    assert unit["ActiveState"] == "active"
    # The status line comes with the appliance's own READY=1.
    assert unit["StatusText"] == f"serving line-anomaly, {LLM}"  # the models loaded

    entries = box.journal(cursor)
    said = messages(entries)
    assert f"  models: {LLM}" in said  # the language model loaded (libgomp shipped)
    # The appliance's own ready message, printed just before it sends READY=1; what the
    # same process wrote before it (one stream: in the order written) came earlier still.
    ready = next(
        i
        for i, e in enumerate(entries)
        if str(e.get("MESSAGE")).startswith(f"appliance serving on {URL}")
    )
    worker = entries[ready]["_PID"]
    before_ready = app_logs([e for e in entries[:ready] if e.get("_PID") == worker])
    loaded = {r["model"] for r in before_ready if r["msg"] == "model loaded"}
    assert loaded == {LLM, "line-anomaly"}, before_ready
    last_before_ready = max(logged_at(r) for r in before_ready)
    # The socket was bound well before: where a server's READY=1 that did not wait for
    # the models (gunicorn's arbiter's) would have gone out.
    listening = [logged_at(r) for r in app_logs(entries) if r["msg"].startswith("Listening at")]
    assert listening, said
    started = unit_time(unit["ExecMainStartTimestamp"])
    active = unit_time(unit["ActiveEnterTimestamp"])
    assert started // 1000 <= listening[0] // 1000 < last_before_ready // 1000
    # Active only once the models were loaded (with a READY=1 sent on binding, it would
    # be active about when it was listening, before this).
    assert last_before_ready <= active, (listening[0], last_before_ready, active)
    assert active - listening[0] > 1000  # not when it was listening


def test_answers_with_the_token_the_installer_printed(appliance: Appliance) -> None:
    box = appliance.box
    answer = chat(appliance)
    assert answer.status == 200, answer.text
    body = answer.json()
    assert body["model"] == LLM and body["choices"][0]["message"]["content"].strip()
    assert body["usage"]["completion_tokens"] > 0

    inference = box.http(
        "POST",
        "/v2/models/line-anomaly/infer",
        appliance.token,
        {
            "id": "press-4",
            "inputs": [{"name": "readings", "shape": [3, 4], "datatype": "FP32", "data": READINGS}],
        },
    )
    assert inference.status == 200, inference.text
    result = inference.json()
    outputs = {o["name"]: o for o in result["outputs"]}
    assert result["id"] == "press-4"
    assert outputs["is_anomaly"]["data"] == [False, True, True]
    assert chat(Appliance(box, "apl_nobody_x", appliance.public_key)).status == 401


def host_pid(box: Container, pid: int) -> int:
    """The host's number for the container's process `pid`."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if os.readlink(entry / "ns/pid") != box.pidns:
                continue
            for line in (entry / "status").read_text().splitlines():
                if line.startswith("NSpid:") and int(line.split()[-1]) == pid:
                    return int(entry.name)
    raise AssertionError(f"no process {pid} in the container")


def test_the_watchdog_restarts_a_hung_worker(appliance: Appliance) -> None:
    """One part of the service hangs, the rest runs on: its engine loop, held in a ptrace
    stop in the middle of a step. Only the health check can stop the pings (a frozen
    process would stop them whatever the check said), and it says why in the journal."""
    box = appliance.box
    # For this test only: a shorter watchdog (pings every 2 s) and stall bound, so that a
    # hang shows in seconds.
    drop_in = box.root / "etc/systemd/system/appliance.service.d/test-watchdog.conf"
    drop_in.parent.mkdir(parents=True, exist_ok=True)
    drop_in.write_text("[Service]\nWatchdogSec=4\nEnvironment=APPLIANCE_STALL_SECONDS=2\n")
    engine = 0
    try:
        box.run("systemctl", "daemon-reload", check=True)
        box.run("systemctl", "restart", "appliance", timeout=300, check=True)
        before = box.show("WatchdogUSec", "MainPID", "NRestarts")
        assert before["WatchdogUSec"] == "4s"
        main = host_pid(box, int(before["MainPID"]))
        engine = thread_named(main, "model-")  # the language model's loop
        cursor = box.cursor()
        body = {
            "model": LLM,
            "messages": [{"role": "user", "content": "Count from 1 to 400, one number a line."}],
            "max_tokens": 400,
            "temperature": 0,
            "ignore_eos": True,  # still decoding when frozen, whatever this CPU's kernels say
        }
        request = json.dumps(["POST", URL + "/v1/chat/completions", appliance.token, body])

        def ask() -> None:  # cut off by the restart; or, if none comes, by its own timeout
            with contextlib.suppress(subprocess.TimeoutExpired):
                box.run("python3", "-c", CLIENT, request, timeout=150)

        asking = threading.Thread(target=ask, daemon=True)
        asking.start()
        Frozen(main, engine, in_engine(main))  # held once it is computing a step

        def reaped() -> bool:
            """The held thread, once systemd's SIGABRT has ended it, is reaped here (its
            tracer): until then the process it belonged to is not gone."""
            with contextlib.suppress(ChildProcessError):
                return os.waitpid(engine, WALL | os.WNOHANG)[0] == engine
            return True

        def restarted() -> bool:
            return int(box.show("NRestarts")["NRestarts"]) > int(before["NRestarts"])

        # Within WatchdogSec, SIGABRT, RestartSec=5 (and TimeoutStopSec=45 at worst).
        assert wait_for(lambda: reaped() and restarted(), 120, interval=0.5), box.show(
            "ActiveState", "Result"
        )
        engine = 0
        assert wait_for(box.serving, 60, interval=0.5)
        entries = box.journal(cursor)
        said = messages(entries)
        withheld = [r for r in app_logs(entries) if r["msg"] == "watchdog withheld"]
        assert withheld, said[-20:]  # the check ran: the process was not frozen whole
        assert f"model {LLM!r} has made no progress" in str(withheld[0]["reason"])
        assert any("Watchdog timeout" in m for m in said), said[-20:]
        assert any("Failed with result 'watchdog'" in m for m in said), said[-20:]
        assert box.show("MainPID")["MainPID"] != before["MainPID"]
        assert chat(appliance).status == 200  # answering again
    finally:
        if engine:  # not restarted: let the thread go on (or reap it)
            with contextlib.suppress(OSError):
                ptrace(PTRACE_DETACH, engine)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(engine, WALL | os.WNOHANG)
        drop_in.unlink(missing_ok=True)
        box.run("systemctl", "daemon-reload")


def test_an_upgrade_keeps_the_audit_log(
    appliance: Appliance, newer_bundle: tuple[Path, str]
) -> None:
    box = appliance.box
    assert wait_for(box.serving, 60, interval=0.5)
    assert chat(appliance).status == 200  # at least one inference on record
    verified = box.cli("audit", "verify", "--json")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    before = json.loads(verified.stdout)
    assert before["external_checkpoints"] > 0  # the service appends to the installed file
    # What the verification trusts is out of the service user's reach: the public key
    # in /etc, and the checkpoint file, which it may append to but not rewrite.
    witness = "/var/log/appliance/checkpoints.jsonl"
    for attempt in (
        ("sh", "-c", "echo forged > /etc/appliance/audit-signing.pub"),
        ("truncate", "-s", "0", witness),
        ("sh", "-c", f"echo > {witness}"),
    ):
        tried = box.run("runuser", "-u", "appliance", "--", *attempt)
        assert tried.returncode != 0, attempt
    assert box.run("test", "-s", witness).returncode == 0
    exported = box.cli("audit", "export", "--format", "jsonl")
    assert exported.returncode == 0, exported.stderr
    records = [json.loads(line) for line in exported.stdout.splitlines()]
    assert any(r["route"] == "/v1/chat/completions" for r in records), records[-3:]
    keys = {p: p.read_bytes() for p in (box.root / "var/lib/appliance/keys").iterdir()}

    newer, version = newer_bundle
    upgraded = box.install(newer, appliance.public_key)
    assert upgraded.returncode == 0, (upgraded.stdout + upgraded.stderr)[-3000:]
    assert "first admin token" not in upgraded.stdout
    assert box.serving()  # the installer restarted it (Type=notify: ready when it returns)
    server = box.http("GET", "/v2", appliance.token)
    assert server.status == 200 and server.json()["version"] == version  # the new code runs

    verified = box.cli("audit", "verify", "--json")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    after = json.loads(verified.stdout)
    assert after["ok"] and after["first_seq"] == before["first_seq"] == 1
    assert after["records"] >= before["records"] + 1
    exported = box.cli("audit", "export", "--format", "jsonl")
    assert exported.returncode == 0, exported.stderr
    kept = [json.loads(line) for line in exported.stdout.splitlines()][: len(records)]
    assert kept == records  # every record from before the upgrade, unchanged
    assert {p: p.read_bytes() for p in keys} == keys
    assert chat(appliance).status == 200  # the same token still works
