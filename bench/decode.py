"""What batching can give on this machine and model at best: one `llama_decode` of 1, 2,
4 and 8 tokens (one per sequence, each in its own KV stream, as the appliance's engine
runs them), median time per step, tokens/s and the ratio to 1 token. The API's
many-stream figures (bench/llm.py) cannot beat these ratios.

    .venv/bin/python bench/decode.py [--steps 30]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import llama_cpp

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from appliance.engines.llama import LlamaEngine, default_threads  # noqa: E402

from helpers import default_model_file  # noqa: E402

MODEL = default_model_file()
SIZES = (1, 2, 4, 8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    engine = LlamaEngine(MODEL, 2048, default_threads(), 0, parallel=max(SIZES))
    ctx, batch = engine._ctx.ctx, engine._batch  # the engine's own context and batch
    positions = [0] * max(SIZES)

    def step(n: int) -> float:
        batch.n_tokens = n
        for i in range(n):
            batch.token[i] = 100 + i
            batch.pos[i] = positions[i]
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = i
            batch.logits[i] = True
            positions[i] += 1
        start = time.perf_counter()
        if llama_cpp.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")
        return time.perf_counter() - start

    for n in SIZES:  # warm up every graph size
        step(n)
    times: dict[int, list[float]] = {n: [] for n in SIZES}
    for _ in range(args.steps):  # interleaved rounds: drift hits every size alike
        for n in SIZES:
            times[n].append(step(n))
    one = statistics.median(times[1])
    print(f"{'tokens':>7}{'step ms':>10}{'ms/token':>10}{'tok/s':>8}{'x 1 token':>11}")
    for n in SIZES:
        t = statistics.median(times[n])
        print(f"{n:7}{t * 1000:10.1f}{t * 1000 / n:10.2f}{n / t:8.0f}{n * one / t:11.2f}")
    engine.close()


if __name__ == "__main__":
    main()
