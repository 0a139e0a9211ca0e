"""llama.cpp's CPU kernel paths on this machine, side by side (issue #13): the path
``cpu_kernels = auto`` takes (the baseline), the same kernels without extra buffer
types (no repacked weights: the self-test's safe path), and, on a CPU with AMX, the
AMX variant with and without its extra buffers (the first is what llama.cpp would do
on its own; it may crash, which is reported, not hidden).

Each path runs in its own child process (kernels are chosen once per process, and a
crash must not end the bench): the default model, 2 threads, a 512-token prompt read
in one batch, then 64 single-token steps, best of --rounds. Prints tokens/s and the
ratio to ``auto``.

Usage:

    .venv/bin/python bench/kernels.py [--model FILE] [--rounds 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

PROMPT, STEPS = 512, 64


def measure(model: Path, setting: str, extra_buffers: bool, rounds: int, threads: int) -> dict:
    """In this (child) process: choose the kernels, load the model (no layer on a GPU,
    even on a GPU build), time it."""
    from appliance.engines import kernels, selftest

    plan = kernels.plan(setting)
    context = selftest.BareContext(model, extra_buffers, 0, PROMPT + STEPS + 8, PROMPT, threads)
    pp = tg = 0.0
    for _ in range(rounds):
        context.clear()
        start = time.perf_counter()
        context.run([(7 + 13 * i) % context.n_vocab for i in range(PROMPT)], 0)
        pp = max(pp, PROMPT / (time.perf_counter() - start))
        start = time.perf_counter()
        for step in range(STEPS):
            context.run([(3 + 11 * step) % context.n_vocab], PROMPT + step)
        tg = max(tg, STEPS / (time.perf_counter() - start))
    context.close()
    return {"variant": plan.variant, "pp512": pp, "decode": tg}


def child(model: Path, setting: str, extra: bool, rounds: int, threads: int) -> dict:
    from appliance.engines.selftest import fate

    command = [sys.executable, __file__, "--child", setting, str(int(extra))]
    command += ["--model", str(model), "--rounds", str(rounds), "--threads", str(threads)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        return {"crashed": "did not finish in 900 s"}
    if done.returncode != 0:
        return {"crashed": fate(done.returncode, done.stderr)}
    result: dict = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", nargs=2, metavar=("SETTING", "EXTRA"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        setting, extra = args.child[0], args.child[1] == "1"
        print(json.dumps(measure(args.model, setting, extra, args.rounds, args.threads)))
        return 0

    from appliance.engines.kernels import AMX_FLAGS, cpu_flags, cpu_model

    from helpers import default_model_file

    model = args.model or default_model_file()
    amx = bool(AMX_FLAGS & cpu_flags())
    print(f"CPU: {cpu_model()}; AMX: {'yes' if amx else 'no'}; model {model.name}")
    paths = [("auto", True), ("auto", False)] + ([("amx", True), ("amx", False)] if amx else [])
    base: dict | None = None  # the first path that ran: auto with extra buffers, normally
    for setting, extra in paths:
        result = child(model, setting, extra, args.rounds, args.threads)
        label = f"cpu_kernels={setting:4} extra buffers {'on ' if extra else 'off'}"
        if "crashed" in result:
            print(f"{label}: {result['crashed']}")
            continue
        if base is None:
            base, base_label = result, label.split(":")[0]
        pp, tg = result["pp512"] / base["pp512"], result["decode"] / base["decode"]
        ratios = f"{pp:.2f} x, {tg:.2f} x"
        print(
            f"{label} ({result['variant']}): pp512 {result['pp512']:.0f} tok/s, "
            f"decode {result['decode']:.1f} tok/s ({ratios} the first: {base_label.strip()})"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
