"""Streaming through the appliance's HTTP API against llama-cpp-python in-process, in
one run, on the same model, prompts and thread count.

For each prompt (a shared system prompt and a distinct question, as a ward or a line
would send), greedy decoding, the in-process baseline and the API run back to back:
- TTFT: request start to the first content token received;
- decode tokens/s: (content chunks - 1) / (last chunk - first chunk).
Prints both, p50 and p95, and the ratios. Usage:

    .venv/bin/python bench/llm.py [--state-dir DIR] [--rounds 3] [--max-tokens 128]
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from appliance.config import load_settings  # noqa: E402
from appliance.engines.llama import default_threads  # noqa: E402
from appliance.fetch import default_manifest, fetch_default  # noqa: E402
from appliance.registry import load_manifests, verify_model  # noqa: E402

from helpers import CACHE, make_state, start_server  # noqa: E402

HEADERS = {"Content-Type": "application/json"}
SYSTEM = "You are a careful assistant on a hospital ward. Answer in plain words."
QUESTIONS = [
    "Write a long story about a lighthouse keeper and a storm.",
    "Explain step by step how to check a patient's blood pressure.",
    "Describe the history of the printing press in detail.",
    "List and explain twenty kinds of weather.",
]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def messages(question: str, round_no: int) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": f"(request {round_no}) {question}"},
    ]


def measure_in_process(llm: Any, msgs: list[dict[str, str]], max_tokens: int) -> dict[str, float]:
    start = time.perf_counter()
    stamps = []
    for chunk in llm.create_chat_completion(
        messages=msgs, max_tokens=max_tokens, temperature=0, stream=True
    ):
        if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
            stamps.append(time.perf_counter())
    return summarize(start, stamps)


def measure_api(
    conn: http.client.HTTPConnection, model: str, msgs: list[dict[str, str]], max_tokens: int
) -> dict[str, float]:
    body = json.dumps(
        {
            "model": model,
            "messages": msgs,
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": True,
        }
    )
    start = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body, HEADERS)
    resp = conn.getresponse()
    assert resp.status == 200, resp.read()
    stamps = []
    while line := resp.readline():
        if line.startswith(b"data: {") and b'"content":"' in line and b'"content":""' not in line:
            stamps.append(time.perf_counter())
        elif line.startswith(b"data: [DONE]"):
            break
    resp.read()
    return summarize(start, stamps)


def summarize(start: float, stamps: list[float]) -> dict[str, float]:
    decode = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else 0.0
    return {"ttft_ms": (stamps[0] - start) * 1000, "tokens": len(stamps), "tok_s": decode}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--state-dir", type=Path, default=CACHE)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--context-size", type=int, default=4096)
    args = parser.parse_args()

    from llama_cpp import Llama

    settings = load_settings(env={}, overrides={"state_dir": args.state_dir})
    manifest = default_manifest(load_manifests(settings))
    if not verify_model(manifest, settings.models_path).ok:
        fetch_default(manifest, settings.models_path)
    model_file = settings.models_path / manifest.file
    threads = default_threads()

    import tempfile

    with tempfile.TemporaryDirectory(prefix="bench-llm-") as tmp:
        state = make_state(Path(tmp) / "state", model_file)
        server = start_server(
            state, "--context-size", str(args.context_size), "--threads", str(threads)
        )
        try:
            llm = Llama(
                model_path=str(model_file),
                n_ctx=args.context_size,
                n_threads=threads,
                n_threads_batch=threads,
                verbose=False,
            )
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
            HEADERS["Authorization"] = f"Bearer {server.token}"
            # Warm both paths (page cache, first allocations).
            measure_in_process(llm, messages("Say hello.", 0), 8)
            measure_api(conn, manifest.name, messages("Say hello.", 0), 8)
            base: list[dict[str, float]] = []
            api: list[dict[str, float]] = []
            for r in range(1, args.rounds + 1):
                for q in QUESTIONS:
                    base.append(measure_in_process(llm, messages(q, r), args.max_tokens))
                    api.append(measure_api(conn, manifest.name, messages(q, r), args.max_tokens))
            conn.close()
        finally:
            server.stop()

    def agg(rows: list[dict[str, float]]) -> dict[str, float]:
        ttft = [r["ttft_ms"] for r in rows]
        return {
            "decode_tok_s_mean": statistics.fmean(r["tok_s"] for r in rows),
            "ttft_ms_p50": statistics.median(ttft),
            "ttft_ms_p95": percentile(ttft, 0.95),
            "tokens_mean": statistics.fmean(r["tokens"] for r in rows),
        }

    b, a = agg(base), agg(api)
    result = {
        "model": manifest.name,
        "threads": threads,
        "requests": len(api),
        "max_tokens": args.max_tokens,
        "in_process": b,
        "api": a,
        "decode_ratio_api_over_in_process": a["decode_tok_s_mean"] / b["decode_tok_s_mean"],
        "ttft_p50_overhead_ms": a["ttft_ms_p50"] - b["ttft_ms_p50"],
    }
    print(f"{'':14}{'decode tok/s':>14}{'TTFT p50 ms':>14}{'TTFT p95 ms':>14}{'tokens':>9}")
    for label, row in (("in-process", b), ("API (HTTP)", a)):
        print(
            f"{label:14}{row['decode_tok_s_mean']:14.1f}{row['ttft_ms_p50']:14.1f}"
            f"{row['ttft_ms_p95']:14.1f}{row['tokens_mean']:9.1f}"
        )
    print(
        f"decode ratio API / in-process: {result['decode_ratio_api_over_in_process']:.3f} "
        "(target >= 0.97)"
    )
    print(f"TTFT p50 overhead: {result['ttft_p50_overhead_ms']:+.1f} ms (target <= 10 ms)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
