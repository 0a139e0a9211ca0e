"""The model garden against the real server (issue #15), in one run on this machine:

1. Time to first token (a streamed chat completion, 8 tokens, temperature 0, a short
   prompt) of gemma-3-270m when it is already loaded (warm, a server with
   `--keep-alive -1`) and when it must be loaded first (cold, a server with
   `--keep-alive 0`, which unloads it after each request; each cold request is sent
   only once /readyz says the model is unloaded). The pool's own load seconds
   (/readyz) come beside it, and one self-test child (the part of every load that
   runs `python -m appliance.engines.selftest`) timed alone.
2. Embeddings per second of minilm-l6-v2 through POST /v1/embeddings (float and
   base64), one text per request and 32 per request, sequential on one keep-alive
   connection, against the same texts embedded in this process by the appliance's own
   EmbeddingEngine (onnxruntime and the model's tokenizer, the same thread count) and
   by a plain onnxruntime session (one padded batch a call). The sides take turns on
   slices of the texts (`--rounds`), so that a drifting host weighs on all alike.
3. The server's memory (RSS of its process group; it is one process, gunicorn's worker
   run without the arbiter) with smollm2, gemma and minilm loaded, against the sum of
   their files plus the service's own base: the RSS of the same server whose model
   directory holds only the tiny line-anomaly model (the default model absent, so it
   starts not ready but answers /readyz).

Model files come from `--models` (fetched there with the catalogue's own fetch when
missing) and are hard-linked into state directories of the benchmark's own.

    .venv/bin/python bench/garden.py [--runs 5] [--embed-requests 300] \
        [--embed-batches 30] [--out bench/results/garden/run.json]
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import http.client
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import psutil  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

from appliance.config import load_settings  # noqa: E402
from appliance.engines.embed import EmbeddingEngine  # noqa: E402
from appliance.engines.kernels import cpu_model  # noqa: E402
from appliance.engines.llama import default_threads  # noqa: E402
from appliance.fetch import build_model, default_manifest, fetch_model  # noqa: E402
from appliance.registry import Manifest, load_manifests, verify_model  # noqa: E402

from helpers import CACHE, Server, start_server  # noqa: E402

GEMMA = "gemma-3-270m"
MINILM = "minilm-l6-v2"
LINE = "line-anomaly"
PROMPT = "Name three colours."

# Every anomaly seen (a status other than the one expected, a wrong state in /readyz, a
# server log line at warning or above that is not expected): printed, and in the JSON.
ANOMALIES: list[dict[str, Any]] = []


def anomaly(what: str, **details: Any) -> None:
    ANOMALIES.append({"what": what, **details})
    print(f"ANOMALY: {what}: {json.dumps(details)[:2000]}", file=sys.stderr, flush=True)


# -- texts ----------------------------------------------------------------------------

SUBJECTS = [
    "The night nurse on ward four",
    "A patient recovering from hip surgery",
    "The maintenance crew on line two",
    "Our hospital pharmacist",
    "The conveyor motor at the packing station",
    "A junior doctor on her first rotation",
    "The bearing on cooling pump seven",
    "The cardiology outpatient clinic",
    "The discharge coordinator",
    "A worried relative at the front desk",
    "The temperature sensor on the second oven",
    "The quality inspector",
]
PREDICATES = [
    "reported a sharp pain in the lower back after lunch",
    "noticed that the current drawn rose steadily during the late shift",
    "asked whether the new medication could be taken with food",
    "logged an unusual vibration at around three hundred hertz",
    "found the blood pressure readings higher than those taken yesterday",
    "could not reach the on-call engineer for almost an hour",
    "updated the care plan after the physiotherapy assessment",
    "flagged a batch of labels printed with the wrong expiry date",
    "requested a second opinion on the chest X-ray",
    "replaced a worn drive belt before the morning run",
]
TAILS = [
    "",
    "and wrote it in the handover notes",
    "so the team agreed to check again before the morning round",
    "while the ward was unusually quiet",
    "because the previous reading looked suspicious",
    "and the supervisor was told straight away",
]


def sentences(count: int, seed: int = 15) -> list[str]:
    """A fixed list of distinct sentences of 10 to 25 words, as a ward or a line writes."""
    rng = random.Random(seed)
    found: list[str] = []
    seen: set[str] = set()
    for _ in range(100 * count):
        if len(found) == count:
            break
        tail = rng.choice(TAILS)
        text = f"{rng.choice(SUBJECTS)} {rng.choice(PREDICATES)}" + (f" {tail}." if tail else ".")
        if text not in seen and 10 <= len(text.split()) <= 25:
            seen.add(text)
            found.append(text)
    return found


# -- models and state -----------------------------------------------------------------


def ensure_models(models: Path) -> dict[str, Manifest]:
    """The catalogue's manifests, every model the benchmark needs verified in ``models``
    (fetched or built there when missing)."""
    settings = load_settings(env={}, overrides={"state_dir": models.parent})
    manifests = load_manifests(settings)
    default = default_manifest(manifests)
    models.mkdir(parents=True, exist_ok=True)
    for manifest in (default, manifests[GEMMA], manifests[MINILM], manifests[LINE]):
        if verify_model(manifest, models).ok:
            continue
        print(f"fetching {manifest.name} into {models}", flush=True)
        if manifest.fetch is not None:
            fetch_model(manifest, models)
        else:
            build_model(manifest, models)
    return manifests


def link_state(root: Path, models: Path, manifests: list[Manifest]) -> Path:
    """A state directory whose model directory holds these models' files (hard links)."""
    target_dir = root / "models"
    target_dir.mkdir(parents=True, exist_ok=True)
    for manifest in manifests:
        for file, _ in manifest.files():
            target = target_dir / file
            try:
                os.link(models / file, target)
            except OSError:
                target.write_bytes((models / file).read_bytes())
    return root


