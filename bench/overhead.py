"""Where a streamed token's time goes besides llama.cpp (issue #13): one stream's decode
speed three ways, in turn, in one run, on the same model file and thread count:

- in-process: the appliance's engine (LlamaEngine, 4 slots, greedy) in this process,
  no HTTP: the ceiling the server could reach;
- appliance: the real server, a client streaming greedy chat completions;
- llama-server: llama.cpp's own (`-np 4`, bench/build-peers), the same client.

Each figure is one answer's tokens after its first over the time from its first to its
last (bench/peers.py's `stream_rate`), median over --repeats answers, the three run in
turn (and in reverse every other round: the host's drift falls on all three). Then,
inside the appliance's server, each thread's CPU time per streamed token (from
/proc/<pid>/task/<tid>/schedstat, over --repeats more answers): the model's threads,
the request threads (the chunk, the send) and the rest. On a box with no core to spare,
every microsecond of Python per token is taken from llama.cpp's threads.

    .venv/bin/python bench/overhead.py [--repeats 8] [--max-tokens 200]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "bench"))

from peers import llama_server, peer_tools, stream_rate  # noqa: E402

from appliance.config import load_settings  # noqa: E402
from appliance.engines.base import Finished, Generation, SamplingParams, TextDelta  # noqa: E402
from appliance.engines.kernels import cpu_model  # noqa: E402
from appliance.engines.llama import LlamaEngine, default_threads  # noqa: E402
from appliance.fetch import default_manifest  # noqa: E402
from appliance.registry import load_manifests  # noqa: E402

from helpers import CACHE, default_model_file, make_state, start_server  # noqa: E402
from llm import QUESTIONS, messages, through_api  # noqa: E402

CONTEXT = 2048


def in_process(engine: LlamaEngine, question: str, tag: str, max_tokens: int) -> float:
    stamps: list[float] = []
    done: list[Finished] = []

    def emit(event: object) -> None:
        if isinstance(event, TextDelta) and event.text:
            stamps.append(time.perf_counter())
        elif isinstance(event, Finished):
            done.append(event)

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    engine.admit(Generation(engine.chat_prompt(messages(question, tag)), params), emit, bool)
    while not done:
        engine.step()
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def thread_times(pid: int) -> dict[int, tuple[str, int]]:
    """Each thread of ``pid``: its name and the nanoseconds it has run."""
    found = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            found[int(task.name)] = (name, int((task / "schedstat").read_text().split()[0]))
        except (OSError, ValueError, IndexError):
            continue  # a thread that ended meanwhile
    return found


def role(name: str, model_thread: str) -> str:
    if name == model_thread:
        return "model (llama.cpp's threads and the scheduler)"
    if name.startswith("python") or name.startswith(".venv") or "/" in name:
        return "request threads and the server's loop"
    return f"other ({name})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=200)
    args = parser.parse_args()
    model = default_model_file()
    threads = default_threads()
    bin_dir = peer_tools()
    print(f"CPU: {cpu_model()}; {threads} threads; model {model.name}")
    engine = LlamaEngine(model, CONTEXT, threads, 0, parallel=4)
    with tempfile.TemporaryDirectory() as tmp:
        ours = start_server(
            make_state(Path(tmp) / "state", model),
            "--parallel-streams",
            "4",
            "--context-size",
            str(CONTEXT),
            "--threads",
            str(threads),
            env={"APPLIANCE_MEMORY_RESERVE_MB": "0"},
        )
        theirs, their_port = llama_server(bin_dir, model, threads, CONTEXT)
        settings = load_settings(env={}, overrides={"state_dir": CACHE})
        name = default_manifest(load_manifests(settings)).name  # the model's served name
        rates: dict[str, list[float]] = {"in-process": [], "appliance": [], "llama-server": []}
        try:

            def over_http(label: str, port: int, token: str, r: int) -> float:
                q = QUESTIONS[r % len(QUESTIONS)]
                run = through_api(port, token, name, messages(q, f"{label}{r}"), args.max_tokens)
                return stream_rate([run])

            measure: dict[str, Any] = {
                "in-process": lambda r: in_process(
                    engine, QUESTIONS[r % len(QUESTIONS)], f"i{r}", args.max_tokens
                ),
                "appliance": lambda r: over_http("a", ours.port, ours.token, r),
                "llama-server": lambda r: over_http("s", their_port, "-", r),
            }
            for r in range(args.repeats):
                order = list(measure) if r % 2 == 0 else list(reversed(measure))
                for label in order:
                    rates[label].append(measure[label](r))
            before = thread_times(ours.proc.pid)
            tokens = 0
            for r in range(args.repeats):
                q = QUESTIONS[r % len(QUESTIONS)]
                run = through_api(
                    ours.port, ours.token, name, messages(q, f"cpu{r}"), args.max_tokens
                )
                tokens += len(run["stamps"])
            after = thread_times(ours.proc.pid)
        finally:
            ours.stop()
            theirs.terminate()
            theirs.wait(30)
    engine.close()
    medians = {label: statistics.median(v) for label, v in rates.items()}
    print("one stream's decode tokens/s (median of the answers; each answer's figure)")
    for label, v in rates.items():
        print(f"  {label:13s} {medians[label]:7.1f}   " + " ".join(f"{x:.0f}" for x in v))
    print(
        f"  appliance / llama-server {medians['appliance'] / medians['llama-server']:.3f}; "
        f"in-process / llama-server {medians['in-process'] / medians['llama-server']:.3f}; "
        f"appliance / in-process {medians['appliance'] / medians['in-process']:.3f}"
    )
    per_role: Counter[str] = Counter()
    for tid, (thread, ns) in after.items():
        per_role[role(thread, f"model-{name}"[:15])] += ns - before.get(tid, (thread, 0))[1]
    print(f"the appliance's CPU per streamed token ({tokens} tokens; requests included):")
    for what, ns in per_role.most_common():
        print(f"  {what:48s} {ns / 1000 / tokens:8.1f} us")


if __name__ == "__main__":
    main()
