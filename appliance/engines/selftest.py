"""The start-up self-test: before a language model serves, a child process loads it
with the kernels the server chose and decodes a prompt and a few tokens. A native
crash (a bad kernel, an illegal instruction) kills the child, not the server; the
server then loads the model on the safe path (no extra buffer types: neither repacked
weights nor AMX) and tests that too, or refuses the model with the child's fate.

Run as ``python -m appliance.engines.selftest MODEL [--kernels K] [--extra-buffers
0|1] [--gpu-layers N]``: it prints one JSON line (the kernels and the tokens) and exits
0. ``APPLIANCE_SELFTEST_FAULT`` makes the child abort as a crashing kernel would:
``extra-buffers`` while it tests with extra buffer types, ``always`` whatever it tests
(for the tests of the fallback; never set in service).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

FAULT_ENV = "APPLIANCE_SELFTEST_FAULT"
PROMPT_TOKENS = 48  # enough for the batched (GEMM) kernels, not only the GEMV ones
DECODE_TOKENS = 4
TIMEOUT_SECONDS = 300.0  # an emulated CPU is slow; a hung child counts as failed


@dataclass(frozen=True)
class Outcome:
    ok: bool
    extra_buffers: bool
    detail: str  # what the child did: its tokens, or how it died


def fate(returncode: int, stderr: str) -> str:
    """How a child ended, in a few words: its signal or exit status, and its last line."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        how = f"killed by {name}"
    else:
        how = f"exited {returncode}"
    tail = stderr.strip().splitlines()[-1:] if stderr.strip() else []
    return how + (f" ({tail[0][:200]})" if tail else "")


def probe(
    model: Path, kernels: str, extra_buffers: bool, gpu_layers: int, timeout: float
) -> Outcome:
    command = [
        sys.executable,
        "-m",
        "appliance.engines.selftest",
        str(model),
        "--kernels",
        kernels,
        "--extra-buffers",
        "1" if extra_buffers else "0",
        "--gpu-layers",
        str(gpu_layers),
    ]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return Outcome(False, extra_buffers, f"did not finish within {timeout:.0f} s")
    if done.returncode != 0:
        return Outcome(False, extra_buffers, fate(done.returncode, done.stderr))
    try:
        result = json.loads(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return Outcome(False, extra_buffers, f"printed no result: {done.stdout[-200:]!r}")
    return Outcome(True, extra_buffers, f"decoded {len(result['tokens'])} tokens")


def check(
    model: Path,
    kernels: str,
    extra_buffers: bool,
    gpu_layers: int,
    timeout: float = TIMEOUT_SECONDS,
) -> tuple[Outcome, list[Outcome]]:
    """The path the model may load on: the first that decodes, fastest first. Returns
    it and every attempt (a failed one says how the child died)."""
    attempts = [probe(model, kernels, extra_buffers, gpu_layers, timeout)]
    if not attempts[0].ok and extra_buffers:
        attempts.append(probe(model, kernels, False, gpu_layers, timeout))
    return attempts[-1], attempts


class BareContext:
    """A bare llama.cpp context on one model, one sequence, no server: the self-test's
    child decodes with it, and bench/kernels.py times the kernel paths with it."""

    def __init__(
        self,
        model_path: Path,
        extra_buffers: bool,
        gpu_layers: int,
        n_ctx: int,
        n_batch: int,
        threads: int,
    ) -> None:
        import llama_cpp

        from appliance.engines import devices

        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = gpu_layers
        params.use_extra_bufts = extra_buffers
        if gpu_layers == 0:  # as the engine: the CPU kernels under test, no GPU in it
            devices.cpu_only(params)
        self.model = llama_cpp.llama_model_load_from_file(str(model_path).encode(), params)
        if not self.model:
            raise SystemExit(f"llama.cpp could not load {model_path}")
        ctx_params = llama_cpp.llama_context_default_params()
        ctx_params.n_ctx = n_ctx
        ctx_params.n_batch = ctx_params.n_ubatch = n_batch
        ctx_params.n_threads = ctx_params.n_threads_batch = threads
        self.ctx = llama_cpp.llama_init_from_model(self.model, ctx_params)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))
        self.batch = llama_cpp.llama_batch_init(n_batch, 0, 1)

    def run(self, tokens: list[int], start: int) -> None:
        """Decode ``tokens`` at positions from ``start``, logits for the last only."""
        import llama_cpp

        batch = self.batch
        batch.n_tokens = len(tokens)
        for i, token in enumerate(tokens):
            batch.token[i] = token
            batch.pos[i] = start + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = i == len(tokens) - 1
        if llama_cpp.llama_decode(self.ctx, batch) != 0:
            raise SystemExit("llama_decode failed")

    def greedy(self) -> int:
        """The highest-scoring next token after the last ``run``."""
        import llama_cpp
        import numpy

        row = llama_cpp.llama_get_logits_ith(self.ctx, -1)
        return int(numpy.ctypeslib.as_array(row, (self.n_vocab,)).argmax())

    def clear(self) -> None:
        """Forget everything decoded (the next ``run`` starts at position 0)."""
        import llama_cpp

        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.ctx), True)

    def close(self) -> None:
        import llama_cpp

        llama_cpp.llama_batch_free(self.batch)
        llama_cpp.llama_free(self.ctx)
        llama_cpp.llama_model_free(self.model)


def _decode(model_path: Path, extra_buffers: bool, gpu_layers: int) -> list[int]:
    context = BareContext(model_path, extra_buffers, gpu_layers, 128, 64, os.cpu_count() or 1)
    prompt = [(7 + 13 * i) % context.n_vocab for i in range(PROMPT_TOKENS)]
    produced: list[int] = []
    context.run(prompt, 0)
    for step in range(DECODE_TOKENS):
        token = context.greedy()
        produced.append(token)
        context.run([token], PROMPT_TOKENS + step)
    context.close()
    return produced


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m appliance.engines.selftest")
    parser.add_argument("model", type=Path)
    parser.add_argument("--kernels", default="auto")
    parser.add_argument("--extra-buffers", type=int, choices=(0, 1), default=1)
    parser.add_argument("--gpu-layers", type=int, default=0)
    args = parser.parse_args(argv)
    from appliance.engines import kernels

    plan = kernels.plan(args.kernels)
    fault = os.environ.get(FAULT_ENV, "")
    if fault == "always" or (fault == "extra-buffers" and args.extra_buffers):
        os.abort()  # as a kernel that faults would end the process
    tokens = _decode(args.model, bool(args.extra_buffers), args.gpu_layers)
    print(json.dumps({"variant": plan.variant, "features": plan.features, "tokens": tokens}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