def files_bytes(models: Path, manifest: Manifest) -> int:
    return sum((models / file).stat().st_size for file, _ in manifest.files())


# -- the server -----------------------------------------------------------------------


def launch(state: Path, threads: int, *flags: str) -> Server:
    return start_server(state, "--threads", str(threads), "--rate-limit-per-minute", "0", *flags)


def stop(server: Server, label: str, expected_errors: tuple[str, ...] = ()) -> list[str]:
    """SIGTERM to the server's process group, SIGKILL if it does not end in 60 s; its log
    lines at warning or above (those not expected are anomalies)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.proc.pid, signal.SIGTERM)
    try:
        code = server.proc.wait(60)
        if code != 0:
            anomaly(f"{label}: server exited {code} on SIGTERM", log=server.stderr[-10:])
    except subprocess.TimeoutExpired:
        anomaly(f"{label}: server still running 60 s after SIGTERM; killed")
        os.killpg(server.proc.pid, signal.SIGKILL)
        server.proc.wait(10)
    time.sleep(0.2)  # the threads draining its pipes
    loud = []
    for record in server.log_records():
        if record.get("level") in ("warning", "error", "critical"):
            line = json.dumps(record)
            loud.append(line)
            if not any(e in str(record.get("msg", "")) for e in expected_errors):
                anomaly(f"{label}: server logged at {record.get('level')}", line=line[:1000])
    return loud


def readyz(server: Server) -> tuple[int, dict[str, Any]]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        conn.request("GET", "/readyz")
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def model_row(server: Server, name: str) -> dict[str, Any]:
    _, body = readyz(server)
    return next(m for m in body["models"] if m["name"] == name)


def wait_row(
    server: Server, name: str, ok: Callable[[dict[str, Any]], bool], timeout: float = 60
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    row = model_row(server, name)
    while not ok(row) and time.monotonic() < deadline:
        time.sleep(0.05)
        row = model_row(server, name)
    return row


def group_memory(pgid: int) -> dict[str, int]:
    """Resident memory of the server's processes (its process group): RSS and PSS,
    and RSS split into anonymous and file-backed pages (mapped GGUF weights are the
    latter)."""
    total = {"processes": 0, "rss": 0, "pss": 0, "rss_anon": 0, "rss_file": 0}
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) != pgid:
                continue
            info = proc.memory_full_info()
            status = Path(f"/proc/{proc.pid}/status").read_text()
        except (psutil.Error, OSError):
            continue
        total["processes"] += 1
        total["rss"] += int(info.rss)
        total["pss"] += int(getattr(info, "pss", 0))
        for line in status.splitlines():
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile"):
                total["rss_anon" if key == "RssAnon" else "rss_file"] += (
                    int(value.split()[0]) * 1024
                )
    return total


def chat_stream(server: Server, model: str, tag: str) -> dict[str, float]:
    """One streamed greedy chat completion of 8 tokens: time to the first content token
    and to the end, in seconds from sending the request."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": 8,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    headers = {"Content-Type": "application/json", **server.auth}
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=300)
    try:
        start = time.perf_counter()
        conn.request("POST", "/v1/chat/completions", json.dumps(body), headers)
        resp = conn.getresponse()
        if resp.status != 200:
            text = resp.read().decode(errors="replace")
            anomaly(f"chat {tag}: status {resp.status}", request=body, response=text[:2000])
            raise RuntimeError(f"chat {tag}: {resp.status} {text[:500]}")
        first: float | None = None
        tokens = 0
        done = False
        while line := resp.readline():
            if line.startswith(b"data: [DONE]"):
                done = True
                break
            if line.startswith(b"data: {"):
                chunk = json.loads(line[6:])
                if chunk.get("error"):
                    anomaly(f"chat {tag}: error in the stream", request=body, chunk=chunk)
                delta = chunk["choices"][0]["delta"] if chunk.get("choices") else {}
                if delta.get("content"):
                    tokens += 1
                    if first is None:
                        first = time.perf_counter()
        end = time.perf_counter()
        resp.read()
    finally:
        conn.close()
    if first is None or not done:
        anomaly(
            f"chat {tag}: stream without content or [DONE]",
            request=body,
            tokens=tokens,
            done=done,
        )
        first = first or end
    return {"ttft_s": first - start, "total_s": end - start, "content_chunks": tokens}


