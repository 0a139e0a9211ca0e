"""A fleet on one machine, for tests/test_fleet.py and bench/fleet.py: appliances in
network namespaces of their own behind two HAProxy balancers (deploy/haproxy) that
share a floating address with keepalived (deploy/keepalived), all on one bridge, and a
client namespace to reach them from. Needs root (ip netns) and Debian's haproxy and
keepalived. Every address is inside namespaces made here, and everything is torn down.

    10.77.0.2, .3    balancers lb1, lb2 (HAProxy + keepalived), VIP 10.77.0.100
    10.77.0.11-13    appliances box1..box3 (TLS, each with its own CA)
    10.77.0.50       the client
"""

from __future__ import annotations

import contextlib
import csv
import ctypes
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx

from tests.helpers import admin_token, make_state

REPO = Path(__file__).resolve().parent.parent
SUBNET = "10.77.0"
VIP = f"{SUBNET}.100"
CLIENT = f"{SUBNET}.50"
BOX_PORT = 8080
T = TypeVar("T")
_CLONE_NEWNET = 0x40000000


def run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, check=check, timeout=60)


def wait_until(predicate: Callable[[], object], timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if predicate():
                return True
        time.sleep(interval)
    return False


def enter_netns(name: str) -> None:
    """Move the calling thread (only it) into network namespace ``name``: the sockets it
    opens from now on live there."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {name}")
    finally:
        os.close(fd)


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            os.killpg(self.popen.pid, sig)

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@dataclass
class Fleet:
    work: Path
    model_file: Path
    boxes: int = 3
    balance: str = "hash"  # hash (the shipped config) or roundrobin (for the benchmark)
    prefix: str = field(default_factory=lambda: f"f{os.getpid() % 10000}")
    procs: dict[str, Proc] = field(default_factory=dict)
    token: str = ""
    namespaces: list[str] = field(default_factory=list)
    _pool: ThreadPoolExecutor | None = None

    # ---- the network ----
    def ns(self, node: str) -> str:
        return f"{self.prefix}-{node}"

    def box_names(self) -> list[str]:
        return [f"box{i}" for i in range(1, self.boxes + 1)]

    def address(self, node: str) -> str:
        if node.startswith("box"):
            return f"{SUBNET}.{10 + int(node[3:])}"
        return {"lb1": f"{SUBNET}.2", "lb2": f"{SUBNET}.3", "client": CLIENT}[node]

    def _network(self) -> None:
        switch = self.ns("sw")
        run("ip", "netns", "add", switch)
        self.namespaces.append(switch)
        run("ip", "-n", switch, "link", "add", "br0", "type", "bridge")
        run("ip", "-n", switch, "link", "set", "br0", "up")
        for i, node in enumerate(["lb1", "lb2", "client", *self.box_names()]):
            ns = self.ns(node)
            run("ip", "netns", "add", ns)
            self.namespaces.append(ns)
            inside, outside = f"{self.prefix}a{i}", f"{self.prefix}b{i}"
            run("ip", "link", "add", inside, "type", "veth", "peer", "name", outside)
            run("ip", "link", "set", inside, "netns", ns)
            run("ip", "link", "set", outside, "netns", switch)
            run("ip", "-n", switch, "link", "set", outside, "master", "br0", "up")
            run("ip", "-n", ns, "link", "set", inside, "name", "eth0")
            run("ip", "-n", ns, "addr", "add", f"{self.address(node)}/24", "dev", "eth0")
            run("ip", "-n", ns, "link", "set", "eth0", "up")
            run("ip", "-n", ns, "link", "set", "lo", "up")

    # ---- processes ----
    def _start(self, node: str, name: str, cmd: list[str], env: dict[str, str]) -> Proc:
        log = self.work / f"{name}.log"
        with log.open("wb") as out:
            popen = subprocess.Popen(
                ["ip", "netns", "exec", self.ns(node), *cmd],
                stdout=out,
                stderr=subprocess.STDOUT,
                env={
                    **{k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")},
                    **env,
                },
                start_new_session=True,
            )
        proc = self.procs[name] = Proc(name, popen, log)
        return proc

    def _boxes(self) -> None:
        states = [
            make_state(self.work / box / "state", self.model_file) for box in self.box_names()
        ]
        for box, state in zip(self.box_names(), states, strict=True):
            cli = [sys.executable, "-m", "appliance", "tls", "init", "--state-dir", str(state)]
            run(*cli, "--host", self.address(box), "--name", self.address(box))
        # One token for the fleet: the same auth database on every box.
        self.token = admin_token(states[0])
        for state in states[1:]:
            shutil.copy2(states[0] / "auth.db", state / "auth.db")
        for box in self.box_names():
            self.start_box(box)

    def start_box(self, box: str) -> Proc:
        state = self.work / box / "state"
        cmd = [sys.executable, "-m", "appliance", "serve", "--state-dir", str(state)]
        cmd += ["--host", self.address(box), "--port", str(BOX_PORT)]
        env = {"APPLIANCE_DRAIN_SECONDS": "3", "APPLIANCE_THREADS": "1"}
        return self._start(box, box, cmd, env)

    def _front(self) -> None:
        """The balancers' own certificate (for the VIP), and the boxes' CAs."""
        front = self.work / "front"
        cli = [sys.executable, "-m", "appliance", "tls", "init", "--state-dir", str(front)]
        run(*cli, "--host", VIP, "--name", VIP)
        tls = front / "tls"
        pem = self.work / "front.pem"
        pem.write_bytes((tls / "server.crt").read_bytes() + (tls / "server.key").read_bytes())
        self.client_ca = tls / "ca.crt"
        boxes = self.work / "boxes-ca.pem"
        boxes.write_bytes(
            b"".join((self.work / b / "state/tls/ca.crt").read_bytes() for b in self.box_names())
        )

    def haproxy_config(self) -> Path:
        text = (REPO / "deploy/haproxy/haproxy.cfg").read_text()
        if self.balance == "roundrobin":  # the baseline: no conversation affinity at all
            text = text.replace("balance hdr(X-Conversation-Id)", "balance roundrobin")
            text = "\n".join(ln for ln in text.splitlines() if not ln.strip().startswith("stick"))
        missing = [b for b in ("box1", "box2", "box3") if b not in self.box_names()]
        lines = [ln for ln in text.splitlines() if not any(f"server {b} " in ln for b in missing)]
        path = self.work / f"haproxy-{self.balance}.cfg"
        path.write_text("\n".join(lines) + "\n")
        return path

    def start_balancer(self, lb: str) -> None:
        env = {
            "APPLIANCE_BIND": ":443",
            "APPLIANCE_FRONT_PEM": str(self.work / "front.pem"),
            "APPLIANCE_CA_FILE": str(self.work / "boxes-ca.pem"),
            "APPLIANCE_HAPROXY_SOCKET": str(self.work / f"{lb}.sock"),
            **{f"APPLIANCE_{b.upper()}": f"{self.address(b)}:{BOX_PORT}" for b in self.box_names()},
        }
        self._start(lb, f"haproxy-{lb}", ["haproxy", "-db", "-f", str(self.haproxy_config())], env)
        peer = "lb2" if lb == "lb1" else "lb1"
        params = self.work / f"keepalived-{lb}.params"
        params.write_text(
            f"$ROUTER_ID=appliance-{lb}\n$INTERFACE=eth0\n$SELF={self.address(lb)}\n"
            f"$PEER={self.address(peer)}\n$PRIORITY={150 if lb == 'lb1' else 100}\n"
            f"$VIP={VIP}/24\n$VRRP_PASS=fleet\n"
            f"$CHECK_SCRIPT={REPO / 'deploy/keepalived/check-haproxy'}\n"
        )
        conf = self.work / f"keepalived-{lb}.conf"
        shipped = (REPO / "deploy/keepalived/keepalived.conf").read_text()
        conf.write_text(shipped.replace("/etc/keepalived/appliance-fleet.conf", str(params)))
        pids = [f"--pid={self.work / lb}-k.pid", f"--vrrp_pid={self.work / lb}-v.pid"]
        pids.append(f"--checkers_pid={self.work / lb}-c.pid")
        cmd = ["keepalived", "--dont-fork", "--log-console", "--dump-conf", "-f", str(conf), *pids]
        self._start(lb, f"keepalived-{lb}", cmd, {})

    # ---- the client ----
    def client_pool(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(
                max_workers=16, initializer=enter_netns, initargs=(self.ns("client"),)
            )
        return self._pool

    def in_client(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return self.client_pool().submit(fn, *args, **kwargs).result()

    def http(self, verify: Path | None = None) -> httpx.Client:
        """A client for the VIP; use it only through ``in_client`` (its connections must
        be opened in the client's namespace)."""
        return httpx.Client(
            base_url=f"https://{VIP}",
            verify=str(verify or self.client_ca),
            headers={"Authorization": f"Bearer {self.token}"},
            timeout=120,
        )

    def box_get(self, box: str, path: str) -> httpx.Response:
        ca = self.work / box / "state/tls/ca.crt"
        url = f"https://{self.address(box)}:{BOX_PORT}{path}"
        headers = {"Authorization": f"Bearer {self.token}"}
        return self.in_client(httpx.get, url, verify=str(ca), headers=headers, timeout=30)

    def box_post(self, box: str, path: str, body: dict[str, Any]) -> httpx.Response:
        ca = self.work / box / "state/tls/ca.crt"
        url = f"https://{self.address(box)}:{BOX_PORT}{path}"
        headers = {"Authorization": f"Bearer {self.token}"}
        return self.in_client(
            httpx.post, url, json=body, verify=str(ca), headers=headers, timeout=60
        )

    def vip_holder(self) -> str | None:
        for lb in ("lb1", "lb2"):
            out = run("ip", "-n", self.ns(lb), "-o", "addr", "show", "dev", "eth0", check=False)
            if f"{VIP}/" in out.stdout:
                return lb
        return None

    def balancer_sees(self, lb: str, box: str) -> str:
        """What balancer ``lb`` says of ``box`` (UP, DOWN, NOLB for a draining box...),
        from its runtime API's `show stat`."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            sock.connect(str(self.work / f"{lb}.sock"))
            sock.sendall(b"show stat\n")
            text = b"".join(iter(lambda: sock.recv(65536), b"")).decode()
        rows = csv.DictReader(io.StringIO(text.removeprefix("# ")))
        return next(r["status"] for r in rows if r["pxname"] == "appliances" and r["svname"] == box)

    def box_ready(self, box: str) -> bool:
        return self.box_get(box, "/readyz").status_code == 200

    def up(self) -> None:
        self._network()
        self._boxes()
        self._front()
        for lb in ("lb1", "lb2"):
            self.start_balancer(lb)
        for box in self.box_names():
            ok = wait_until(lambda b=box: self.box_ready(b), 240, interval=0.5)  # type: ignore[misc]
            assert ok, self.procs[box].tail()
        # Either balancer may take the address first (nopreempt: whichever is ready).
        holder = self.procs["keepalived-lb1"].tail
        assert wait_until(lambda: self.vip_holder() is not None, 30), holder()

        def through_vip() -> bool:
            with self.http() as client:
                return client.get("/readyz").status_code == 200

        assert wait_until(lambda: self.in_client(through_vip), 30), self.procs["haproxy-lb1"].tail()

    def down(self) -> None:
        for proc in self.procs.values():
            proc.signal(signal.SIGKILL)
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(10)
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        for ns in reversed(self.namespaces):
            run("ip", "netns", "del", ns, check=False)


@contextlib.contextmanager
def fleet(work: Path, model_file: Path, **kwargs: Any) -> Iterator[Fleet]:
    rig = Fleet(work, model_file, **kwargs)
    try:
        rig.up()
        yield rig
    finally:
        rig.down()


def served_by(resp: httpx.Response) -> str:
    return resp.headers.get("X-Appliance-Box", "?")
