"""Specialists (LoRA adapters over the default model) against the base model, decoding
at once through the real server, in one run on this machine.

Four streams at once (`--streams`), each a streamed greedy chat completion of
`--max-tokens` tokens (64) with `ignore_eos` (every stream gives exactly that many), a
shared system prompt and a distinct question, sent together (a barrier) in four
configurations:

  a. base   all streams on the base model (smollm2-135m-instruct): the baseline;
  b. 1 spec all streams on one specialist (target >= 0.9 x the base);
  c. 2 spec the streams spread over two specialists (two each);
  d. 4 spec the streams spread over four specialists (one each; target >= 0.7 x).

Each specialist has one adapter of its own, made by tests/loras.py's write_lora (rank 8,
attn_q and attn_v, a small `--strength` so that the text stays sane), at scale 1. The
server runs with `--parallel-streams 4 --context-size 512 --keep-alive -1`; every model
is warmed (one request each) before anything is timed. Each configuration runs
`--rounds` times (3), the configurations interleaved (their order rotated each round),
and the figures are medians over the rounds.

Figures per configuration: decode tokens/s (all streams' tokens after their first /
the time from the first stream's first token to the last stream's last, as
bench/llm.py counts them: prefill left out), the end-to-end rate (completion tokens /
the batch's wall time from sending to the last token), TTFT, the server's CPU seconds
per wall second and per token, and the threads its process runs (psutil). Each
specialist is a llama.cpp context of its own with its own worker thread, decoding its
batch with `--threads` llama.cpp threads (OpenMP), so specialists busy at once run
their batches side by side on the same cores instead of in one batch.

    .venv/bin/python bench/adapters.py [--rounds 3] [--max-tokens 64] [--strength 0.02] \
        [--threads N] [--server-env KEY=VALUE ...] [--out bench/results/adapters/run.json]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.client
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

import psutil  # noqa: E402

from appliance.config import load_settings  # noqa: E402
from appliance.engines.kernels import cpu_model  # noqa: E402
from appliance.engines.llama import default_threads  # noqa: E402
from appliance.fetch import default_manifest, fetch_default  # noqa: E402
from appliance.registry import Manifest, load_manifests, verify_model  # noqa: E402

from helpers import CACHE, Server, make_state, start_server  # noqa: E402
from loras import write_lora  # noqa: E402

SYSTEM = "You are a careful assistant on a hospital ward. Answer in plain words."
QUESTIONS = [
    "Write a long story about a lighthouse keeper and a storm.",
    "Explain step by step how to check a patient's blood pressure.",
    "Describe the history of the printing press in detail.",
    "Tell me about the life of honey bees.",
    "How does a hospital pharmacy keep medicines safe?",
    "Describe a walk through a forest in autumn.",
    "Explain how a steam engine works.",
    "List and explain twenty kinds of weather.",
]
WARM_PROMPT = "Name three colours of the rainbow."
SPECIALISTS = 4  # one adapter each
REQUEST_TIMEOUT = 120  # seconds: any one request
DISTURBED_CORES = 0.2  # a run with more cores busy outside the server is flagged
STARTED = time.perf_counter()

# Every anomaly seen (a status other than 200, an error in a stream, a stream without
# [DONE] or with fewer tokens than asked, a server log line at warning or above):
# printed at once, and in the JSON.
ANOMALIES: list[dict[str, Any]] = []


def anomaly(what: str, **details: Any) -> None:
    ANOMALIES.append({"what": what, **details})
    print(f"ANOMALY: {what}: {json.dumps(details)[:2000]}", file=sys.stderr, flush=True)


def note(text: str) -> None:
    print(f"[{time.perf_counter() - STARTED:6.1f} s] {text}", file=sys.stderr, flush=True)


# -- state: the default model, four adapters and their specialists ---------------------


def adapter_toml(name: str, base: Manifest, sha: str, rank: int, alpha: float) -> str:
    return (
        f'name = "{name}"\nkind = "adapter"\nfile = "{name}.gguf"\nsha256 = "{sha}"\n'
        'format = "gguf"\nlicense = "Apache-2.0"\nsource = "made by tests/loras.py"\n'
        f'[adapter]\nbase = "{base.name}"\nbase_sha256 = "{base.sha256}"\nrank = {rank}\n'
        f'alpha = {alpha}\n[provenance]\nmade_by = "bench/adapters.py"\n'
    )


def specialist_toml(name: str, base: str, adapter: str) -> str:
    return (
        f'name = "{name}"\nkind = "specialist"\nbase = "{base}"\n'
        f'[[adapters]]\nname = "{adapter}"\nscale = 1.0\n'
    )


def build_state(root: Path, model_file: Path, base: Manifest, args: argparse.Namespace) -> Path:
    """A state directory of the benchmark's own: the pinned models hard-linked, and
    SPECIALISTS adapters (written here) with one specialist over each."""
    state = make_state(root, model_file)
    manifests = state / "manifests"
    manifests.mkdir(exist_ok=True)
    for i in range(SPECIALISTS):
        adapter = f"bench-lora-{i}"
        path = write_lora(
            state / "models" / f"{adapter}.gguf",
            model_file,
            rank=args.rank,
            alpha=float(args.rank),  # alpha / rank = 1: the update as written, at scale 1
            seed=100 + i,
            strength=args.strength,
        )
        sha = hashlib.sha256(path.read_bytes()).hexdigest()
        (manifests / f"{adapter}.toml").write_text(
            adapter_toml(adapter, base, sha, args.rank, float(args.rank))
        )
        (manifests / f"spec-{i}.toml").write_text(specialist_toml(f"spec-{i}", base.name, adapter))
    return state


# -- the server -------------------------------------------------------------------------


def stop(server: Server) -> list[str]:
    """SIGTERM to the server's process group, SIGKILL if it does not end in 30 s; its log
    lines at warning or above (each an anomaly)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.proc.pid, signal.SIGTERM)
    try:
        code = server.proc.wait(30)
        if code != 0:
            time.sleep(0.2)  # the threads draining its pipes
            tail = [x for x in server.stderr if '"appliance.request"' not in x][-40:]
            anomaly(f"server exited {code} on SIGTERM", log=tail)
    except subprocess.TimeoutExpired:
        anomaly("server still running 30 s after SIGTERM; killed")
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.proc.pid, signal.SIGKILL)
        server.proc.wait(10)
    time.sleep(0.2)  # the threads draining its pipes
    loud = []
    for record in server.log_records():
        if record.get("level") in ("warning", "error", "critical"):
            line = json.dumps(record)
            loud.append(line)
            anomaly(f"server logged at {record.get('level')}", line=line[:1000])
    return loud


