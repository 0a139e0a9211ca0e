"""Time from start to READY=1 with the default model, and the service's resident memory
(RSS) against its budget (model file + 150 MB), measured through the real notify protocol:
at rest after READY=1, and after it has answered `parallel_streams` streams at once
(the KV cache and the compute buffers in use). Server flags after `--` are passed on.

    .venv/bin/python bench/startup.py [--runs 3] [-- --context-size 1024 ...]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from helpers import admin_token, default_model_file, free_port, make_state  # noqa: E402

MODEL = default_model_file()


def memory_of_group(pid: int) -> tuple[int, int]:
    """Resident bytes of the service's processes (one since the server runs without
    gunicorn's arbiter): RSS, which counts shared library pages in full, and PSS,
    which splits them with the other processes that map them (this one too)."""
    rss = pss = 0
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if os.getpgid(int(proc.name)) != pid:
                continue
            for line in (proc / "smaps_rollup").read_text().splitlines():
                if line.startswith("Rss:"):
                    rss += int(line.split()[1]) * 1024
                elif line.startswith("Pss:"):
                    pss += int(line.split()[1]) * 1024
        except (OSError, ProcessLookupError):
            continue
    return rss, pss


def serve_streams(port: int, token: str, n: int) -> None:
    """n greedy streams at once, 128 tokens each, so every slot has worked."""

    def one(i: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        body = {
            "model": "smollm2-135m-instruct",
            "messages": [{"role": "user", "content": f"({i}) Tell me about the sea."}],
            "max_tokens": 128,
            "temperature": 0,
            "ignore_eos": True,
        }
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
        conn.request("POST", "/v1/chat/completions", json.dumps(body), headers)
        assert conn.getresponse().status == 200
        conn.close()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)


def one_run(
    state: Path, tmp: Path, flags: list[str], streams: int
) -> tuple[float, tuple[int, int], tuple[int, int]]:
    sock_path = tmp / f"notify-{time.monotonic_ns()}.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(60)
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
    env["NOTIFY_SOCKET"] = str(sock_path)
    port = free_port()
    token = admin_token(state)
    start = time.perf_counter()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "appliance",
            "serve",
            "--state-dir",
            str(state),
            "--port",
            str(port),
            *flags,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
        start_new_session=True,
    )
    try:
        while True:
            message = sock.recv(4096).decode()
            if message.startswith("READY=1"):
                ready = time.perf_counter() - start
                break
        time.sleep(1.0)  # settle
        rest = memory_of_group(proc.pid)
        serve_streams(port, token, streams)
        time.sleep(0.5)
        used = memory_of_group(proc.pid)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
        sock.close()
    return ready, rest, used


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--streams", type=int, default=4, help="streams served at once")
    parser.add_argument("flags", nargs="*", help="server flags (after --)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-start-") as tmp:
        state = make_state(Path(tmp) / "state", MODEL)
        # The first start makes keys and hashes the files.
        one_run(state, Path(tmp), args.flags, 1)
        runs = [one_run(state, Path(tmp), args.flags, args.streams) for _ in range(args.runs)]
    ready = statistics.median(r for r, _, _ in runs)
    rest = max(m for _, m, _ in runs)
    used = max(m for _, _, m in runs)
    budget = MODEL.stat().st_size + 150 * 1000 * 1000
    print(f"server flags: {' '.join(args.flags) or '(defaults)'}")
    print(f"start to READY=1: median {ready:.2f} s over {args.runs} starts (target <= 2 s)")
    print(
        f"service memory, RSS (PSS): {rest[0] / 2**20:.1f} MiB ({rest[1] / 2**20:.1f}) at "
        f"rest, {used[0] / 2**20:.1f} MiB ({used[1] / 2**20:.1f}) after {args.streams} "
        f"streams at once; budget model file + 150 MB = {budget / 2**20:.1f} MiB "
        "(target: RSS within it)"
    )


if __name__ == "__main__":
    main()