class EmbedClient:
    """POST /v1/embeddings on one keep-alive connection; the body read whole. A
    connection the server closed is opened again (once per call); one closed before
    the server's keep-alive (5 s idle) is an anomaly."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.headers = {"Content-Type": "application/json", **server.auth}
        self.reopened: list[dict[str, Any]] = []
        self.conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        self.fresh()

    def fresh(self) -> None:
        """A new connection (before a timed loop: none is closed for idling in it)."""
        self.conn.close()
        self.conn = http.client.HTTPConnection("127.0.0.1", self.server.port, timeout=60)
        self.used = time.monotonic()
        self.requests = 0

    def call(self, texts: list[str], fmt: str) -> bytes:
        body = {"model": MINILM, "input": texts if len(texts) > 1 else texts[0]}
        body["encoding_format"] = fmt
        payload = json.dumps(body)
        try:
            self.conn.request("POST", "/v1/embeddings", payload, self.headers)
            resp = self.conn.getresponse()
        except (BrokenPipeError, ConnectionResetError, http.client.RemoteDisconnected) as exc:
            idle = time.monotonic() - self.used
            note = {"error": repr(exc), "idle_s": round(idle, 3), "requests": self.requests}
            self.reopened.append(note)
            if idle < 4.5:
                anomaly("embeddings: the server closed a keep-alive connection early", **note)
            self.fresh()
            self.conn.request("POST", "/v1/embeddings", payload, self.headers)
            resp = self.conn.getresponse()
        data = resp.read()
        self.used = time.monotonic()
        self.requests += 1
        if resp.status != 200:
            anomaly(
                f"embeddings: status {resp.status}",
                request={**body, "input": f"{len(texts)} texts"},
                response=data.decode(errors="replace")[:2000],
            )
            raise RuntimeError(f"embeddings: {resp.status} {data[:500]!r}")
        return data

    def vectors(self, texts: list[str], fmt: str) -> np.ndarray:
        rows = json.loads(self.call(texts, fmt))["data"]
        if fmt == "base64":
            return np.stack([np.frombuffer(base64.b64decode(r["embedding"]), "<f4") for r in rows])
        return np.array([r["embedding"] for r in rows], dtype=np.float32)

    def close(self) -> None:
        self.conn.close()


class PlainOrt:
    """A bare onnxruntime session and the tokenizer: each call one padded batch, mean
    pooling and unit length in numpy (no grouping by length)."""

    def __init__(self, model: Path, tokenizer: Path, threads: int) -> None:
        self.tokenizer = Tokenizer.from_file(str(tokenizer))
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(
            str(model), sess_options=options, providers=["CPUExecutionProvider"]
        )
        self.inputs = {a.name for a in self.session.get_inputs()}

    def embed(self, texts: list[str]) -> np.ndarray:
        encoded = [self.tokenizer.encode(t).ids for t in texts]
        lengths = np.array([len(e) for e in encoded], dtype=np.int64)
        ids = np.zeros((len(encoded), int(lengths.max())), dtype=np.int64)
        for row, tokens in enumerate(encoded):
            ids[row, : len(tokens)] = tokens
        mask = (np.arange(ids.shape[1]) < lengths[:, None]).astype(np.int64)
        feeds = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self.inputs:
            feeds["token_type_ids"] = np.zeros_like(ids)
        hidden = np.asarray(self.session.run(None, feeds)[0], dtype=np.float32)
        pooled = (hidden * mask[:, :, None]).sum(axis=1) / lengths[:, None]
        return np.asarray(pooled / np.linalg.norm(pooled, axis=1, keepdims=True))


def interleaved(
    sides: dict[str, Callable[[list[str]], object]],
    batches: list[list[str]],
    rounds: int,
    before_api: Callable[[], None],
) -> dict[str, Any]:
    """Texts per second of each side over the same batches, run in ``rounds`` slices,
    every side on each slice in turn (the order rotated each round), so that a host
    whose speed drifts (a shared one, other work on it) weighs on every side alike.
    Also each round's ratio of every side to the first (in-process)."""
    names = list(sides)
    seconds = dict.fromkeys(names, 0.0)
    per_round: dict[str, list[float]] = {n: [] for n in names}
    size = max(1, -(-len(batches) // rounds))
    slices = [batches[i : i + size] for i in range(0, len(batches), size)]
    for r, part in enumerate(slices):
        texts = sum(len(b) for b in part)
        for name in names[r % len(names) :] + names[: r % len(names)]:
            if name.startswith("api"):
                before_api()
            start = time.perf_counter()
            for batch in part:
                sides[name](batch)
            took = time.perf_counter() - start
            seconds[name] += took
            per_round[name].append(texts / took)
    total = sum(len(b) for b in batches)
    rates = {n: total / seconds[n] for n in names}
    base = names[0]
    return {
        "per_s": rates,
        "ratio": {n: rates[n] / rates[base] for n in names},
        "round_ratios": {
            n: [a / b for a, b in zip(per_round[n], per_round[base], strict=True)] for n in names
        },
        "rounds": len(slices),
        "texts": total,
        "requests": len(batches),
    }


def mib(n: float) -> str:
    return f"{n / 2**20:.1f}"


# -- the three measurements -----------------------------------------------------------


def measure_base(tmp: Path, models: Path, line: Manifest, threads: int) -> dict[str, Any]:
    """RSS of a server with only the line model: the service's own base."""
    state = link_state(tmp / "base", models, [line])
    server = launch(state, threads)
    try:
        status, body = readyz(server)
        if status != 503 or body.get("ready"):
            anomaly("base server: /readyz was expected to be 503 (no default model)", status=status)
        rows = {m["name"]: m["state"] for m in body["models"]}
        if rows.get(LINE) != "ready":
            anomaly("base server: line-anomaly is not ready", rows=rows)
        time.sleep(1.0)  # settle
        memory = group_memory(server.proc.pid)
    finally:
        log = stop(server, "base server", expected_errors=("is missing",))
    return {
        "readyz_status": status,
        "reasons": body.get("reasons"),
        "states": rows,
        "memory": memory,
        "log": log,
    }


def measure_loaded(
    state: Path,
    manifests: dict[str, Manifest],
    models: Path,
    threads: int,
    texts: list[str],
    args: argparse.Namespace,
) -> dict[str, Any]:
    """The keep-alive server: every model loaded (memory), warm TTFT, embeddings."""
    default = default_manifest(manifests)
    out: dict[str, Any] = {}
    server = launch(
        state, threads, "--keep-alive", "-1", "--memory-limit-mb", str(args.memory_limit_mb)
    )
    try:
        row = model_row(server, GEMMA)
        if row["state"] != "unloaded" or row["loads"] != 0:
            anomaly("keep-alive server: gemma not unloaded at start", row=row)
        # One request to each model: every one is loaded and has worked.
        out["first_request"] = chat_stream(server, GEMMA, "first gemma")
        chat_stream(server, default.name, "first smollm2")
        client = EmbedClient(server)
        client.call(texts[:1], "float")
        time.sleep(1.0)
        status, body = readyz(server)
        rows = {m["name"]: m for m in body["models"]}
        for name in (default.name, GEMMA, MINILM, LINE):
            if rows[name]["state"] != "ready":
                anomaly(f"keep-alive server: {name} not ready after a request", row=rows[name])
        if status != 200:
            anomaly("keep-alive server: /readyz not 200", status=status, reasons=body["reasons"])
        out["all_loaded"] = {"memory": group_memory(server.proc.pid), "readyz": rows}
        out["budget"] = body.get("memory")
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        conn.request("GET", f"/v1/models/{GEMMA}", headers=server.auth)
        out["gemma_card"] = json.loads(conn.getresponse().read())
        conn.close()

        # Warm TTFT: one untimed, then --runs.
        chat_stream(server, GEMMA, "warm-up")
        out["warm"] = [chat_stream(server, GEMMA, f"warm {i}") for i in range(args.runs)]

        # Embeddings: the same texts, the same threads, in this process and through the API.
        minilm = manifests[MINILM]
        assert minilm.tokenizer is not None
        model_path = models / minilm.file
        tokenizer_path = models / minilm.tokenizer.file
        rss_before = psutil.Process().memory_info().rss
        engine = EmbeddingEngine(
            model_path, tokenizer_path, threads, max_input_tokens=minilm.context_length or 256
        )
        # What the same engine adds to this process (onnxruntime already imported here).
        out["in_process_engine_rss_growth"] = psutil.Process().memory_info().rss - rss_before
        plain = PlainOrt(model_path, tokenizer_path, threads)

        def in_process(batch: list[str]) -> np.ndarray:
            return engine.embed(engine.tokenize(batch))

        one = [[texts[i % len(texts)]] for i in range(args.embed_requests)]
        many = [
            [texts[(32 * k + j) % len(texts)] for j in range(32)] for k in range(args.embed_batches)
        ]
        sides: dict[str, Callable[[list[str]], object]] = {
            "in_process": in_process,
            "api_float": lambda b: client.call(b, "float"),
            "api_base64": lambda b: client.call(b, "base64"),
            "plain_ort": plain.embed,
        }
        for call in sides.values():  # warm-up
            for batch in one[:20] + many[:3]:
                call(batch)
        # Same vectors both ways (alone and in a batch of 32).
        ref = in_process(many[0])
        diffs = {
            fmt: float(np.abs(client.vectors(many[0], fmt) - ref).max())
            for fmt in ("float", "base64")
        }
        diffs["plain_ort"] = float(np.abs(plain.embed(many[0]) - ref).max())
        diffs["api_one_text"] = float(np.abs(client.vectors(many[0][:1], "float") - ref[:1]).max())
        out["max_abs_diff"] = diffs
        if max(diffs.values()) > 1e-4:
            anomaly("embeddings differ from in-process", max_abs_diff=diffs)
        out["token_counts"] = sorted(len(ids) for ids in engine.tokenize(texts))
        embed: dict[str, dict[str, Any]] = {}
        for label, batches in (("batch_1", one), ("batch_32", many)):
            embed[label] = interleaved(sides, batches, args.rounds, client.fresh)
            rates = embed[label]["per_s"]
            print(
                f"  {label}: " + ", ".join(f"{k} {v:.1f}/s" for k, v in rates.items()),
                file=sys.stderr,
                flush=True,
            )
        out["embeddings"] = embed
        out["reopened_connections"] = client.reopened
        client.close()
        engine.close()

        time.sleep(0.5)
        status, body = readyz(server)
        rows = {m["name"]: m for m in body["models"]}
        for name in (default.name, GEMMA, MINILM):
            if rows[name]["state"] != "ready" or rows[name]["unloads"] != 0:
                anomaly(f"keep-alive server: {name} unloaded during the run", row=rows[name])
        out["after_work"] = {"memory": group_memory(server.proc.pid), "readyz": rows}
    finally:
        out["log"] = stop(server, "keep-alive server")
    return out


def measure_cold(state: Path, threads: int, runs: int) -> dict[str, Any]:
    """The keep-alive 0 server: each gemma request loads it, and it is unloaded after."""
    server = launch(state, threads, "--keep-alive", "0")
    cold = []
    try:
        for i in range(runs):
            row = wait_row(server, GEMMA, lambda r: r["state"] == "unloaded")
            if row["state"] != "unloaded":
                anomaly(f"cold {i}: gemma not unloaded within 60 s", row=row)
            loads = row["loads"]
            figures: dict[str, Any] = dict(chat_stream(server, GEMMA, f"cold {i}"))
            after = wait_row(server, GEMMA, lambda r: r["state"] == "unloaded")
            if after["loads"] != loads + 1 or after["unloads"] != after["loads"]:
                anomaly(f"cold {i}: loads/unloads not as expected", before=row, after=after)
            if after["state"] != "unloaded":
                anomaly(f"cold {i}: gemma not unloaded after its request", row=after)
            figures["load_seconds"] = after.get("load_seconds")
            figures["rss_growth_bytes"] = after.get("rss_growth_bytes")
            cold.append(figures)
        memory = group_memory(server.proc.pid)
    finally:
        log = stop(server, "keep-alive 0 server")
    return {"cold": cold, "memory_after": memory, "log": log}


def selftest_seconds(model: Path, extra_buffers: bool) -> float:
    """One self-test child on this model, alone, as the pool runs it before each load."""
    from appliance.engines import selftest

    start = time.perf_counter()
    outcome = selftest.probe(model, "auto", extra_buffers, 0, selftest.TIMEOUT_SECONDS)
    seconds = time.perf_counter() - start
    if not outcome.ok:
        anomaly("self-test alone failed", detail=outcome.detail)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, default=CACHE / "models")
    parser.add_argument("--runs", type=int, default=5, help="TTFT requests, warm and cold")
    parser.add_argument("--embed-requests", type=int, default=300, help="requests at batch 1")
    parser.add_argument("--embed-batches", type=int, default=30, help="requests at batch 32")
    parser.add_argument("--texts", type=int, default=256, help="distinct sentences")
    parser.add_argument("--rounds", type=int, default=10, help="embedding slices, interleaved")
    parser.add_argument("--threads", type=int, default=default_threads())
    parser.add_argument("--memory-limit-mb", type=int, default=8192)
    parser.add_argument("--out", type=Path, help="write the JSON result here")
    args = parser.parse_args()
    started = time.perf_counter()
    load_before = os.getloadavg()

    models = args.models.resolve()
    manifests = ensure_models(models)
    default = default_manifest(manifests)
    texts = sentences(args.texts)
    threads = args.threads
    cpu = cpu_model()
    print(f"CPU: {cpu}; {threads} threads; {len(texts)} sentences", flush=True)

    with tempfile.TemporaryDirectory(prefix="bench-garden-") as tmp_name:
        tmp = Path(tmp_name)
        base = measure_base(tmp, models, manifests[LINE], threads)
        state = link_state(
            tmp / "garden", models, [default, manifests[GEMMA], manifests[MINILM], manifests[LINE]]
        )
        loaded = measure_loaded(state, manifests, models, threads, texts, args)
        cold = measure_cold(state, threads, args.runs)
    kernels = loaded["gemma_card"].get("kernels") or {}
    selftest_s = selftest_seconds(
        models / manifests[GEMMA].file, bool(kernels.get("extra_buffers"))
    )

    # -- figures ----------------------------------------------------------------------
    warm_ms = [r["ttft_s"] * 1000 for r in loaded["warm"]]
    cold_ms = [r["ttft_s"] * 1000 for r in cold["cold"]]
    load_s = [r["load_seconds"] for r in cold["cold"] if r["load_seconds"] is not None]
    ttft = {
        "warm_ms": warm_ms,
        "cold_ms": cold_ms,
        "warm_ms_median": statistics.median(warm_ms),
        "cold_ms_median": statistics.median(cold_ms),
        "cold_over_warm": statistics.median(cold_ms) / statistics.median(warm_ms),
        "load_seconds": load_s,
        "load_seconds_median": statistics.median(load_s) if load_s else None,
        "selftest_alone_s": selftest_s,
        "first_request_keep_alive_server_ms": loaded["first_request"]["ttft_s"] * 1000,
        "kernels": kernels,
    }
    sizes = {
        name: files_bytes(models, manifests[name]) for name in (default.name, GEMMA, MINILM, LINE)
    }
    base_rss = base["memory"]["rss"]
    garden_files = sizes[default.name] + sizes[GEMMA] + sizes[MINILM]
    rss = loaded["all_loaded"]["memory"]["rss"]
    rows = loaded["all_loaded"]["readyz"]
    memory = {
        "base": base["memory"],
        "all_loaded": loaded["all_loaded"]["memory"],
        "after_work": loaded["after_work"]["memory"],
        "files_bytes": sizes,
        "files_plus_base": garden_files + base_rss,
        "ratio_rss_to_files_plus_base": rss / (garden_files + base_rss),
        "pool_memory_bytes": {n: rows[n]["memory_bytes"] for n in rows},
        "pool_rss_growth_bytes": {n: rows[n].get("rss_growth_bytes") for n in rows},
        "pool_load_seconds": {n: rows[n].get("load_seconds") for n in rows},
        "budget": loaded["budget"],
        "in_process_embedding_engine_rss_growth": loaded["in_process_engine_rss_growth"],
    }
    embed = loaded["embeddings"]
    result = {
        "cpu": cpu,
        "threads": threads,
        "runs": args.runs,
        "ttft": ttft,
        "embeddings": embed,
        "embeddings_max_abs_diff": loaded["max_abs_diff"],
        "embedding_tokens_min_median_max": [
            loaded["token_counts"][0],
            statistics.median(loaded["token_counts"]),
            loaded["token_counts"][-1],
        ],
        "memory": memory,
        "base_server": {k: base[k] for k in ("readyz_status", "reasons", "states")},
        "server_logs_warning_or_above": {
            "base": base["log"],
            "keep_alive": loaded["log"],
            "keep_alive_0": cold["log"],
        },
        "anomalies": ANOMALIES,
        "load_average_before_after": [load_before, os.getloadavg()],
        "seconds": time.perf_counter() - started,
    }

    # -- the table --------------------------------------------------------------------
    print(
        f"\nCPU: {cpu}; {threads} threads (chat and embedding models alike); load average "
        f"{load_before[0]:.2f} before, {os.getloadavg()[0]:.2f} after (1 min)"
    )
    print(f"\n1. {GEMMA} time to first token (8 tokens, greedy, '{PROMPT}'), {args.runs} runs")
    print(f"   warm (loaded, keep-alive -1)  median {ttft['warm_ms_median']:8.1f} ms")
    print(f"   cold (keep-alive 0)           median {ttft['cold_ms_median']:8.1f} ms")
    print(f"   cold / warm                   {ttft['cold_over_warm']:8.1f} x")
    print(
        f"   pool load_seconds (/readyz)   median {ttft['load_seconds_median'] or 0:8.3f} s "
        f"(a self-test child, ~{selftest_s:.2f} s alone, runs on the first load only; "
        "reloads reuse its verdict)"
    )
    print(
        "   first request after start, keep-alive -1 server: "
        f"{ttft['first_request_keep_alive_server_ms']:.1f} ms"
    )
    print(f"\n2. {MINILM} embeddings/s, sequential, one keep-alive connection")
    print(
        f"   {'':10}{'in-process':>12}{'API float':>11}{'x':>6}{'API base64':>12}{'x':>6}"
        f"{'plain ort':>11}{'x':>6}"
    )
    for label, row in embed.items():
        rate, ratio = row["per_s"], row["ratio"]
        print(
            f"   {label:10}{rate['in_process']:12.1f}{rate['api_float']:11.1f}"
            f"{ratio['api_float']:6.2f}{rate['api_base64']:12.1f}{ratio['api_base64']:6.2f}"
            f"{rate['plain_ort']:11.1f}{ratio['plain_ort']:6.2f}"
        )
    for label, row in embed.items():
        spread = ", ".join(
            f"{k} {min(v):.2f}-{max(v):.2f}"
            for k, v in row["round_ratios"].items()
            if k != "in_process"
        )
        print(f"   {label} ratio per round ({row['rounds']} rounds): {spread}")
    print(
        f"   target API / in-process >= 0.9 at batch 32: float "
        f"{embed['batch_32']['ratio']['api_float']:.2f}, base64 "
        f"{embed['batch_32']['ratio']['api_base64']:.2f}; max |diff| vs in-process "
        f"{max(loaded['max_abs_diff'].values()):.2e}"
    )
    all_loaded = memory["all_loaded"]
    print(f"\n3. server memory (process group: {all_loaded['processes']} process(es))")
    print(
        f"   base (only {LINE}; not ready)     RSS {mib(base_rss):>8} MiB "
        f"(anon {mib(base['memory']['rss_anon'])}, file {mib(base['memory']['rss_file'])})"
    )
    print(
        f"   smollm2 + gemma + minilm loaded RSS {mib(rss):>8} MiB "
        f"(anon {mib(all_loaded['rss_anon'])}, file {mib(all_loaded['rss_file'])}; "
        f"PSS {mib(all_loaded['pss'])})"
    )
    print(f"   after the benchmark's requests  RSS {mib(memory['after_work']['rss']):>8} MiB")
    print(
        f"   files {mib(garden_files)} MiB + base {mib(base_rss)} MiB = "
        f"{mib(garden_files + base_rss)} MiB; RSS / (files + base) = "
        f"{memory['ratio_rss_to_files_plus_base']:.2f}"
    )
    for name in (default.name, GEMMA, MINILM):
        print(
            f"   {name:24} file {mib(sizes[name]):>7} MiB  pool estimate "
            f"{mib(rows[name]['memory_bytes']):>7} MiB  RSS growth at load "
            f"{mib(rows[name].get('rss_growth_bytes') or 0):>7} MiB  load "
            f"{rows[name].get('load_seconds')} s"
        )
    print(
        f"   (the same EmbeddingEngine made in this process grew its RSS by "
        f"{mib(loaded['in_process_engine_rss_growth'])} MiB)"
    )
    if ANOMALIES:
        print(f"\n{len(ANOMALIES)} anomalies:")
        for item in ANOMALIES:
            print("   " + json.dumps(item)[:600])
    print(f"\ntook {result['seconds']:.0f} s")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    print(json.dumps({k: result[k] for k in ("cpu", "threads", "ttft", "embeddings")}))


if __name__ == "__main__":
    main()