def group_processes(pgid: int) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):
            if os.getpgid(proc.pid) == pgid:
                found.append(proc)
    return found


def group_usage(pgid: int) -> dict[str, float]:
    """The server's process group: threads, CPU seconds (user + system) and RSS."""
    total = {"processes": 0.0, "threads": 0.0, "cpu_s": 0.0, "rss": 0.0}
    for proc in group_processes(pgid):
        try:
            with proc.oneshot():
                times = proc.cpu_times()
                total["threads"] += proc.num_threads()
                total["cpu_s"] += times.user + times.system
                total["rss"] += proc.memory_info().rss
                total["processes"] += 1
        except psutil.Error:
            continue
    return total


def busy_cpu_s() -> float:
    """CPU seconds the whole machine has spent busy (all cores) since boot."""
    t = psutil.cpu_times()
    return float(t.user + t.nice + t.system + t.irq + t.softirq + getattr(t, "steal", 0.0))


def get_json(server: Server, path: str) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        conn.request("GET", path, headers=server.auth)
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, json.loads(data) if data.startswith((b"{", b"[")) else data.decode()
    finally:
        conn.close()


def batch_counters(server: Server) -> dict[str, dict[str, float]]:
    """Per model: the server's batch steps and the streams they carried (/metrics)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    found: dict[str, dict[str, float]] = {}
    for line in text.splitlines():
        for metric, key in (
            ("appliance_batch_steps_total", "steps"),
            ("appliance_batch_sequences_total", "sequences"),
        ):
            if line.startswith(f'{metric}{{model="'):
                model = line.split('"')[1]
                found.setdefault(model, {})[key] = float(line.split()[-1])
    return found


def chat_stream(
    server: Server, model: str, question: str, tag: str, max_tokens: int
) -> dict[str, Any]:
    """One streamed greedy chat completion with ignore_eos: the send time, each content
    chunk's arrival, the text and the usage the server reports. The prompt is the same
    in every round (``tag`` only names the request in anomalies), so that one model's
    answers to one question can be compared across runs and with the base's."""
    body = {
        "model": model,
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": question},
        ],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    headers = {"Content-Type": "application/json", **server.auth}
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=REQUEST_TIMEOUT)
    stamps: list[float] = []
    parts: list[str] = []
    usage: dict[str, Any] | None = None
    done = False
    start = time.perf_counter()
    try:
        conn.request("POST", "/v1/chat/completions", json.dumps(body), headers)
        resp = conn.getresponse()
        if resp.status != 200:
            text = resp.read().decode(errors="replace")
            anomaly(f"{model} {tag}: status {resp.status}", request=body, response=text[:2000])
            return {"start": start, "stamps": [], "text": "", "usage": None, "ok": False}
        # Bounded: a chunk a token, a few more lines per chunk, keep-alive comments.
        for _ in range(8 * max_tokens + 200):
            line = resp.readline()
            if not line:
                break
            if line.startswith(b"data: [DONE]"):
                done = True
                break
            if not line.startswith(b"data: {"):
                continue
            now = time.perf_counter()
            chunk = json.loads(line[6:])
            if chunk.get("error"):
                anomaly(f"{model} {tag}: error in the stream", request=body, chunk=chunk)
            if chunk.get("usage"):
                usage = chunk["usage"]
            choices = chunk.get("choices") or []
            content = choices[0]["delta"].get("content") if choices else None
            if content:
                stamps.append(now)
                parts.append(content)
        resp.read()
    except (OSError, http.client.HTTPException) as exc:
        anomaly(f"{model} {tag}: {exc!r}", request=body, chunks=len(stamps))
    finally:
        conn.close()
    tokens = (usage or {}).get("completion_tokens")
    if not done or tokens != max_tokens or not stamps:
        anomaly(
            f"{model} {tag}: stream ended without [DONE] or with {tokens} tokens "
            f"(asked {max_tokens})",
            request=body,
            usage=usage,
            content_chunks=len(stamps),
            done=done,
            text="".join(parts)[:500],
        )
    return {
        "start": start,
        "stamps": stamps,
        "text": "".join(parts),
        "usage": usage,
        "ok": done and bool(stamps),
    }


