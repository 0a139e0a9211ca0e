"""Time from start to READY=1 with the default model, and the service's resident memory
against its budget (model file + 150 MB), measured through the real notify protocol.

    .venv/bin/python bench/startup.py [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from helpers import CACHE, free_port, make_state  # noqa: E402

MODEL = CACHE / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def rss_of_group(pid: int) -> int:
    """Resident bytes of the arbiter and its worker, shared pages counted once (the sum
    of PSS: the worker is forked from the arbiter and shares its pages)."""
    total = 0
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if os.getpgid(int(proc.name)) != pid:
                continue
            for line in (proc / "smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
        except (OSError, ProcessLookupError):
            continue
    return total


def one_run(state: Path, tmp: Path) -> tuple[float, int]:
    sock_path = tmp / f"notify-{time.monotonic_ns()}.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(60)
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
    env["NOTIFY_SOCKET"] = str(sock_path)
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
            str(free_port()),
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
        rss = rss_of_group(proc.pid)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
        sock.close()
    return ready, rss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-start-") as tmp:
        state = make_state(Path(tmp) / "state", MODEL)
        one_run(state, Path(tmp))  # the first start makes keys and hashes the files
        runs = [one_run(state, Path(tmp)) for _ in range(args.runs)]
    ready = statistics.median(r for r, _ in runs)
    rss = max(m for _, m in runs)
    budget = MODEL.stat().st_size + 150 * 1024 * 1024
    print(f"start to READY=1: median {ready:.2f} s over {args.runs} starts (target <= 2 s)")
    print(
        f"service memory (PSS of arbiter and worker): {rss / 2**20:.0f} MiB; "
        f"budget model file + 150 MB = {budget / 2**20:.0f} MiB (target: within it)"
    )


if __name__ == "__main__":
    main()
