"""Many streams through the appliance's HTTP API against llama-cpp-python in-process
single-stream, in one run, on the same model, thread count and prompts.

- Baseline: llama-cpp-python's `Llama` in this process, one stream at a time, greedy.
- API: 1, 2, 4 and 8 clients at once, each streaming greedy chat completions one
  after the other (a shared system prompt and a distinct question, as a ward or a line
  would send), `ignore_eos` and answers from 0.5 to 1.5 x `--max-tokens` long (see
  answer_length); the server batches them. Each client's first request is a warm-up
  (they all start together).

Figures per level: aggregate decode tokens/s (all content tokens received / time from
the first measured stream's first token to the last one's last), its ratio to the
baseline's single-stream rate measured just before and after that level, TTFT p50/p95
(request start to first content token), and the mean number of streams a batch step
carried (the server's /metrics counters). Then prefix reuse: TTFT of a request whose
long system prompt is new, and of the next one that shares it. Usage:

    .venv/bin/python bench/llm.py [--rounds 3] [--max-tokens 128] [--streams 1,2,4,8]
        [--gpu-layers -1]  # on a GPU build: both sides offload

(`--rounds`: measured requests per client; the baseline runs 4 requests before each
level and after the last.)
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
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from appliance.config import load_settings  # noqa: E402
from appliance.engines import kernels  # noqa: E402
from appliance.engines.llama import default_threads  # noqa: E402
from appliance.fetch import default_manifest, fetch_default  # noqa: E402
from appliance.registry import load_manifests, verify_model  # noqa: E402

from helpers import CACHE, make_state, start_server  # noqa: E402

SYSTEM = "You are a careful assistant on a hospital ward. Answer in plain words."
QUESTIONS = [
    "Write a long story about a lighthouse keeper and a storm.",
    "Explain step by step how to check a patient's blood pressure.",
    "Describe the history of the printing press in detail.",
    "List and explain twenty kinds of weather.",
    "Tell me about the life of honey bees.",
    "How does a hospital pharmacy keep medicines safe?",
    "Describe a walk through a forest in autumn.",
    "Explain how a steam engine works.",
]
LONG_SYSTEM = (
    SYSTEM + " " + " ".join(f"Rule {i}: keep to the facts of the ward." for i in range(60))
)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def messages(question: str, tag: str, system: str = SYSTEM) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": system},
        {"role": "user", "content": f"({tag}) {question}"},
    ]


def in_process(llm: Any, msgs: list[dict[str, str]], max_tokens: int) -> dict[str, Any]:
    start = time.perf_counter()
    stamps = []
    for chunk in llm.create_chat_completion(
        messages=msgs, max_tokens=max_tokens, temperature=0, stream=True
    ):
        if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
            stamps.append(time.perf_counter())
    return {"start": start, "stamps": stamps}


def through_api(
    port: int, token: str, model: str, msgs: list[dict[str, str]], max_tokens: int
) -> dict[str, Any]:
    body = json.dumps(
        {
            "model": model,
            "messages": msgs,
            "max_tokens": max_tokens,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
        }
    )
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    start = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body, headers)
    resp = conn.getresponse()
    assert resp.status == 200, resp.read()
    stamps = []
    while line := resp.readline():
        if line.startswith(b"data: {") and b'"content":"' in line and b'"content":""' not in line:
            stamps.append(time.perf_counter())
        elif line.startswith(b"data: [DONE]"):
            break
    resp.read()
    conn.close()
    return {"start": start, "stamps": stamps}


def batch_counters(port: int, model: str) -> dict[str, float]:
    """The server's batch counters (/metrics): steps, and the streams they carried."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    found = {}
    for name, key in (
        ("appliance_batch_steps_total", "steps"),
        ("appliance_batch_sequences_total", "sequences"),
    ):
        line = next(x for x in text.splitlines() if x.startswith(f'{name}{{model="{model}"}}'))
        found[key] = float(line.split()[-1])
    return found