# -- one batch of streams ---------------------------------------------------------------

CONFIGS: dict[str, list[int | None]] = {
    # stream i -> specialist index (None: the base)
    "a_base": [None, None, None, None],
    "b_1_specialist": [0, 0, 0, 0],
    "c_2_specialists": [0, 0, 1, 1],
    "d_4_specialists": [0, 1, 2, 3],
}
LABELS = {
    "a_base": "a. base alone",
    "b_1_specialist": "b. 1 specialist",
    "c_2_specialists": "c. 2 specialists",
    "d_4_specialists": "d. 4 specialists",
}


def model_of(index: int | None, base: str) -> str:
    return base if index is None else f"spec-{index}"


def spread(config: str, streams: int) -> list[int | None]:
    """The stream-to-model map of a configuration for `streams` streams (the four-stream
    pattern repeated or cut)."""
    pattern = CONFIGS[config]
    return [pattern[i % len(pattern)] for i in range(streams)]


def batch(
    server: Server, base: str, config: str, tag: str, args: argparse.Namespace
) -> dict[str, Any]:
    """`args.streams` streams at once (a barrier), one a thread; the figures."""
    mapping = spread(config, args.streams)
    models = [model_of(m, base) for m in mapping]
    results: list[dict[str, Any] | None] = [None] * len(models)
    gate = threading.Barrier(len(models) + 1)

    def run(i: int) -> None:
        try:
            gate.wait(30)
        except threading.BrokenBarrierError:
            return
        results[i] = chat_stream(
            server, models[i], QUESTIONS[i % len(QUESTIONS)], f"{tag}.{i}", args.max_tokens
        )

    workers = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(models))]
    for w in workers:
        w.start()
    counters_before = batch_counters(server)
    usage_before = group_usage(server.proc.pid)
    busy_before = busy_cpu_s()
    peak_threads = usage_before["threads"]
    gate.wait(30)
    start = time.perf_counter()
    deadline = time.monotonic() + REQUEST_TIMEOUT + 10
    sampled = False
    for w in workers:
        while w.is_alive() and time.monotonic() < deadline:
            w.join(0.25)
            if not sampled and time.perf_counter() - start > 0.5:
                # Mid-batch: every context is decoding (OpenMP teams up).
                peak_threads = max(peak_threads, group_usage(server.proc.pid)["threads"])
                sampled = True
    wall_end = time.perf_counter()
    usage_after = group_usage(server.proc.pid)
    busy_after = busy_cpu_s()
    counters_after = batch_counters(server)
    runs = [r for r in results if r is not None and r["stamps"]]
    if len(runs) != len(models):
        anomaly(f"{config} {tag}: {len(models) - len(runs)} stream(s) gave no tokens")
        return {"ok": False}
    first = min(r["stamps"][0] for r in runs)
    last = max(r["stamps"][-1] for r in runs)
    chunks_after_first = sum(len(r["stamps"]) - 1 for r in runs)
    completion = sum((r["usage"] or {}).get("completion_tokens") or len(r["stamps"]) for r in runs)
    server_cpu = usage_after["cpu_s"] - usage_before["cpu_s"]
    wall = wall_end - start
    steps = {
        m: counters_after.get(m, {}).get("steps", 0.0)
        - counters_before.get(m, {}).get("steps", 0.0)
        for m in sorted(set(models))
    }
    sequences = {
        m: counters_after.get(m, {}).get("sequences", 0.0)
        - counters_before.get(m, {}).get("sequences", 0.0)
        for m in sorted(set(models))
    }
    return {
        "ok": True,
        "models": models,
        # Prefill out: the tokens after each stream's first, over the time from the first
        # stream's first token to the last stream's last (bench/llm.py's count).
        "decode_tok_s": chunks_after_first / (last - first),
        # The plain figure: completion tokens / the batch's wall time.
        "end_to_end_tok_s": completion / (last - start),
        "completion_tokens": completion,
        "content_chunks": sum(len(r["stamps"]) for r in runs),
        "ttft_ms": [(r["stamps"][0] - r["start"]) * 1000 for r in runs],
        "first_token_spread_ms": (max(r["stamps"][0] for r in runs) - first) * 1000,
        "last_token_spread_ms": (last - min(r["stamps"][-1] for r in runs)) * 1000,
        "wall_s": wall,
        "server_cpu_s": server_cpu,
        "server_cores_busy": server_cpu / wall,
        "server_cpu_ms_per_token": 1000 * server_cpu / max(completion, 1),
        "outside_server_cores_busy": max(0.0, (busy_after - busy_before) - server_cpu) / wall,
        "threads_mid_batch": peak_threads,
        "batch_steps": steps,
        "streams_per_step": {
            m: sequences[m] / steps[m] if steps[m] else 0.0 for m in sorted(set(models))
        },
        "texts": {
            f"{models[i]}|{i % len(QUESTIONS)}": r["text"] for i, r in enumerate(results) if r
        },
    }


