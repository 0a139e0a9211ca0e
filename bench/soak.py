"""Soak (issue #14; not in the test command): the real server under mixed load for
--minutes (20 by default): chat answers, streams, streams the client hangs up on,
tensor inferences, listings, refusals, sign-ins on the web page and slow clients that
trickle their headers. Every 10 s the server's RSS, open files and threads are
sampled. Prints the samples and, after a warm-up (the first quarter), each figure's
growth against the stated bound. Usage:

    .venv/bin/python bench/soak.py [--minutes 20] [--clients 4]
"""

from __future__ import annotations

import argparse
import random
import re
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from appliance.auth.store import AuthStore  # noqa: E402
from appliance.config import load_settings  # noqa: E402
from appliance.fetch import default_manifest  # noqa: E402
from appliance.registry import load_manifests  # noqa: E402

from campaign import _one  # noqa: E402
from helpers import CACHE, Server, make_state, start_server  # noqa: E402

# Growth allowed after the warm-up: the KV cache and allocator arenas settle within it.
BOUNDS = {"rss_mib": 64.0, "open_files": 16.0, "threads": 8.0}
PASSWORD = "soak-password-123"


def sign_in(url: str) -> int:
    with httpx.Client(base_url=url, timeout=30) as web:
        page = web.get("/login").text
        token = re.search(r'name="csrf_token" value="([^"]+)"', page)
        assert token is not None
        resp = web.post(
            "/login", data={"username": "soak.nurse", "password": PASSWORD, "csrf_token": token[1]}
        )
        return resp.status_code


def hang_up(server: Server, model: str) -> None:
    """A stream the client leaves after its first bytes."""
    body = {
        "model": model,
        "stream": True,
        "max_tokens": 64,
        "messages": [{"role": "user", "content": "Tell a story."}],
    }
    with (
        httpx.Client(base_url=server.url, timeout=30) as client,
        client.stream("POST", "/v1/chat/completions", headers=server.auth, json=body) as resp,
    ):
        for _ in resp.iter_bytes():
            break


def trickle(port: int) -> None:
    """A client that sends half its headers, slowly, and gives up."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET /v1/models HTTP/1.1\r\n")
        for _ in range(4):
            time.sleep(0.5)
            try:
                sock.sendall(b"X")
            except OSError:
                return


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=20)
    parser.add_argument("--clients", type=int, default=4)
    args = parser.parse_args()
    manifest = default_manifest(
        load_manifests(load_settings(env={}, overrides={"state_dir": CACHE}))
    )
    with tempfile.TemporaryDirectory() as tmp:
        state = make_state(Path(tmp) / "state", CACHE / "models" / manifest.file)
        users = AuthStore(load_settings(env={}, overrides={"state_dir": state}))
        users.add_user("soak.nurse", "clinician", PASSWORD)
        users.close()
        server = start_server(state, "--rate-limit-per-minute", "0")
        proc = psutil.Process(server.proc.pid)
        stop = threading.Event()
        counts: dict[str, int] = {}
        lock = threading.Lock()

        def worker(seed: int) -> None:
            rng = random.Random(seed)
            with httpx.Client(base_url=server.url, timeout=60) as client:
                while not stop.is_set():
                    action = rng.random()
                    try:
                        if action < 0.05:
                            kind = "sign-in"
                            sign_in(server.url)
                        elif action < 0.10:
                            kind = "hang-up"
                            hang_up(server, manifest.name)
                        elif action < 0.13:
                            kind = "trickle"
                            trickle(server.port)
                        else:
                            kind = "mixed"
                            _one(client, server, manifest.name, rng)
                    except (httpx.HTTPError, OSError):
                        kind = "error"
                    with lock:
                        counts[kind] = counts.get(kind, 0) + 1

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(args.clients)]
        for t in threads:
            t.start()
        samples = []
        end = time.monotonic() + args.minutes * 60
        try:
            while time.monotonic() < end:
                sample = {
                    "t": round(args.minutes * 60 - (end - time.monotonic())),
                    "rss_mib": proc.memory_info().rss / 2**20,
                    "open_files": float(proc.num_fds()),
                    "threads": float(proc.num_threads()),
                }
                samples.append(sample)
                print(
                    f"{sample['t']:5d} s  RSS {sample['rss_mib']:6.1f} MiB  "
                    f"fds {sample['open_files']:4.0f}  threads {sample['threads']:3.0f}",
                    flush=True,
                )
                time.sleep(min(10, max(0.0, end - time.monotonic())))
        finally:
            stop.set()
            for t in threads:
                t.join(60)
            server.stop()
    warm = samples[len(samples) // 4 :]
    print(f"requests: {counts}")
    failed = False
    for key, bound in BOUNDS.items():
        growth = max(s[key] for s in warm) - warm[0][key]
        verdict = "ok" if growth <= bound else "OVER"
        failed = failed or growth > bound
        print(
            f"{key}: {warm[0][key]:.1f} after warm-up, {warm[-1][key]:.1f} at the end, "
            f"growth {growth:+.1f} (bound {bound:.0f}): {verdict}"
        )
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
