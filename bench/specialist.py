"""The thesis, measured on this box: a specialist made here from the line's maintenance
log (models/line/maintenance.py) against its base model and the larger generalist
(gemma-3-270m), on the held-out notes, through the real server.

1. `appliance specialize` on the default model: its wall time (target <= 15 minutes
   on 2 cores), steps, peak memory, held-out exact match before and after.
2. Served: exact match and the latency of a whole answer (p50, p95) on the held-out
   notes for the specialist (its system prompt from its manifest), the base and the
   generalist (each given the handbook's instruction as the system message).

    .venv/bin/python bench/specialist.py [--count 300] [--epochs 4] [--out FILE]
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

from openai import OpenAI  # noqa: E402

from appliance.config import load_settings  # noqa: E402
from appliance.engines.kernels import cpu_model  # noqa: E402
from appliance.fetch import fetch_model  # noqa: E402
from appliance.registry import load_manifests, verify_model  # noqa: E402
from appliance.training.specialize import read_examples  # noqa: E402

from helpers import CACHE, add_garden, make_state, run_cli, start_server  # noqa: E402

NAME = "line-codes"
BASE = "smollm2-135m-instruct"
GEMMA = "gemma-3-270m"


def held_out(state: Path) -> list[list[dict[str, str]]]:
    """The notes training kept back, as it recorded them (by line)."""
    work = state / "training" / NAME
    lines = set(json.loads((work / "held_out.json").read_text()))
    return [e.messages for e in read_examples(work / "data.jsonl") if e.line in lines]


def serve_scores(
    client: OpenAI, model: str, notes: list[list[dict[str, str]]], system: bool
) -> dict[str, Any]:
    right, seconds = 0, []
    for messages in notes:
        sent = messages[:-1] if system else messages[1:-1]
        started = time.perf_counter()
        reply = client.chat.completions.create(
            model=model,
            messages=sent,  # type: ignore[arg-type]
            max_tokens=8,
            temperature=0,
        )
        seconds.append(time.perf_counter() - started)
        text = " ".join((reply.choices[0].message.content or "").split()).casefold()
        right += text == messages[-1]["content"].casefold()
    seconds.sort()
    return {
        "exact": right / len(notes),
        "p50_ms": round(statistics.median(seconds) * 1000, 1),
        "p95_ms": round(seconds[int(0.95 * (len(seconds) - 1))] * 1000, 1),
    }


def garden_state(work: Path) -> Path:
    """A state directory under ``work`` with the default model and the garden's (fetched
    into the test cache once)."""
    settings = load_settings(env={}, overrides={"state_dir": CACHE})
    manifests = load_manifests(settings)
    for name in manifests:
        if (
            name in (GEMMA, "minilm-l6-v2")
            and not verify_model(manifests[name], settings.models_path).ok
        ):
            fetch_model(manifests[name], settings.models_path)
    state = make_state(work / "state", settings.models_path / manifests[BASE].file)
    add_garden(state, manifests)
    return state


def train(state: Path, work: Path, count: int, epochs: int) -> dict[str, Any]:
    """`appliance specialize` of NAME on ``count`` notes of the maintenance log: its
    report."""
    data = work / "maintenance.jsonl"
    maker = REPO / "models/line/maintenance.py"
    subprocess.run([sys.executable, str(maker), str(data), "--count", str(count)], check=True)
    trained = run_cli(
        "specialize", "--base", BASE, "--data", str(data), "--name", NAME,
        "--epochs", str(epochs), "--learning-rate", "0.004",
        "--targets", "attn_q,attn_k,attn_v,attn_output", "--json",
        state=state, timeout=3600,
    )  # fmt: skip
    if trained.returncode != 0:
        sys.exit(f"specialize failed: {trained.stderr[-2000:]}")
    report: dict[str, Any] = json.loads(trained.stdout)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=300, help="maintenance notes made")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-specialist-") as tmp:
        state = garden_state(Path(tmp))
        load_before = os.getloadavg()[0]
        started = time.monotonic()
        report = train(state, Path(tmp), args.count, args.epochs)
        wall = time.monotonic() - started
        notes = held_out(state)
        server = start_server(state, "--context-size", "512", "--keep-alive", "-1")
        try:
            client = OpenAI(
                base_url=f"{server.url}/v1", api_key=server.token, max_retries=0, timeout=120
            )
            for model in (NAME, BASE, GEMMA):  # loaded before anything is timed
                client.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": "hello"}], max_tokens=2
                )
            served = {
                NAME: serve_scores(client, NAME, notes, system=False),
                BASE: serve_scores(client, BASE, notes, system=True),
                GEMMA: serve_scores(client, GEMMA, notes, system=True),
            }
        finally:
            server.stop()
    result: dict[str, Any] = {
        "cpu": cpu_model(),
        "load_average_before": load_before,
        "training": {
            "wall_seconds": round(wall, 1),
            "train_seconds": report["seconds"],
            "steps": report["steps"],
            "examples": report["examples"],
            "held_out": report["held_out"],
            "peak_rss_mb": report["peak_rss_mb"],
            "held_out_before": report["held_out_before"],
            "held_out_after": report["held_out_after"],
        },
        "served": served,
    }
    print(f"CPU: {result['cpu']}; load average before {load_before:.2f}")
    t: dict[str, Any] = result["training"]
    trained_on = t["examples"] - t["held_out"]
    print(
        f"specialize: {t['wall_seconds']:.0f} s in all ({t['train_seconds']:.0f} s training, "
        f"{t['steps']} steps on {trained_on} notes, peak {t['peak_rss_mb']} MiB); "
        f"held-out exact match {t['held_out_before']:.2f} -> {t['held_out_after']:.2f}"
    )
    print(f"served, {len(notes)} held-out notes:")
    print(f"  {'model':24} {'exact':>6} {'p50 ms':>8} {'p95 ms':>8}")
    for model, row in served.items():
        print(f"  {model:24} {row['exact']:6.2f} {row['p50_ms']:8.1f} {row['p95_ms']:8.1f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
