"""`appliance specialize`: a LoRA adapter trained on the box from chat examples (OpenAI
fine-tuning JSONL), on the pinned GGUF's own weights, then scored on held-out examples
before and after through llama.cpp itself (the serving path), and installed as an
adapter and a specialist with its provenance.

The examples are copied into STATE_DIR/training/NAME (mode 0600; the service user's
alone) and read from there; checkpoints go beside them, so a run that stops resumes
where it left off (`--resume`). The process's memory is watched after every step: past
the bound, training stops with the checkpoint kept and the numbers in the message.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil

from appliance import gguf
from appliance.config import Settings
from appliance.registry import NAME_RE, load_manifests, verify_model
from appliance.training.llama_torch import PROJECTIONS

MIB = 1 << 20
ROLES = ("system", "user", "assistant")
RUN_ONLY = frozenset({"max_memory_mb", "checkpoint_every"})  # may differ on --resume


class TrainingError(ValueError):
    """Training cannot go on; the message says why, with the numbers."""


@dataclass(frozen=True)
class TrainConfig:
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("attn_q", "attn_v")
    epochs: int = 3
    learning_rate: float = 2e-3
    batch_size: int = 8
    held_out: float = 0.2
    max_example_tokens: int = 256
    seed: int = 0
    max_memory_mb: int = 4096
    checkpoint_every: int = 10


@dataclass(frozen=True)
class Example:
    line: int
    messages: list[dict[str, str]]


@dataclass
class Result:
    name: str
    adapter: str
    base: str
    data_sha256: str
    examples: int
    trained: int
    held_out: int
    steps: int
    seconds: float
    held_out_before: float
    held_out_after: float
    peak_rss_mb: int
    config: dict[str, Any]


def read_examples(path: Path) -> list[Example]:
    """Chat examples, one JSON object per line; each a clear error naming its line."""
    found = []
    with path.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
            except ValueError as exc:
                raise TrainingError(f"{path}:{number}: not JSON: {exc}") from None
            messages = data.get("messages") if isinstance(data, dict) else None
            if not isinstance(messages, list) or len(messages) < 2:
                raise TrainingError(f"{path}:{number}: needs 'messages', at least two of them")
            for i, m in enumerate(messages):
                if (
                    not isinstance(m, dict)
                    or m.get("role") not in ROLES
                    or not isinstance(m.get("content"), str)
                ):
                    raise TrainingError(
                        f"{path}:{number}: messages[{i}] needs a role ({', '.join(ROLES)}) "
                        "and text content"
                    )
            if messages[-1]["role"] != "assistant" or not messages[-1]["content"].strip():
                raise TrainingError(f"{path}:{number}: the last message must be the answer")
            kept = [{"role": m["role"], "content": m["content"]} for m in messages]
            found.append(Example(number, kept))
    if len(found) < 5:
        raise TrainingError(f"{path} has {len(found)} examples; at least 5 are needed")
    return found


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _normal(text: str) -> str:
    return " ".join(text.split()).casefold()


def score(engine: Any, examples: list[Example]) -> float:
    """Exact match (whitespace and case aside) of greedy answers, through llama.cpp."""
    from appliance.engines.base import Failed, Finished, Generation, SamplingParams, TextDelta

    right = 0
    for example in examples:
        prompt = engine.chat_prompt(example.messages[:-1])
        want = example.messages[-1]["content"]
        events: list[Any] = []
        params = SamplingParams(max_tokens=max(8, len(want) // 2 + 8), temperature=0.0)
        engine.admit(Generation(prompt, params), events.append, lambda: False)
        for _ in range(params.max_tokens + len(prompt) + 8):  # bounded: a step a token
            if any(isinstance(e, Finished | Failed) for e in events):
                break
            engine.step()
        text = "".join(e.text for e in events if isinstance(e, TextDelta))
        right += _normal(text) == _normal(want)
    return right / len(examples) if examples else 0.0


def _batches(
    items: list[tuple[list[int], list[int]]], size: int, rng: random.Random
) -> Iterator[list[tuple[list[int], list[int]]]]:
    order = list(range(len(items)))
    rng.shuffle(order)
    for start in range(0, len(order), size):
        yield [items[i] for i in order[start : start + size]]


def train(
    settings: Settings,
    data: Path,
    base_name: str,
    name: str,
    config: TrainConfig,
    resume: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> Result:
    """Train, score, write the adapter GGUF; the caller installs it (install_adapter)."""
    import torch

    from appliance.engines import kernels
    from appliance.engines.llama import LlamaEngine
    from appliance.training.llama_torch import LlamaLora, read_weights

    if not NAME_RE.match(name):  # it names a directory and files: nothing else
        raise TrainingError(f"name {name!r} must match {NAME_RE.pattern}")
    manifests = load_manifests(settings)
    if name in manifests or f"{name}-lora" in manifests:
        raise TrainingError(f"a model named {name!r} or {name + '-lora'!r} exists already")
    if not NAME_RE.match(f"{name}-lora"):
        raise TrainingError(f"name {name!r} is too long: its adapter {name}-lora must fit")
    base = manifests.get(base_name)
    if base is None or base.kind != "chat":
        raise TrainingError(f"base {base_name!r} is not a chat model this appliance knows")
    if not verify_model(base, settings.models_path).ok:
        raise TrainingError(f"base {base_name!r}: its file does not verify; see `models verify`")
    architecture = gguf.read_info(settings.models_path / base.file).architecture
    if architecture != "llama":
        raise TrainingError(
            f"training supports the llama architecture; base {base_name!r} is {architecture!r}"
        )
    unknown = sorted(set(config.targets) - set(PROJECTIONS))
    if unknown or not config.targets:
        raise TrainingError(f"unknown targets {unknown}; known: {', '.join(PROJECTIONS)}")
    read_examples(data)  # a bad file is refused before anything is kept
    work = settings.state_dir / "training" / name
    work.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(work, 0o700)
    kept = work / "data.jsonl"
    if resume and kept.is_file():
        if _sha256(kept) != _sha256(data):
            raise TrainingError(
                f"{data} is not the data the run to resume was trained on ({kept}); start "
                "afresh without --resume"
            )
    else:
        shutil.copyfile(data, kept)  # the examples stay in the state directory
        os.chmod(kept, 0o600)
    data_sha = _sha256(kept)
    examples = read_examples(kept)
    rng = random.Random(config.seed)
    shuffled = examples[:]
    rng.shuffle(shuffled)
    held = max(1, int(len(shuffled) * config.held_out))
    held_out, trained = shuffled[:held], shuffled[held:]
    # Which examples were kept back, by line: a check of the result reads this.
    (work / "held_out.json").write_text(json.dumps([e.line for e in held_out]))

    kernels.plan()
    base_path = settings.models_path / base.file
    engine = LlamaEngine(base_path, 512, settings.threads, 0, base.context_length, 1)
    try:
        pairs = []
        for example in trained:
            prompt, answer = engine.answer_tokens(example.messages)
            pairs.append((prompt, answer))
        for example in examples:  # the held-out ones too: scoring reads them whole
            prompt, answer = engine.answer_tokens(example.messages)
            if len(prompt) + len(answer) > config.max_example_tokens:
                raise TrainingError(
                    f"{data}:{example.line} has {len(prompt) + len(answer)} tokens; the "
                    f"limit is {config.max_example_tokens} tokens per example"
                )
        before = score(engine, held_out)
    finally:
        engine.close()

    torch.manual_seed(config.seed)
    torch.set_num_threads(settings.threads or psutil.cpu_count(logical=False) or 1)
    shape, weights = read_weights(base_path)
    model = LlamaLora(shape, weights, config.targets, config.rank, config.alpha, config.seed)
    optimizer = torch.optim.AdamW(model.loras.parameters(), lr=config.learning_rate)
    steps_per_epoch = (len(pairs) + config.batch_size - 1) // config.batch_size
    total = steps_per_epoch * config.epochs
    checkpoint = work / "checkpoint.pt"
    step = 0
    # What the result depends on; the memory bound and the checkpoint interval do not.
    shaping = {k: v for k, v in asdict(config).items() if k not in RUN_ONLY}
    fingerprint = {"data_sha256": data_sha, "base_sha256": base.sha256, **shaping}
    if resume and checkpoint.is_file():
        saved = torch.load(checkpoint, weights_only=True)
        if saved["fingerprint"] != json.loads(json.dumps(fingerprint)):
            raise TrainingError(
                f"{checkpoint} was made with other data, base or settings; start afresh "
                "without --resume"
            )
        model.loras.load_state_dict(saved["loras"])
        optimizer.load_state_dict(saved["optimizer"])
        step = int(saved["step"])
    process = psutil.Process()
    peak = process.memory_info().rss
    started = time.monotonic()
    for epoch in range(config.epochs):
        batches = _batches(pairs, config.batch_size, random.Random(config.seed + epoch))
        for number, batch in enumerate(batches):
            index = epoch * steps_per_epoch + number
            if index < step:
                continue  # done before the checkpoint this run resumed from
            loss = _step(model, batch, torch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step = index + 1
            rss = process.memory_info().rss
            peak = max(peak, rss)
            over = rss > config.max_memory_mb * MIB
            if step % config.checkpoint_every == 0 or step == total or over:
                _save(torch, checkpoint, model, optimizer, step, fingerprint)
            if over:
                raise TrainingError(
                    f"training stopped at step {step} of {total}: the process holds "
                    f"{rss // MIB} MiB, over the bound of {config.max_memory_mb} MiB "
                    "(--max-memory-mb); the checkpoint is kept: --resume continues"
                )
            if progress:
                progress(step, total)
    seconds = time.monotonic() - started
    adapter_file = work / f"{name}-lora.gguf"
    _write_adapter(adapter_file, model, "llama")

    engine = LlamaEngine(base_path, 512, settings.threads, 0, base.context_length, 1)
    try:
        tuned = LlamaEngine(
            base_path,
            512,
            settings.threads,
            0,
            base.context_length,
            1,
            shared=engine,
            adapters=[(adapter_file, 1.0)],
        )
        try:
            after = score(tuned, held_out)
        finally:
            tuned.close()
    finally:
        engine.close()
    return Result(
        name=name,
        adapter=str(adapter_file),
        base=base.name,
        data_sha256=data_sha,
        examples=len(examples),
        trained=len(trained),
        held_out=len(held_out),
        steps=step,
        seconds=round(seconds, 1),
        held_out_before=before,
        held_out_after=after,
        peak_rss_mb=peak // MIB,
        config=asdict(config),
    )


def _step(model: Any, batch: list[tuple[list[int], list[int]]], torch: Any) -> Any:
    """Mean cross-entropy over the answers' tokens (the prompt is context, not target)."""
    length = max(len(p) + len(a) for p, a in batch)
    ids = torch.zeros((len(batch), length), dtype=torch.long)
    labels = torch.full((len(batch), length), -100, dtype=torch.long)
    for row, (prompt, answer) in enumerate(batch):
        tokens = prompt + answer
        ids[row, : len(tokens)] = torch.tensor(tokens)
        # Position t predicts token t + 1: the answer's tokens are the targets.
        labels[row, len(prompt) - 1 : len(tokens) - 1] = torch.tensor(answer)
    hidden = model.hidden(ids)
    targets = labels != -100
    logits = model.logits(hidden[targets])  # the answers' positions only
    return torch.nn.functional.cross_entropy(logits, labels[targets])


