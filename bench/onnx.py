"""The line model through /v2/models/line-anomaly/infer (JSON and binary tensors) against
onnxruntime in-process, in one run: p50 and p99 latency and requests/s at 1 and 8
concurrent clients, and the API's overhead over in-process at p50.

    .venv/bin/python bench/onnx.py [--requests 400]
"""

from __future__ import annotations

import argparse
import http.client
import json
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


def run(clients: int, total: int, make_call: Callable[[], Callable[[], None]]) -> dict[str, float]:
    per = total // clients
    latencies: list[float] = []
    lock = threading.Lock()

    def worker() -> None:
        call = make_call()
        mine = []
        for _ in range(per):
            start = time.perf_counter()
            call()
            mine.append(time.perf_counter() - start)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
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
                    # A lean keep-alive client, as a line system's would be.
                    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
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

                    def call() -> None:
                        conn.request("POST", url, payload, headers)
                        resp = conn.getresponse()
                        resp.read()
                        assert resp.status == 200, resp.status

                    return call

                return make

            for clients in (1, 8):
                results[f"in_process_{clients}"] = run(clients, args.requests, in_process)
                results[f"api_json_{clients}"] = run(clients, args.requests, api(False))
                results[f"api_binary_{clients}"] = run(clients, args.requests, api(True))
        finally:
            server.stop()

    print(f"{'':18}{'p50 ms':>10}{'p99 ms':>10}{'req/s':>10}")
    for key, row in results.items():
        print(f"{key:18}{row['p50_ms']:10.3f}{row['p99_ms']:10.3f}{row['rps']:10.0f}")
    base = results["in_process_1"]["p50_ms"]
    overhead = {k: results[f"api_{k}_1"]["p50_ms"] - base for k in ("json", "binary")}
    print(
        f"API overhead at p50, 1 client: JSON {overhead['json']:.3f} ms, binary "
        f"{overhead['binary']:.3f} ms (target <= 1 ms)"
    )
    print(json.dumps({"results": results, "overhead_p50_ms": overhead}))


if __name__ == "__main__":
    main()
