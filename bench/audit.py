"""The audit log's cost, measured in one run:

1. records/s at 1, 8 and 32 concurrent writers through the audit store (encrypted,
   chained, group commit, WAL + synchronous=FULL), against the same rows inserted
   plainly (no encryption, no chain) by the same number of threads, each insert its
   own transaction, on the same disk with the same pragmas;
2. the latency the audit adds to a real request: the real server answers
   /v1/completions (max_tokens 1) and logs, per request, the time it waited for its
   audit records (audit_ms): p50 and p99, beside the whole request's latency;
3. verify speed in records/s, over the log written in (1).

    .venv/bin/python bench/audit.py [--records 4000] [--requests 200]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import insert

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from appliance.audit import chain, crypto  # noqa: E402
from appliance.audit.records import Entry  # noqa: E402
from appliance.audit.schema import metadata, open_engine, records  # noqa: E402
from appliance.audit.store import AuditStore  # noqa: E402
from appliance.config import load_settings  # noqa: E402
from appliance.fetch import default_manifest, fetch_default  # noqa: E402
from appliance.registry import load_manifests, verify_model  # noqa: E402

from helpers import CACHE, make_state, start_server, wait_for  # noqa: E402

CONTENT = {"input": {"messages": [{"role": "user", "content": "x" * 400}]}}


def entry(i: int) -> Entry:
    return Entry(
        kind="request",
        request_id=f"bench-{i}",
        route="/v1/chat/completions",
        method="POST",
        model="m",
        model_sha256="0" * 64,
        content=CONTENT,
    )


def run_threads(writers: int, total: int, work: Callable[[int], None]) -> float:
    per = total // writers

    def loop(w: int) -> None:
        for i in range(per):
            work(w * per + i)

    threads = [threading.Thread(target=loop, args=(w,)) for w in range(writers)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return per * writers / (time.perf_counter() - start)


def audit_rate(root: Path, writers: int, total: int) -> tuple[float, Path]:
    settings = load_settings(env={}, overrides={"state_dir": root / f"audit-{writers}"})
    store = AuditStore(settings)
    rate = run_threads(writers, total, lambda i: store.append(entry(i)))
    store.close()
    return rate, settings.state_dir


def plain_rate(root: Path, writers: int, total: int) -> float:
    engine = open_engine(root / f"plain-{writers}.db")
    metadata.create_all(engine)
    plain_json = json.dumps(CONTENT).encode()

    def work(i: int) -> None:
        with engine.begin() as conn:
            conn.execute(
                insert(records).values(
                    seq=i + 1,
                    ts="2026-01-01T00:00:00.000000Z",
                    kind="request",
                    request_id=f"bench-{i}",
                    route="/v1/chat/completions",
                    method="POST",
                    model="m",
                    model_sha256="0" * 64,
                    content_policy="plain",
                    ciphertext=plain_json,
                    prev_hash="",
                    hash="",
                )
            )

    rate = run_threads(writers, total, work)
    engine.dispose()
    return rate


def request_latency(root: Path, requests: int) -> dict[str, float]:
    settings = load_settings(env={}, overrides={"state_dir": CACHE})
    manifest = default_manifest(load_manifests(settings))
    if not verify_model(manifest, settings.models_path).ok:
        fetch_default(manifest, settings.models_path)
    state = make_state(root / "server", settings.models_path / manifest.file)
    server = start_server(state)
    try:
        with server.client() as client:
            for _ in range(requests):
                r = client.post(
                    "/v1/completions",
                    json={"model": manifest.name, "prompt": "Hello", "max_tokens": 1},
                )
                assert r.status_code == 200, r.text
        wait_for(lambda: len([x for x in server.request_logs() if "audit_ms" in x]) >= requests, 10)
    finally:
        server.stop()
    logs = [x for x in server.request_logs() if x.get("route") == "/v1/completions"]
    audit_ms = sorted(float(x["audit_ms"]) for x in logs)  # type: ignore[arg-type]
    total_ms = sorted(float(x["latency_ms"]) for x in logs)  # type: ignore[arg-type]
    q = statistics.quantiles(audit_ms, n=100)
    return {
        "audit_ms_p50": statistics.median(audit_ms),
        "audit_ms_p99": q[98],
        "request_ms_p50": statistics.median(total_ms),
        "requests": len(logs),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=4000)
    parser.add_argument("--requests", type=int, default=200)
    args = parser.parse_args()
    results: dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="bench-audit-", dir=REPO) as tmp:
        root = Path(tmp)
        print(f"{'writers':>8}{'audit rec/s':>14}{'plain rec/s':>14}{'ratio':>8}")
        biggest = root
        for writers in (1, 8, 32):
            audited, state = audit_rate(root, writers, args.records)
            plain = plain_rate(root, writers, args.records)
            results[f"writers_{writers}"] = {
                "audit_rps": audited,
                "plain_rps": plain,
                "ratio": audited / plain,
            }
            print(f"{writers:8}{audited:14.0f}{plain:14.0f}{audited / plain:8.2f}")
            biggest = state
        settings = load_settings(env={}, overrides={"state_dir": biggest})
        key = crypto.load_public_key(settings.signing_public_key_path)
        start = time.perf_counter()
        report = chain.verify(settings.audit_db_path, key, settings.checkpoint_path)
        elapsed = time.perf_counter() - start
        assert report.ok, report.problem
        results["verify_rps"] = report.records / elapsed
        print(
            f"verify: {report.records} records in {elapsed:.3f} s = "
            f"{report.records / elapsed:.0f} records/s (target >= 50,000)"
        )
        latency = request_latency(root, args.requests)
        results["request"] = latency
        print(
            f"audit added per request: p50 {latency['audit_ms_p50']:.2f} ms, "
            f"p99 {latency['audit_ms_p99']:.2f} ms (target p50 <= 2 ms); whole request "
            f"p50 {latency['request_ms_p50']:.1f} ms"
        )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
