"""The line model through /v2/models/line-anomaly/infer (JSON and binary tensors) against
onnxruntime in-process, in one run: p50 and p99 latency and requests/s at 1 and 8
concurrent clients, and the API's overhead over in-process at p50.

The HTTP client is the same for every API variant: a lean keep-alive HTTP/1.1 client
on a bare socket (the request's bytes made once, the answer read by Content-Length and
its status checked), as a line system's would be; `--client http.client` uses the
standard library's instead, whose response parsing alone costs ~40 us a request. Each
variant (the in-process one too) first runs `--warmup` untimed calls per client.

    .venv/bin/python bench/onnx.py [--requests 400] [--warmup 50] [--client raw|http.client]
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from appliance.config import load_settings  # noqa: E402
from appliance.fetch import build_model, default_manifest, fetch_default  # noqa: E402
from appliance.registry import load_manifests, verify_model  # noqa: E402

from helpers import CACHE, make_state, start_server  # noqa: E402

LINE = "line-anomaly"
READINGS = np.array([[2.0, 50.0, 55.0, 12.0], [6.0, 70.0, 55.0, 12.0]], dtype=np.float32)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class RawClient:
    """HTTP/1.1 keep-alive on a bare socket: one prepared request, sent whole; the
    answer read up to its Content-Length, its status checked."""

    def __init__(self, port: int, request: bytes) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.request = request
        self.buffer = b""

    def _fill(self, buf: bytes) -> bytes:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("the server closed the connection")
        return buf + chunk

    def call(self) -> bytes:
        self.sock.sendall(self.request)
        buf = self.buffer
        while (end := buf.find(b"\r\n\r\n")) < 0:
            buf = self._fill(buf)
        lines = buf[:end].split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        start = end + 4
        while len(buf) < start + length:
            buf = self._fill(buf)
        body, self.buffer = buf[start : start + length], buf[start + length :]
        assert status == 200, (status, body[:200])
        return body


def http_request(port: int, url: str, headers: dict[str, str], payload: bytes) -> bytes:
    head = [f"POST {url} HTTP/1.1", f"Host: 127.0.0.1:{port}"]
    head += [f"{k}: {v}" for k, v in headers.items()]
    head.append(f"Content-Length: {len(payload)}")
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + payload


def run(
    clients: int, total: int, make_call: Callable[[], Callable[[], None]], warmup: int = 0
) -> dict[str, float]:
    per = total // clients
    latencies: list[float] = []
    lock = threading.Lock()
    ready = threading.Barrier(clients + 1)  # the clock starts once every client is warm

    def worker() -> None:
        call = make_call()
        for _ in range(warmup):
            call()
        ready.wait()
        mine = []
        for _ in range(per):
            start = time.perf_counter()
            call()
            mine.append(time.perf_counter() - start)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    ready.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    ms = [x * 1000 for x in latencies]
    return {
        "p50_ms": statistics.median(ms),
        "p99_ms": percentile(ms, 0.99),
        "rps": len(ms) / elapsed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--warmup", type=int, default=50, help="untimed calls per client")
    parser.add_argument("--client", choices=("raw", "http.client"), default="raw")
    args = parser.parse_args()
    settings = load_settings(env={}, overrides={"state_dir": CACHE})
    manifests = load_manifests(settings)
    default = default_manifest(manifests)
    if not verify_model(default, settings.models_path).ok:
        fetch_default(default, settings.models_path)
    if not verify_model(manifests[LINE], settings.models_path).ok:
        build_model(manifests[LINE], settings.models_path)
    model_path = settings.models_path / manifests[LINE].file

    json_body = json.dumps(
        {
            "inputs": [
                {
                    "name": "readings",
                    "shape": list(READINGS.shape),
                    "datatype": "FP32",
                    "data": READINGS.tolist(),
                }
            ]
        }
    )
    raw = READINGS.tobytes()
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "readings",
                    "shape": list(READINGS.shape),
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": len(raw)},
                }
            ],
            "parameters": {"binary_data_output": True},
        }
    ).encode()

    with tempfile.TemporaryDirectory(prefix="bench-onnx-") as tmp:
        state = make_state(Path(tmp) / "state", settings.models_path / default.file)
        server = start_server(state, "--rate-limit-per-minute", "0")
        results: dict[str, dict[str, float]] = {}
        try:

            def in_process() -> Callable[[], None]:
                session = ort.InferenceSession(str(model_path))
                options = session  # one session per client, as the server has one per model
                return lambda: options.run(None, {"readings": READINGS}) and None

            def api(binary: bool) -> Callable[[], Callable[[], None]]:
                def make() -> Callable[[], None]:
                    url = f"/v2/models/{LINE}/infer"
                    if binary:
                        payload = header + raw
                        headers = {
                            **server.auth,
                            "Inference-Header-Content-Length": str(len(header)),
                            "Content-Type": "application/octet-stream",
                        }
                    else:
                        payload = json_body.encode()
                        headers = {**server.auth, "Content-Type": "application/json"}
                    if args.client == "raw":
                        client = RawClient(
                            server.port, http_request(server.port, url, headers, payload)
                        )
                        return lambda: client.call() and None
                    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)

                    def call() -> None:
                        conn.request("POST", url, payload, headers)
                        resp = conn.getresponse()
                        resp.read()
                        assert resp.status == 200, resp.status

                    return call

                return make

            for clients in (1, 8):
                n, warm = args.requests, args.warmup
                results[f"in_process_{clients}"] = run(clients, n, in_process, warm)
                results[f"api_json_{clients}"] = run(clients, n, api(False), warm)
                results[f"api_binary_{clients}"] = run(clients, n, api(True), warm)
        finally:
            server.stop()

    print(f"client: {args.client}; {args.requests} timed requests per row")
    print(f"{'':18}{'p50 ms':>10}{'p99 ms':>10}{'req/s':>10}")
    for key, row in results.items():
        print(f"{key:18}{row['p50_ms']:10.3f}{row['p99_ms']:10.3f}{row['rps']:10.0f}")
    base = results["in_process_1"]["p50_ms"]
    overhead = {k: results[f"api_{k}_1"]["p50_ms"] - base for k in ("json", "binary")}
    print(
        f"API overhead at p50, 1 client: JSON {overhead['json']:.3f} ms, binary "
        f"{overhead['binary']:.3f} ms (target <= 1 ms)"
    )
    print(json.dumps({"client": args.client, "results": results, "overhead_p50_ms": overhead}))


if __name__ == "__main__":
    main()
