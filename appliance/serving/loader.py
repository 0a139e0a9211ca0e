"""One loader turns a manifest into a served model, by kind. The pool asks a Loader for
a model's memory footprint and to load it; tests give the pool a fake one."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import psutil

from appliance import gguf
from appliance.config import Settings
from appliance.registry import Manifest, file_identity
from appliance.resources import footprint
from appliance.serving.models import ChatModel, Loaded, RunModel
from appliance.serving.scheduler import Admission, ModelScheduler

if TYPE_CHECKING:
    from appliance.engines.devices import Placement

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Parts:
    """What a specialist is made of, resolved by the pool: its base model's manifest
    and, once loaded, the base itself; its adapters' manifests and scales."""

    base: Manifest
    adapters: tuple[tuple[Manifest, float], ...]
    loaded_base: Loaded | None = None


class Loader(Protocol):
    def footprint(self, manifest: Manifest, parts: Parts | None = None) -> int:
        """Bytes the model is expected to hold once loaded (a specialist: its own
        context and adapters; its base holds the weights)."""
        ...

    def load(self, manifest: Manifest, parts: Parts | None = None) -> Loaded:
        """The model, loaded and ready to serve; raises with the reason otherwise."""
        ...


@dataclass(frozen=True)
class ServeSettings:
    """A model's serving settings: its manifest's [serve] table over the global ones."""

    parallel_streams: int
    context_size: int
    threads: int
    gpu_layers: int
    keep_alive: int

    @classmethod
    def of(cls, settings: Settings, manifest: Manifest) -> ServeSettings:
        own = manifest.serve

        def pick(mine: int | None, theirs: int) -> int:
            return theirs if mine is None else mine

        return cls(
            parallel_streams=pick(own.parallel_streams, settings.parallel_streams),
            context_size=pick(own.context_size, settings.context_size),
            threads=pick(own.threads, settings.threads),
            gpu_layers=pick(own.gpu_layers, settings.gpu_layers),
            keep_alive=pick(own.keep_alive, settings.keep_alive),
        )


def _kernel_path(
    settings: Settings, serve: ServeSettings, manifest: Manifest, path: Path
) -> tuple[bool, dict[str, Any]]:
    """Choose the kernels (once per process), then let a child process decode with
    them before this one does: whether the model loads with extra buffer types."""
    from appliance.engines import kernels, selftest

    plan = kernels.plan(settings.cpu_kernels)
    outcome, attempts = selftest.check(
        path, settings.cpu_kernels, plan.extra_buffers, serve.gpu_layers
    )
    failed = [a for a in attempts if not a.ok]
    for attempt in failed:
        log.error(
            "self-test failed" + ("; trying without extra buffer types" if outcome.ok else ""),
            extra={
                "model": manifest.name,
                "extra_buffers": attempt.extra_buffers,
                "child": attempt.detail,
            },
        )
    if not outcome.ok:
        raise RuntimeError(
            "the start-up self-test crashed on every kernel path: "
            + "; ".join(f"extra buffers {a.extra_buffers}: {a.detail}" for a in attempts)
        )
    log.info(
        "self-test",
        extra={
            "model": manifest.name,
            "extra_buffers": outcome.extra_buffers,
            "child": outcome.detail,
        },
    )
    if failed:
        path_note = (
            f"safe path: the self-test with extra buffer types {failed[0].detail}, "
            f"so they are off for this model"
        )
    else:
        path_note = "self-test passed"
    return outcome.extra_buffers, {
        "variant": plan.variant,
        "extra_buffers": outcome.extra_buffers,
        "cpu_amx": plan.cpu_amx,
        "reason": plan.reason,
        "selftest": f"{path_note} ({outcome.detail})",
    }