def rate(runs: list[dict[str, Any]]) -> float:
    """Content tokens of all runs over the time from the first token to the last."""
    first = min(r["stamps"][0] for r in runs)
    last = max(r["stamps"][-1] for r in runs)
    return sum(len(r["stamps"]) - 1 for r in runs) / (last - first)


def ttfts(runs: list[dict[str, Any]]) -> list[float]:
    return [(r["stamps"][0] - r["start"]) * 1000 for r in runs]


def answer_length(mean: int, client: int, request: int) -> int:
    """Answers of different lengths (0.5 to 1.5 x the mean, the mean over any five),
    as real answers are: equal lengths would keep the clients in lockstep, every
    request arriving in the same instant as the others."""
    return round(mean * (0.5 + 0.25 * ((client + 2 * request) % 5)))


def clients(n: int, requests: int, call: Any) -> list[dict[str, Any]]:
    """n clients at once, each sending `requests` + 1 requests one after the other (a
    closed loop: the next when the last answer ended). Each client's first request is
    left out of the figures: those n start in the same instant, which a ward or a line
    in steady use does not do. Returns the other runs."""
    results: list[list[dict[str, Any]]] = [[] for _ in range(n)]
    gate = threading.Barrier(n)

    def run(i: int) -> None:
        gate.wait(60)
        for k in range(requests + 1):
            result = call(i, k)
            if k:
                results[i].append(result)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(1800)
    return [r for rs in results for r in rs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--state-dir", type=Path, default=CACHE)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--streams", default="1,2,4,8")
    parser.add_argument("--parallel-streams", type=int, default=4)
    parser.add_argument("--context-size", type=int, default=2048)
    parser.add_argument(
        "--gpu-layers", type=int, default=0, help="both sides: layers on the GPU (-1: all)"
    )
    args = parser.parse_args()
    levels = [int(n) for n in args.streams.split(",")]

    from llama_cpp import Llama

    settings = load_settings(env={}, overrides={"state_dir": args.state_dir})
    manifest = default_manifest(load_manifests(settings))
    if not verify_model(manifest, settings.models_path).ok:
        fetch_default(manifest, settings.models_path)
    model_file = settings.models_path / manifest.file
    threads = default_threads()

    with tempfile.TemporaryDirectory(prefix="bench-llm-") as tmp:
        state = make_state(Path(tmp) / "state", model_file)
        server = start_server(
            state,
            "--context-size",
            str(args.context_size),
            "--threads",
            str(threads),
            "--parallel-streams",
            str(args.parallel_streams),
            "--queue-depth",
            str(max(levels)),
            env={"APPLIANCE_GPU_LAYERS": str(args.gpu_layers)},
        )
        try:
            kernels.plan()  # the CPU kernels the appliance picks, before Llama loads any
            llm = Llama(
                model_path=str(model_file),
                n_ctx=args.context_size,
                n_threads=threads,
                n_threads_batch=threads,
                n_gpu_layers=args.gpu_layers,
                # As the appliance keeps a CPU model off a GPU llama.cpp sees.
                **({"split_mode": 0, "main_gpu": -1} if args.gpu_layers == 0 else {}),
                verbose=False,
            )

            def api(msgs: list[dict[str, str]], max_tokens: int) -> dict[str, Any]:
                return through_api(server.port, server.token, manifest.name, msgs, max_tokens)

            in_process(llm, messages("Say hello.", "warm-up"), 8)  # page cache, allocations
            api(messages("Say hello.", "warm-up"), 8)

            def baseline(tag: str) -> list[dict[str, Any]]:
                return [
                    in_process(llm, messages(q, f"base {tag}"), args.max_tokens)
                    for q in QUESTIONS[:4]
                ]

            # The baseline runs before every level and after the last: each level is
            # compared with the baseline measured on either side of it, so that a
            # machine whose speed drifts over minutes (shared hosts do) compares fairly.
            chunks = [baseline("0")]
            by_level: dict[int, list[dict[str, Any]]] = {}
            batching: dict[int, float] = {}
            for j, n in enumerate(levels):
                if j:
                    chunks.append(baseline(str(j)))
                before = batch_counters(server.port, manifest.name)
                by_level[n] = clients(
                    n,
                    args.rounds,
                    lambda i, k, n=n: api(
                        messages(QUESTIONS[(i + k) % len(QUESTIONS)], f"{n}:{i}.{k}"),
                        answer_length(args.max_tokens, i, k),
                    ),
                )
                after = batch_counters(server.port, manifest.name)
                steps = after["steps"] - before["steps"]
                batching[n] = (after["sequences"] - before["sequences"]) / max(steps, 1)
            chunks.append(baseline("last"))
            # Prefix reuse: a new long system prompt, then the next question under it.
            cold, warm = [], []
            for r in range(args.rounds):
                system = f"[{r}] {LONG_SYSTEM}"
                cold += ttfts([api(messages(QUESTIONS[0], "cold", system), 4)])
                warm += ttfts([api(messages(QUESTIONS[1], "warm", system), 4)])
            prompt_tokens = len(llm.tokenize(LONG_SYSTEM.encode(), add_bos=False))
        finally:
            server.stop()

    base = [b for chunk in chunks for b in chunk]
    base_rate = statistics.fmean(rate([b]) for b in base)
    base_ttft = ttfts(base)
    rows: dict[str, Any] = {}
    for j, n in enumerate(levels):
        runs = by_level[n]
        t = ttfts(runs)
        agg = rate(runs)
        beside = statistics.fmean(rate([b]) for b in chunks[j] + chunks[j + 1])
        rows[n] = {
            "aggregate_tok_s": agg,
            "baseline_beside_tok_s": beside,
            "ratio": agg / beside,
            "ttft_ms_p50": statistics.median(t),
            "ttft_ms_p95": percentile(t, 0.95),
            "requests": len(runs),
            "streams_per_step": batching[n],
        }
    print(
        f"model {manifest.name}, {threads} threads, {args.parallel_streams} slots, "
        f"{args.max_tokens} tokens per answer, {args.rounds} measured requests per client"
    )
    print(
        f"{'':24}{'decode tok/s':>14}{'x baseline':>12}{'TTFT p50 ms':>13}{'TTFT p95 ms':>13}"
        f"{'streams/step':>14}"
    )
    print(
        f"{'in-process, 1 stream':24}{base_rate:14.1f}{1.0:12.2f}"
        f"{statistics.median(base_ttft):13.1f}{percentile(base_ttft, 0.95):13.1f}"
    )
    for n, row in rows.items():
        print(
            f"{f'API, {n} stream(s)':24}{row['aggregate_tok_s']:14.1f}{row['ratio']:12.2f}"
            f"{row['ttft_ms_p50']:13.1f}{row['ttft_ms_p95']:13.1f}{row['streams_per_step']:14.2f}"
        )
    targets = []
    if 1 in rows:
        targets.append(f"1 stream {rows[1]['ratio']:.2f} x (target >= 0.97)")
    if 4 in rows:
        targets.append(f"4 streams {rows[4]['ratio']:.2f} x (target >= 1.7)")
    if 1 in rows and 4 in rows:
        limit = 2 * rows[1]["ttft_ms_p50"]
        targets.append(
            f"TTFT p95 at 4 streams {rows[4]['ttft_ms_p95']:.0f} ms vs 2 x p50 at 1 = "
            f"{limit:.0f} ms"
        )
    print("; ".join(targets))
    print(
        f"prefix reuse (system prompt of ~{prompt_tokens} tokens): TTFT p50 new "
        f"{statistics.median(cold):.1f} ms, shared {statistics.median(warm):.1f} ms"
    )
    print(
        json.dumps(
            {
                "model": manifest.name,
                "threads": threads,
                "slots": args.parallel_streams,
                "max_tokens": args.max_tokens,
                "baseline_tok_s": base_rate,
                "levels": rows,
                "ttft_new_prefix_ms_p50": statistics.median(cold),
                "ttft_shared_prefix_ms_p50": statistics.median(warm),
            }
        )
    )


if __name__ == "__main__":
    main()
