"""Routing, measured on this box: a specialist made here (the line's defect codes,
`appliance specialize` on the default model), the default model as the generalist, and
a route over both (MiniLM comparing each question with the specialist's domain), on a
held-out suite of technicians' notes and general questions, through the real server.

1. Train `line-codes` on the maintenance log (as bench/specialist.py does).
2. Split its held-out notes and a set of general questions into a calibration suite
   and a test suite (disjoint); `appliance route calibrate` on the first.
3. `appliance eval run` on the test suite for specialist-only, generalist-only and
   routed serving: accuracy (with its 95 % interval), mean latency, and which model
   answered how many (the route's referrals among them).

Targets: routed accuracy >= the best single model's, at mean latency <= 0.6 x the
generalist-only latency.

    .venv/bin/python bench/route.py [--count 300] [--epochs 4] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "models" / "line"))
sys.path.insert(0, str(REPO / "bench"))

import maintenance  # noqa: E402
from specialist import BASE, NAME, garden_state, train  # noqa: E402

from appliance.engines.kernels import cpu_model  # noqa: E402
from appliance.training.specialize import read_examples  # noqa: E402

from helpers import run_cli, start_server  # noqa: E402

EMBEDDING, ROUTE = "minilm-l6-v2", "desk"
MAX_TOKENS = 32
# General questions the line desk also gets, with the word a right answer holds.
GENERAL = [
    ("What is the capital of France?", "Paris"),
    ("What is the capital of Italy?", "Rome"),
    ("What is the capital of Japan?", "Tokyo"),
    ("What is the capital of Germany?", "Berlin"),
    ("What is the capital of Spain?", "Madrid"),
    ("What is the capital of England?", "London"),
    ("What colour is the sky on a clear day?", "blue"),
    ("What colour is grass?", "green"),
    ("What colour are ripe bananas?", "yellow"),
    ("What is 2 + 2?", "4"),
    ("What is 3 + 5?", "8"),
    ("What is 10 minus 3?", "7"),
    ("How many days are in a week?", "seven"),
    ("How many legs does a spider have?", "eight"),
    ("Which animal says moo?", "cow"),
    ("Which animal barks?", "dog"),
    ("What do bees make?", "honey"),
    ("What is frozen water called?", "ice"),
    ("Which planet do we live on?", "Earth"),
    ("What is the largest ocean on Earth?", "Pacific"),
    ("Who wrote Romeo and Juliet?", "Shakespeare"),
    ("What gas do plants take in from the air?", "carbon dioxide"),
    ("What is the boiling point of water in degrees Celsius?", "100"),
    ("Which star is at the centre of our solar system?", "Sun"),
    ("What is the opposite of hot?", "cold"),
    ("What do you call a baby cat?", "kitten"),
    ("How many hours are in a day?", "24"),
    ("What is the chemical symbol for water?", "H2O"),
    ("Which season comes after winter?", "spring"),
    ("What language is spoken in Spain?", "Spanish"),
]


def held_out_notes(state: Path) -> list[tuple[str, str]]:
    work = state / "training" / NAME
    lines = set(json.loads((work / "held_out.json").read_text()))
    out = []
    for e in read_examples(work / "data.jsonl"):
        if e.line in lines:
            out.append((e.messages[1]["content"], e.messages[2]["content"]))
    return out


def write_suite(
    path: Path, name: str, notes: list[tuple[str, str]], general: list[tuple[str, str]]
) -> None:
    header = {"suite": {"name": name, "grader": "contains", "max_tokens": MAX_TOKENS}}
    lines: list[dict[str, Any]] = [header]
    for i, (note, code) in enumerate(notes):
        lines.append(
            {"id": f"note-{i}", "prompt": note, "expected": code, "tags": {"domain": NAME}}
        )
    for i, (question, answer) in enumerate(general):
        lines.append(
            {
                "id": f"general-{i}",
                "prompt": question,
                "expected": answer,
                "tags": {"domain": "general"},
            }
        )
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


def cli(state: Path, port: int, token: str, *args: str) -> Any:
    done = run_cli(
        *args,
        "--port",
        str(port),
        "--json",
        state=state,
        timeout=3600,
        env={"APPLIANCE_TOKEN": token},
    )
    if done.returncode != 0:
        sys.exit(f"appliance {' '.join(args[:2])} failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=300, help="maintenance notes made")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-route-") as tmp:
        work = Path(tmp)
        state = garden_state(work)
        train(state, work, args.count, args.epochs)
        notes = held_out_notes(state)
        rng = random.Random(17)
        rng.shuffle(notes)
        general = list(GENERAL)
        rng.shuffle(general)
        half, g_half = len(notes) // 2, len(general) // 2
        calibration, test = work / "calibration.jsonl", work / "test.jsonl"
        write_suite(calibration, "desk calibration", notes[:half], general[:g_half])
        write_suite(test, "desk held-out", notes[half:], general[g_half:])
        examples = [s for symptoms in maintenance.SYMPTOMS.values() for s in symptoms]
        (state / "routes").mkdir()
        (state / "routes" / f"{ROUTE}.toml").write_text(
            'description = "The line\'s maintenance desk"\n'
            f'embedding = "{EMBEDDING}"\ngeneralist = "{BASE}"\n'
            'referral = "Please ask the line supervisor."\n'
            f'[[specialists]]\nmodel = "{NAME}"\n'
            'description = "technicians\' notes about faults of machines on the line"\n'
            f"examples = {json.dumps(examples)}\n"
        )
        load_before = os.getloadavg()[0]
        server = start_server(state, "--context-size", "512", "--keep-alive", "-1")
        try:
            token, port = server.token, server.port
            calibrated = cli(
                state,
                port,
                token,
                "route",
                "calibrate",
                ROUTE,
                "--suite",
                str(calibration),
                "--target-error",
                "0.1",
            )
            report = cli(
                state,
                port,
                token,
                "eval",
                "run",
                str(test),
                "--model",
                NAME,
                "--model",
                BASE,
                "--model",
                ROUTE,
            )
        finally:
            server.stop()
    rows = {m["model"]: m for m in report["models"]}
    gen_latency = rows[BASE]["latency_ms"]["mean"]
    result: dict[str, Any] = {
        "cpu": cpu_model(),
        "load_average_before": load_before,
        "cases": report["suite"]["cases"],
        "calibration": {
            k: calibrated[k]
            for k in ("similarity", "specialist_confidence", "generalist_confidence")
        },
        "calibration_measured": {
            k: v for k, v in calibrated["measured"].items() if k != "observations"
        },
        "models": {
            name: {
                "accuracy": m["score"],
                "ci95": m["ci95"],
                "mean_ms": m["latency_ms"]["mean"],
                "p95_ms": m["latency_ms"]["p95"],
                "by_domain": {v: g["score"] for v, g in m["tags"]["domain"].items()},
                "answered_by": m.get("answered_by"),
            }
            for name, m in rows.items()
        },
    }
    routed = result["models"][ROUTE]
    best_single = max(result["models"][NAME]["accuracy"], result["models"][BASE]["accuracy"])
    result["routed_vs_best_single"] = routed["accuracy"] - best_single
    result["routed_latency_ratio"] = routed["mean_ms"] / gen_latency
    shares = routed["answered_by"] or {}
    result["referral_rate"] = shares.get("referral", 0) / report["suite"]["cases"]
    print(
        f"CPU: {result['cpu']}; load average before {load_before:.2f}; "
        f"{result['cases']} held-out cases ({len(notes) - half} notes, "
        f"{len(general) - g_half} general questions)"
    )
    c = result["calibration"]
    print(
        f"calibrated: similarity >= {c['similarity']:.3f}, specialist confidence >= "
        f"{c['specialist_confidence']:.3f}, generalist >= {c['generalist_confidence']:.3f}"
    )
    print(
        f"  {'serving':24} {'accuracy':>8} {'95% CI':>13} {'mean ms':>8} {'p95 ms':>8}  "
        "notes / general"
    )
    for name, m in result["models"].items():
        d = m["by_domain"]
        print(
            f"  {name:24} {m['accuracy']:8.2f} {m['ci95'][0]:6.2f}-{m['ci95'][1]:<6.2f} "
            f"{m['mean_ms']:8.0f} {m['p95_ms']:8.0f}  {d.get(NAME, 0):.2f} / "
            f"{d.get('general', 0):.2f}"
        )
    print(f"routed answers by: {shares}; referral rate {result['referral_rate']:.2f}")
    print(
        f"routed accuracy - best single: {result['routed_vs_best_single']:+.2f} (target >= 0); "
        f"routed / generalist-only mean latency: {result['routed_latency_ratio']:.2f} "
        "(target <= 0.6)"
    )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