# -- main -------------------------------------------------------------------------------


def ensure_model(models: Path) -> tuple[Manifest, Path]:
    settings = load_settings(env={}, overrides={"state_dir": models.parent})
    manifest = default_manifest(load_manifests(settings))
    models.mkdir(parents=True, exist_ok=True)
    if not verify_model(manifest, models).ok:
        note(f"fetching {manifest.name} into {models}")
        fetch_default(manifest, models)
    return manifest, models / manifest.file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, default=CACHE / "models")
    parser.add_argument("--rounds", type=int, default=3, help="runs of every configuration")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--streams", type=int, default=4, help="streams at once")
    parser.add_argument("--threads", type=int, default=default_threads(), help="per context")
    parser.add_argument("--parallel-streams", type=int, default=4)
    parser.add_argument("--context-size", type=int, default=512)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--strength", type=float, default=0.02, help="write_lora's strength")
    parser.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment for the server (e.g. OMP_WAIT_POLICY=passive)",
    )
    parser.add_argument("--out", type=Path, help="write the JSON result here")
    args = parser.parse_args()
    if not 1 <= args.rounds <= 50 or not 1 <= args.streams <= 16:
        parser.error("--rounds must be 1..50 and --streams 1..16")
    # A crash of the server prints its threads' Python stacks (faulthandler).
    server_env = {"PYTHONFAULTHANDLER": "1"} | dict(kv.split("=", 1) for kv in args.server_env)
    load_before = os.getloadavg()
    cpu = cpu_model()
    note(f"load average before: {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}")

    manifest, model_file = ensure_model(args.models.resolve())
    base = manifest.name
    configs = list(CONFIGS)
    rows: dict[str, list[dict[str, Any]]] = {c: [] for c in configs}
    info: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-adapters-") as tmp:
        state = build_state(Path(tmp) / "state", model_file, manifest, args)
        server = start_server(
            state,
            "--threads",
            str(args.threads),
            "--parallel-streams",
            str(args.parallel_streams),
            "--context-size",
            str(args.context_size),
            "--keep-alive",
            "-1",
            "--queue-depth",
            str(max(8, args.streams)),
            "--rate-limit-per-minute",
            "0",
            env=server_env,
        )
        try:
            info["idle_after_start"] = group_usage(server.proc.pid)
            # Warm every model: one request each, which loads the specialists; their
            # greedy answers to the same prompt, to see that each adapter is applied.
            warm: dict[str, str] = {}
            for name in [base] + [f"spec-{i}" for i in range(SPECIALISTS)]:
                took = time.perf_counter()
                warm[name] = chat_stream(server, name, WARM_PROMPT, "", 24)["text"]
                note(f"warmed {name} in {time.perf_counter() - took:.2f} s: {warm[name]!r}")
            status, ready = get_json(server, "/readyz")
            states = {m["name"]: m for m in ready["models"]} if isinstance(ready, dict) else {}
            for name in warm:
                if states.get(name, {}).get("state") != "ready":
                    anomaly(f"{name} not ready after its warm-up", row=states.get(name))
            info["readyz_status"] = status
            info["readyz_memory"] = ready.get("memory") if isinstance(ready, dict) else None
            info["pool_memory_bytes"] = {n: r.get("memory_bytes") for n, r in states.items()}
            info["warm_texts"] = warm
            same = [n for n in warm if n != base and warm[n] == warm[base]]
            if same:
                note(f"specialists answering as the base does (greedy, 24 tokens): {same}")
            info["specialists_same_as_base"] = same
            info["idle_all_loaded"] = group_usage(server.proc.pid)
            with contextlib.suppress(psutil.Error):
                info["worker_threads_idle"] = {
                    p.pid: p.num_threads() for p in group_processes(server.proc.pid)
                }

            for r in range(args.rounds):
                order = configs[r % len(configs) :] + configs[: r % len(configs)]
                for config in order:
                    row = batch(server, base, config, f"r{r}{config[0]}", args)
                    if row["ok"]:
                        rows[config].append(row)
                        note(
                            f"round {r} {LABELS[config]:17} decode {row['decode_tok_s']:6.1f} "
                            f"tok/s, end-to-end {row['end_to_end_tok_s']:6.1f}, TTFT p50 "
                            f"{statistics.median(row['ttft_ms']):6.1f} ms, server "
                            f"{row['server_cores_busy']:.2f} cores, others "
                            f"{row['outside_server_cores_busy']:.2f}, threads "
                            f"{row['threads_mid_batch']:.0f}"
                        )
            info["after_runs"] = group_usage(server.proc.pid)
        finally:
            info["log_warning_or_above"] = stop(server)
    load_after = os.getloadavg()

    # -- figures --------------------------------------------------------------------------
    def med(config: str, key: str) -> float:
        values = [row[key] for row in rows[config]]
        return statistics.median(values) if values else float("nan")

    table: dict[str, dict[str, Any]] = {}
    for config in configs:
        if not rows[config]:
            continue
        table[config] = {
            "decode_tok_s": med(config, "decode_tok_s"),
            "end_to_end_tok_s": med(config, "end_to_end_tok_s"),
            "ttft_ms_p50": statistics.median(t for row in rows[config] for t in row["ttft_ms"]),
            "server_cores_busy": med(config, "server_cores_busy"),
            "server_cpu_ms_per_token": med(config, "server_cpu_ms_per_token"),
            "outside_server_cores_busy": med(config, "outside_server_cores_busy"),
            "threads_mid_batch": max(row["threads_mid_batch"] for row in rows[config]),
            "rounds": len(rows[config]),
            "decode_per_round": [row["decode_tok_s"] for row in rows[config]],
        }
    base_rate = table.get("a_base", {}).get("decode_tok_s", float("nan"))
    base_e2e = table.get("a_base", {}).get("end_to_end_tok_s", float("nan"))
    base_rounds = table.get("a_base", {}).get("decode_per_round", [])
    for row in table.values():
        row["ratio"] = row["decode_tok_s"] / base_rate
        row["end_to_end_ratio"] = row["end_to_end_tok_s"] / base_e2e
        # Each round's ratio to the base's run of the same round.
        row["ratio_per_round"] = [
            a / b for a, b in zip(row["decode_per_round"], base_rounds, strict=False)
        ]
    # Does one (model, question) always give the same text, alone in its context or not?
    texts: dict[str, set[str]] = {}
    for config in configs:
        for row in rows[config]:
            for key, text in row["texts"].items():
                texts.setdefault(key, set()).add(text)
    varying = {k: len(v) for k, v in texts.items() if len(v) > 1}
    same_as_base_q = sorted(
        k
        for k, v in texts.items()
        if not k.startswith(base) and v & texts.get(f"{base}|{k.split('|')[1]}", set())
    )

    idle = info["idle_all_loaded"]
    result = {
        "cpu": cpu,
        "cores": psutil.cpu_count(logical=False),
        "logical_cpus": psutil.cpu_count(),
        "threads_per_context": args.threads,
        "streams": args.streams,
        "max_tokens": args.max_tokens,
        "rounds": args.rounds,
        "parallel_streams": args.parallel_streams,
        "context_size": args.context_size,
        "lora": {"rank": args.rank, "strength": args.strength, "targets": ["attn_q", "attn_v"]},
        "server_env": server_env,
        "configs": table,
        "runs": {
            c: [{k: v for k, v in row.items() if k != "texts"} for row in rows[c]] for c in rows
        },
        "texts_varying_across_runs": varying,
        "specialist_texts_equal_to_base_text": same_as_base_q,
        "server": info,
        "anomalies": ANOMALIES,
        "load_average_before_after": [load_before, load_after],
        "seconds": time.perf_counter() - STARTED,
    }

    print(
        f"\nCPU: {cpu}; {result['cores']} cores; server --threads {args.threads} (per context) "
        f"--parallel-streams {args.parallel_streams} --context-size {args.context_size} "
        f"--keep-alive -1" + (f"; env {server_env}" if server_env else "")
    )
    print(
        f"load average (1, 5, 15 min): before {load_before[0]:.2f} {load_before[1]:.2f} "
        f"{load_before[2]:.2f}, after {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}"
    )
    print(
        f"{args.streams} streams at once, {args.max_tokens} tokens each (ignore_eos, greedy; "
        "the same prompts every round, so TTFT is mostly a cached prompt); "
        f"LoRA rank {args.rank} on attn_q+attn_v, strength {args.strength}; medians of "
        f"{args.rounds} rounds, configurations interleaved"
    )
    print(
        f"\n{'':19}{'decode tok/s':>13}{'x base':>8}{'e2e tok/s':>11}{'x base':>8}"
        f"{'TTFT p50':>10}{'cores':>7}{'CPU ms/tok':>11}{'others':>8}{'threads':>9}"
    )
    for config, row in table.items():
        print(
            f"{LABELS[config]:19}{row['decode_tok_s']:13.1f}{row['ratio']:8.2f}"
            f"{row['end_to_end_tok_s']:11.1f}{row['end_to_end_ratio']:8.2f}"
            f"{row['ttft_ms_p50']:8.1f}ms{row['server_cores_busy']:7.2f}"
            f"{row['server_cpu_ms_per_token']:11.2f}{row['outside_server_cores_busy']:8.2f}"
            f"{row['threads_mid_batch']:9.0f}"
        )
    for config, row in table.items():
        spread_r = ", ".join(f"{x:.2f}" for x in row["ratio_per_round"])
        print(f"   {LABELS[config]:17} ratio per round: {spread_r}")
    targets = []
    if "b_1_specialist" in table:
        targets.append(f"1 specialist {table['b_1_specialist']['ratio']:.2f} x (target >= 0.9)")
    if "d_4_specialists" in table:
        targets.append(f"4 specialists {table['d_4_specialists']['ratio']:.2f} x (target >= 0.7)")
    print("targets: " + "; ".join(targets))
    disturbed = [
        f"{LABELS[c][:2]} round {i}: {row['outside_server_cores_busy']:.2f}"
        for c in configs
        for i, row in enumerate(rows[c])
        if row["outside_server_cores_busy"] > DISTURBED_CORES
    ]
    result["disturbed_runs"] = disturbed
    if disturbed:
        print(
            f"NOT QUIET: {len(disturbed)} of {sum(len(r) for r in rows.values())} runs had "
            f"more than {DISTURBED_CORES} cores busy outside the server (other work on the "
            f"machine): {', '.join(disturbed)}; their figures are unreliable"
        )
    print(
        f"server process: {idle['threads']:.0f} threads idle with all "
        f"{1 + SPECIALISTS} contexts loaded ({info['after_runs']['threads']:.0f} after the runs), "
        f"RSS {idle['rss'] / 2**20:.0f} MiB (after start, base only: "
        f"{info['idle_after_start']['rss'] / 2**20:.0f} MiB)"
    )
    print(
        "notes: 'decode' leaves prefill out (tokens after each stream's first, first token "
        "to last); 'e2e' is completion tokens / (send to last token). 'cores' is the "
        "server's CPU seconds per wall second, 'others' the rest of the machine's, 'threads' "
        "the server process's (psutil, mid-batch). Each context (the base, each specialist) "
        "decodes its own batch on its own worker thread, with a team of "
        f"{args.threads} llama.cpp (OpenMP) thread(s) that meets at a barrier after every "
        "graph node. (a) and (b): one context, all streams in one batch, one team on the "
        f"cores; (b) / (a) is what the adapters cost: rank-{args.rank} products and "
        "additions on attn_q and attn_v, extra nodes (and barriers) in every layer. (c) and "
        f"(d): two and four contexts decode at once, {2 * args.threads} and "
        f"{4 * args.threads} llama.cpp threads (a worker is its team's first) for "
        f"{result['cores']} cores; each batch carries fewer streams, so the weights are "
        "read once per step per context, and a team whose thread is preempted waits at its "
        "barrier (spinning threads burn the cores the others need: see 'CPU ms/tok'). Yet "
        "one context alone rarely fills the cores (its worker's Python work between steps, "
        "sampling and streaming, runs with the team idle; see 'cores' in (a)), which "
        "contexts side by side fill: (c) and (d) against (a) weigh those against each other."
    )
    if varying:
        print(
            f"texts of one (model, question) that differed between runs: {varying} "
            "(how many distinct texts; a batch of another size sums in another order)"
        )
    if info["specialists_same_as_base"] or same_as_base_q:
        print(
            f"specialists whose greedy text equalled the base's: warm-up "
            f"{info['specialists_same_as_base']}, runs {same_as_base_q} (strength "
            f"{args.strength} may be too small to change a greedy answer)"
        )
    if ANOMALIES:
        print(f"\n{len(ANOMALIES)} anomalies:")
        for item in ANOMALIES:
            print("   " + json.dumps(item)[:600])
    print(f"took {result['seconds']:.0f} s")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2, default=sorted) + "\n")
        print(f"wrote {args.out}")
    print(json.dumps({k: result[k] for k in ("cpu", "threads_per_context", "configs")}))


if __name__ == "__main__":
    main()
