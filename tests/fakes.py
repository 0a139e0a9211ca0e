"""Fakes of the engine protocols, for the fast tier: the pool's scheduling (load on
demand, keep-alive, least-recently-used eviction) and the pipeline run in seconds
without a GGUF. The real engines are tested on real models elsewhere; a fake never
stands in for them in a test of what a user gets.

A fake garden is a manifest directory of small real files (so verification by SHA-256
is the real one) whose manifests name the kind; ``FakeLoader`` turns them into fake
engines and says each model needs ``sizes[name]`` MiB."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from appliance.config import Settings, load_settings
from appliance.engines.base import (
    EngineInfo,
    Event,
    Failed,
    Finished,
    Generation,
    PromptError,
    TextDelta,
)
from appliance.registry import Manifest
from appliance.serving.loader import Parts
from appliance.serving.models import ChatModel, Loaded, RunModel
from appliance.serving.scheduler import Admission, ModelScheduler

MIB = 1 << 20
WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]


class FakeChatEngine:
    """Splits prompts into words (one token each) and answers with the prompt's words
    back, one per step, up to max_tokens."""

    def __init__(
        self,
        on_close: Callable[[], None],
        slots: int = 2,
        n_ctx: int = 64,
        words: list[str] = WORDS,
    ) -> None:
        self.info = EngineInfo(n_ctx=n_ctx, threads=1, gpu_layers=0)
        self.words = words
        self._slots = slots
        self._runs: list[tuple[Generation, Callable[[Event], None], Callable[[], bool], int]] = []
        self._on_close = on_close
        self.vocab: dict[str, int] = {}

    def _ids(self, text: str) -> list[int]:
        return [self.vocab.setdefault(w, len(self.vocab)) for w in text.split()]

    def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        return self._ids(" ".join(m["content"] for m in messages))

    def text_prompt(self, prompt: str | list[int]) -> list[int]:
        return list(prompt) if isinstance(prompt, list) else self._ids(prompt)

    def json_grammar(self, schema: dict[str, object] | None) -> str:
        raise PromptError("the fake engine has no grammar", param="response_format")

    def free_slots(self) -> int:
        return self._slots - len(self._runs)

    def busy_slots(self) -> int:
        return len(self._runs)

    def admit(
        self,
        generation: Generation,
        emit: Callable[[Event], None],
        cancelled: Callable[[], bool],
    ) -> None:
        self._runs.append((generation, emit, cancelled, 0))

    def step(self) -> int:
        time.sleep(0.001)
        still = []
        for generation, emit, cancelled, made in self._runs:
            prompt = len(generation.prompt_tokens)
            if cancelled():
                emit(Finished("cancelled", prompt, made))
                continue
            if made >= generation.params.max_tokens:
                emit(Finished("length", prompt, made))
                continue
            emit(TextDelta(self.words[made % len(self.words)] + " "))
            still.append((generation, emit, cancelled, made + 1))
        self._runs = still
        return len(still)

    def fail_all(self, message: str) -> None:
        for _, emit, _, _ in self._runs:
            emit(Failed(message))
        self._runs = []

    def close(self) -> None:
        self._on_close()


class FakeEmbeddingEngine:
    """Vectors from a hash of the token ids: deterministic, normalised, 8 dimensions."""

    dimensions = 8
    max_input_tokens = 16

    def __init__(self, on_close: Callable[[], None]) -> None:
        self._on_close = on_close

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        return [self.wrap_ids([len(w) for w in t.split()]) for t in texts]

    def wrap_ids(self, ids: list[int]) -> list[int]:
        return [101, *ids, 102]

    def vocab_size(self) -> int:
        return 1000

    def embed(self, batch: list[list[int]]) -> np.ndarray:
        rows = []
        for ids in batch:
            seed = int.from_bytes(hashlib.sha256(str(ids).encode()).digest()[:4], "little")
            row = np.random.default_rng(seed).standard_normal(self.dimensions)
            rows.append(row / np.linalg.norm(row))
        return np.array(rows, dtype=np.float32)

    def close(self) -> None:
        self._on_close()


class FakeLoader:
    """Loads fake engines; ``sizes`` (MiB) is what each model holds in the budget;
    ``delay`` seconds per load; ``fail`` names models whose load raises."""

    def __init__(
        self,
        sizes: dict[str, int],
        delay: float = 0.0,
        fail: frozenset[str] = frozenset(),
        queue_depth: int = 4,
    ) -> None:
        self.sizes = sizes
        self.delay = delay
        self.fail = fail
        self.queue_depth = queue_depth
        self.loads: list[str] = []
        self.closed: list[str] = []
        self._lock = threading.Lock()

    def footprint(self, manifest: Manifest, parts: Parts | None = None) -> int:
        return self.sizes.get(manifest.name, 1) * MIB

    def load(self, manifest: Manifest, parts: Parts | None = None) -> Loaded:
        with self._lock:
            self.loads.append(manifest.name)
        time.sleep(self.delay)
        if manifest.name in self.fail:
            raise RuntimeError("the fake file is corrupt")

        def closed() -> None:
            with self._lock:
                self.closed.append(manifest.name)

        if manifest.kind == "specialist":
            # Its own engine over its base's (a specialist's answers differ: its
            # words run backwards), as the real loader gives it a context of its own.
            assert parts is not None and isinstance(parts.loaded_base, ChatModel)
            engine = FakeChatEngine(on_close=closed, words=WORDS[::-1])
            scheduler = ModelScheduler(manifest.name, engine, self.queue_depth)
            scheduler.start()
            return ChatModel(manifest, engine, scheduler)
        if manifest.kind == "chat":
            engine = FakeChatEngine(on_close=closed)
            scheduler = ModelScheduler(manifest.name, engine, self.queue_depth)
            scheduler.start()
            return ChatModel(manifest, engine, scheduler)
        run_engine: Any = FakeEmbeddingEngine(on_close=closed)
        return RunModel(manifest, run_engine, Admission(manifest.name, 2, self.queue_depth))


def file_sha256(name: str, kind: str = "chat") -> str:
    """The SHA-256 of the fake file garden() writes for a model."""
    return hashlib.sha256(f"fake {kind} model {name}".encode()).hexdigest()


def garden(root: Path, models: dict[str, dict[str, Any]], **overrides: Any) -> Settings:
    """A state directory and a manifest directory holding ``models``: name -> manifest
    fields (kind, serve table...). Each model file is a few real bytes with its real
    SHA-256; an embedding model gets a tokenizer file too."""
    state, manifests = root / "state", root / "manifests"
    (state / "models").mkdir(parents=True)
    manifests.mkdir(parents=True)
    for name, fields in models.items():
        kind = fields.get("kind", "chat")
        if kind == "specialist":  # no file: its manifest names its parts
            (manifests / f"{name}.toml").write_text(fields["toml"])
            continue
        fmt = "gguf" if kind in ("chat", "adapter") else "onnx"
        file = f"{name}.{fmt}"
        data = f"fake {kind} model {name}".encode()
        (state / "models" / file).write_bytes(data)
        lines = [
            f'name = "{name}"',
            f'file = "{file}"',
            f'sha256 = "{hashlib.sha256(data).hexdigest()}"',
            f'format = "{fmt}"',
            f'kind = "{kind}"',
        ]
        serve = fields.get("serve", {})
        tables = [fields.get("toml", "")]
        if kind == "embedding":
            tokens = b"fake tokenizer"
            (state / "models" / f"{name}.tokenizer.json").write_bytes(tokens)
            tables += [
                "[tokenizer]",
                f'file = "{name}.tokenizer.json"',
                f'sha256 = "{hashlib.sha256(tokens).hexdigest()}"',
            ]
        if serve:
            tables.append("[serve]")
            for key, value in serve.items():
                tables.append(f"{key} = {str(value).lower()}")
        (manifests / f"{name}.toml").write_text("\n".join(lines + tables) + "\n")
    values = {
        "state_dir": state,
        "manifest_dir": manifests,
        "memory_reserve_mb": 0,
        "keep_alive": 300,
        **overrides,
    }
    return load_settings(env={}, overrides=values)
