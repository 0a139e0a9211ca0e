"""The appliance beside llama.cpp's own tools: same llama.cpp source (bench/build-peers
builds them from the vendored copy the appliance's wheel was built from), same model
file, same machine, same thread count, one run (issue #13).

- Decode: aggregate tokens/s of 1, 4 and 8 clients streaming greedy chat completions
  (bench/llm.py's clients: a shared system prompt, distinct questions, ignore_eos,
  answers 0.5-1.5 x --max-tokens) through the appliance's API (4 parallel streams)
  and through `llama-server -np 4`, level by level, the two servers measured in turn
  --repeats times (A B, B A, A B: the host's drift falls on both), medians. Also each
  stream's own decode speed while it answers (tokens after the first over the time from
  first to last, median over answers): the aggregate counts the time between answers
  too (the request, its audit record, the prompt), which this leaves out.
- Prompt processing: `llama-bench -p 512 -n 0 -r ROUNDS` against the appliance (and
  llama-server) reading a 512-token prompt (token ids through /v1/completions, new
  each time so that no prefix is reused) for one token of answer: prompt tokens / time
  to the answer, request to response, median of --rounds. The three take turns
  --repeats times (after one warm-up answer from each server); the ratio is the median
  of each turn's appliance / llama-bench.

Usage:

    .venv/bin/python bench/peers.py [--model FILE] [--rounds 3] [--repeats 3] [--streams 1,4,8]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "bench"))

import httpx  # noqa: E402

from appliance.config import load_settings  # noqa: E402
from appliance.engines.kernels import cpu_model  # noqa: E402
from appliance.engines.llama import default_threads  # noqa: E402
from appliance.fetch import default_manifest  # noqa: E402
from appliance.registry import load_manifests  # noqa: E402

from helpers import CACHE, free_port, make_state, start_server  # noqa: E402
from llm import (  # noqa: E402
    QUESTIONS,
    answer_length,
    clients,
    messages,
    rate,
    through_api,
)


def stream_rate(runs: list[dict[str, Any]]) -> float:
    """Decode speed while answering: each answer's tokens after its first over the time
    from its first to its last, median over the answers. Leaves out what `rate` counts
    besides: the time between one answer and the next (the request, its audit record,
    the prompt)."""
    return statistics.median(
        (len(r["stamps"]) - 1) / (r["stamps"][-1] - r["stamps"][0]) for r in runs
    )


def prompt_rate(port: int, token: str, model: str, tag: int) -> float:
    """512 prompt tokens (as ids, the first new each time so that nothing is reused)
    and one token of answer, through /v1/completions: tokens/s to that answer."""
    prompt = [1000 + tag] + [(7 + 13 * i) % 20000 + 100 for i in range(511)]
    started = time.perf_counter()
    answer = httpx.post(
        f"http://127.0.0.1:{port}/v1/completions",
        headers={"Authorization": f"Bearer {token}"},
        json={"model": model, "prompt": prompt, "max_tokens": 1, "temperature": 0},
        timeout=300,
    )
    elapsed = time.perf_counter() - started
    answer.raise_for_status()
    return int(answer.json()["usage"]["prompt_tokens"]) / elapsed


def peer_tools() -> Path:
    """The directory of llama.cpp's own tools, built from the vendored source the first
    time (bench/build-peers)."""
    built = subprocess.run(
        [str(REPO / "bench" / "build-peers")], capture_output=True, text=True, check=True
    )
    return Path(built.stdout.strip().splitlines()[-1])


def llama_server(bin_dir: Path, model: Path, threads: int, ctx: int) -> tuple[Any, int]:
    port = free_port()
    proc = subprocess.Popen(
        [
            str(bin_dir / "llama-server"),
            "-m",
            str(model),
            "-np",
            "4",
            "-c",
            str(4 * ctx),
            "-t",
            str(threads),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-disable",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc, port
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("llama-server did not become ready")


def llama_bench(bin_dir: Path, model: Path, threads: int, repetitions: int) -> float:
    """pp512's mean over ``repetitions`` runs, after llama-bench's own warm-up run."""
    done = subprocess.run(
        [
            str(bin_dir / "llama-bench"),
            "-m",
            str(model),
            "-p",
            "512",
            "-n",
            "0",
            "-r",
            str(repetitions),
            "-t",
            str(threads),
            "-o",
            "json",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return float(json.loads(done.stdout)[0]["avg_ts"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="GGUF file; default: the default model")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--streams", default="1,4,8")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each server a level")
    parser.add_argument("--context-size", type=int, default=2048)
    args = parser.parse_args()
    settings = load_settings(env={}, overrides={"state_dir": CACHE})
    manifest = default_manifest(load_manifests(settings))
    model = args.model or CACHE / "models" / manifest.file
    threads = default_threads()
    bin_dir = peer_tools()
    cpu = cpu_model()
    print(f"CPU: {cpu}; {threads} threads; model {model.name}")

    with tempfile.TemporaryDirectory() as tmp:
        state = make_state(Path(tmp) / "state", model)
        if model.name != manifest.file:  # another file: serve it under the default's name
            os.replace(state / "models" / model.name, state / "models" / manifest.file)
        ours = start_server(
            state,
            "--parallel-streams",
            "4",
            "--context-size",
            str(args.context_size),
            "--threads",
            str(threads),
            env={"APPLIANCE_MEMORY_RESERVE_MB": "0"},
        )
        theirs, their_port = llama_server(bin_dir, model, threads, args.context_size)
        try:
            kernels = (
                httpx.get(f"{ours.url}/v1/models/{manifest.name}", headers=ours.auth, timeout=10)
                .json()
                .get("kernels")
            )
            print(f"appliance kernels: {kernels}")
            targets = {"appliance": (ours.port, ours.token), "llama-server": (their_port, "-")}
            print(f"{'streams':>7} {'appliance tok/s':>16} {'llama-server tok/s':>19} {'ratio':>6}")
            for n in [int(x) for x in args.streams.split(",")]:
                measured: dict[str, list[float]] = {label: [] for label in targets}
                streaming: dict[str, list[float]] = {label: [] for label in targets}
                for repeat in range(args.repeats):
                    # A B, B A, A B...: the host's drift over minutes falls on both alike.
                    order = list(targets) if repeat % 2 == 0 else list(reversed(targets))
                    for label in order:
                        port, token = targets[label]

                        def call(
                            i: int,
                            k: int,
                            port: int = port,
                            token: str = token,
                            label: str = label,
                            n: int = n,
                            repeat: int = repeat,
                        ) -> dict[str, Any]:
                            q = QUESTIONS[(i + k) % len(QUESTIONS)]
                            return through_api(
                                port,
                                token,
                                manifest.name,
                                messages(q, f"{label}-{n}-{repeat}-{i}-{k}"),
                                answer_length(args.max_tokens, i, k),
                            )

                        runs = clients(n, args.rounds, call)
                        measured[label].append(rate(runs))
                        streaming[label].append(stream_rate(runs))
                rates = {label: statistics.median(v) for label, v in measured.items()}
                per_stream = {label: statistics.median(v) for label, v in streaming.items()}
                spread = "  ".join(
                    f"{label} " + "/".join(f"{x:.0f}" for x in v) for label, v in measured.items()
                )
                print(
                    f"{n:7d} {rates['appliance']:16.1f} {rates['llama-server']:19.1f} "
                    f"{rates['appliance'] / rates['llama-server']:6.2f}   ({spread}); "
                    f"one stream while answering {per_stream['appliance']:.1f} against "
                    f"{per_stream['llama-server']:.1f} tok/s "
                    f"({per_stream['appliance'] / per_stream['llama-server']:.2f})",
                    flush=True,
                )
            # One answer from each server first: a slot's first prompt faults its cache's
            # pages in (llama-bench, too, warms up before it measures).
            prompt_rate(ours.port, ours.token, manifest.name, 999)
            prompt_rate(their_port, "-", manifest.name, 1999)
            prompts: dict[str, list[float]] = {"appliance": [], "llama-server": [], "bench": []}
            for repeat in range(args.repeats):
                # Interleaved as the decode levels are: the host's drift falls on all three.
                order = ["appliance", "llama-server", "bench"]
                for label in order if repeat % 2 == 0 else reversed(order):
                    tag = 1000 * (repeat + 1) + (100 if label == "appliance" else 500)
                    if label == "bench":
                        prompts[label].append(llama_bench(bin_dir, model, threads, args.rounds))
                        continue
                    port, token = targets[label]
                    prompts[label].append(
                        statistics.median(
                            prompt_rate(port, token, manifest.name, tag + k)
                            for k in range(args.rounds)
                        )
                    )
        finally:
            ours.stop()
            theirs.terminate()
            theirs.wait(30)
    pp = {label: statistics.median(v) for label, v in prompts.items()}
    ratios = [a / b for a, b in zip(prompts["appliance"], prompts["bench"], strict=True)]
    print(
        f"prompt processing (512 tokens): appliance {pp['appliance']:.0f} tok/s, llama-server "
        f"{pp['llama-server']:.0f} tok/s, llama-bench pp512 {pp['bench']:.0f} tok/s; "
        f"appliance / llama-bench {statistics.median(ratios):.2f} (each repeat: "
        + "/".join(f"{r:.2f}" for r in ratios)
        + ")"
    )


if __name__ == "__main__":
    main()