def _save(torch: Any, path: Path, model: Any, optimizer: Any, step: int, fingerprint: Any) -> None:
    partial = path.with_suffix(".partial")
    torch.save(
        {
            "step": step,
            "loras": model.loras.state_dict(),
            "optimizer": optimizer.state_dict(),
            "fingerprint": json.loads(json.dumps(fingerprint)),
        },
        partial,
    )
    os.chmod(partial, 0o600)
    os.replace(partial, path)


def _write_adapter(path: Path, model: Any, architecture: str) -> None:
    from appliance.adapters.convert import write_gguf_adapter
    from appliance.adapters.formats import F32, FILE_TYPE

    tensors = sorted(model.adapter_tensors().items())
    write_gguf_adapter(path, architecture, float(model.alpha), FILE_TYPE[F32], tensors)


def describe(result: Result) -> dict[str, str]:
    """The provenance an adapter made here carries in its manifest."""
    return {
        "made_on": "this appliance (appliance specialize)",
        "training_data_sha256": result.data_sha256,
        "examples": str(result.examples),
        "trained_on": str(result.trained),
        "held_out": str(result.held_out),
        "held_out_exact_before": f"{result.held_out_before:.3f}",
        "held_out_exact_after": f"{result.held_out_after:.3f}",
        "steps": str(result.steps),
        "seconds": str(result.seconds),
        "hyperparameters": json.dumps(result.config, sort_keys=True),
    }