class EngineLoader:
    """The real engines: llama.cpp for chat models, onnxruntime for tensor and
    embedding models."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # The self-test's verdict per file (by identity) and GPU layers: a model that
        # is unloaded and loaded again does not pay the child process again (0.8 s of
        # gemma-3-270m's 1.4 s load, bench/garden.py). The kernels are chosen once per
        # process, so they are the same.
        self._selftests: dict[tuple[tuple[int, ...], int], tuple[bool, dict[str, Any]]] = {}

    def footprint(self, manifest: Manifest, parts: Parts | None = None) -> int:
        serve = ServeSettings.of(self.settings, manifest)
        models = self.settings.models_path
        if parts is None:
            path = models / manifest.file
            return footprint(
                manifest, path, serve.context_size, serve.parallel_streams, self.settings
            )
        own = footprint(
            parts.base,
            models / parts.base.file,
            serve.context_size,
            serve.parallel_streams,
            self.settings,
            weights=False,
        )
        return own + sum(_size(models / a.file) for a, _ in parts.adapters)

    def load(self, manifest: Manifest, parts: Parts | None = None) -> Loaded:
        settings = self.settings
        serve = ServeSettings.of(settings, manifest)
        if manifest.kind == "specialist":
            assert parts is not None and isinstance(parts.loaded_base, ChatModel)
            return self._specialist(manifest, serve, parts, parts.loaded_base)
        path = settings.models_path / manifest.file
        if manifest.kind == "tensor":
            from appliance.engines.onnx import OnnxEngine

            slots = psutil.cpu_count(logical=False) or 1
            return RunModel(
                manifest,
                OnnxEngine(path, settings.onnx_threads),
                Admission(manifest.name, slots, settings.queue_depth),
            )
        if manifest.kind == "embedding":
            from appliance.engines.embed import EmbeddingEngine

            assert manifest.tokenizer is not None  # the manifest's parser insists
            cores = psutil.cpu_count(logical=False) or 1
            threads = serve.threads or cores
            engine = EmbeddingEngine(
                path,
                settings.models_path / manifest.tokenizer.file,
                threads=threads,
                max_input_tokens=manifest.context_length or 256,
            )
            # Each run uses `threads` cores: more runs at once than cores allow would only
            # take turns on them; the rest wait in the queue.
            slots = max(1, cores // threads)
            return RunModel(manifest, engine, Admission(manifest.name, slots, settings.queue_depth))
        key = (tuple(file_identity(path)), serve.gpu_layers)
        if key not in self._selftests:
            self._selftests[key] = _kernel_path(settings, serve, manifest, path)
        extra_buffers, kernels_row = self._selftests[key]
        from appliance.engines.llama import LlamaEngine

        chat = LlamaEngine(
            path,
            context_size=serve.context_size,
            threads=serve.threads,
            gpu_layers=serve.gpu_layers,
            model_context=manifest.context_length,
            parallel=serve.parallel_streams,
            kv_type=settings.kv_cache_type,
            extra_buffers=extra_buffers,
            chat_template=manifest.chat_template,
        )
        chat.info.extra["kernels"] = kernels_row
        _log_placement(manifest.name, chat.placement)
        scheduler = ModelScheduler(manifest.name, chat, settings.queue_depth)
        scheduler.start()
        return ChatModel(manifest, chat, scheduler)

    def _specialist(
        self, manifest: Manifest, serve: ServeSettings, parts: Parts, base: ChatModel
    ) -> ChatModel:
        """A context of its own over the base's weights, with its adapters applied to
        it alone: its batch runs on its own worker thread, beside the base's and other
        specialists', and no slot's cached prefix crosses from one to another."""
        from appliance.engines.llama import LlamaEngine

        models = self.settings.models_path
        base_info = gguf.read_info(models / parts.base.file)
        for adapter, _ in parts.adapters:
            theirs = gguf.read_info(models / adapter.file).architecture
            if theirs != base_info.architecture:
                raise RuntimeError(
                    f"adapter {adapter.name!r} is for architecture {theirs!r}; base "
                    f"{parts.base.name!r} is {base_info.architecture!r}"
                )
        engine = LlamaEngine(
            models / parts.base.file,
            context_size=serve.context_size,
            threads=serve.threads,
            gpu_layers=serve.gpu_layers,
            model_context=parts.base.context_length,
            parallel=serve.parallel_streams,
            kv_type=self.settings.kv_cache_type,
            chat_template=parts.base.chat_template,
            shared=base.engine,  # type: ignore[arg-type]
            adapters=[(models / a.file, scale) for a, scale in parts.adapters],
        )
        engine.info.extra["kernels"] = base.engine.info.extra.get("kernels")
        scheduler = ModelScheduler(manifest.name, engine, self.settings.queue_depth)
        scheduler.start()
        return ChatModel(manifest, engine, scheduler)


def _log_placement(name: str, placement: Placement) -> None:
    """Where the model's layers run; a warning when a GPU was asked for and none is
    used (a CPU-only build, or no device), which would otherwise only be slow."""
    fields = {"model": name, "offloaded": placement.offloaded, "layers": placement.layers}
    if placement.wanted_gpu:
        log.warning("model placed on the CPU: " + placement.reason, extra=fields)
    else:
        log.info("model placed: " + placement.reason, extra=fields)


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else 0
