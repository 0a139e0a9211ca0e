"""The models this process serves: every manifest verified, every verified language
model loaded behind its scheduler. A refused model is kept with its reason so that
readiness and the API can say why; the others serve regardless."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from flask import Flask

from appliance.config import Settings
from appliance.engines.base import TextEngine
from appliance.engines.onnx import OnnxEngine
from appliance.registry import (
    Manifest,
    ManifestError,
    Verification,
    file_identity,
    load_manifests,
    verify_all,
)
from appliance.resources import MemoryBudget, footprint
from appliance.scheduler import Admission, ModelScheduler

log = logging.getLogger(__name__)
EXTENSION = "appliance.models"


@dataclass
class ServedTensorModel:
    manifest: Manifest
    engine: OnnxEngine
    admission: Admission


@dataclass
class ServedModel:
    manifest: Manifest
    engine: TextEngine
    scheduler: ModelScheduler


@dataclass
class ModelPool:
    settings: Settings
    served: dict[str, ServedModel] = field(default_factory=dict)
    tensors: dict[str, ServedTensorModel] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)  # name -> reason
    manifests: dict[str, Manifest] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)  # not tied to one model

    @property
    def ready(self) -> bool:
        return bool(self.served or self.tensors) and not self.refused and not self.problems

    def state(self) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        for name, manifest in sorted(self.manifests.items()):
            row: dict[str, Any] = {"name": name, "format": manifest.format}
            if name in self.served:
                served = self.served[name]
                row.update(state="serving", **served.scheduler.snapshot())
                if "kernels" in served.engine.info.extra:
                    row["kernels"] = served.engine.info.extra["kernels"]
            elif name in self.tensors:
                row.update(state="serving", **self.tensors[name].admission.snapshot())
            else:
                row.update(state="refused", reason=self.refused.get(name, "not loaded"))
            rows.append(row)
        return rows

    def close(self) -> None:
        for model in self.served.values():
            model.scheduler.stop()
            model.engine.close()
        self.served.clear()
        for tensor in self.tensors.values():
            tensor.engine.close()
        self.tensors.clear()


def _kernel_path(settings: Settings, manifest: Manifest, path: Path) -> tuple[bool, dict[str, Any]]:
    """Choose the kernels (once per process), then let a child process decode with
    them before this one does: whether the model loads with extra buffer types."""
    from appliance.engines import kernels, selftest

    plan = kernels.plan(settings.cpu_kernels)
    outcome, attempts = selftest.check(
        path, settings.cpu_kernels, plan.extra_buffers, settings.gpu_layers
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


def _load_engine(
    settings: Settings, manifest: Manifest, verification: Verification
) -> TextEngine | OnnxEngine:
    path = settings.models_path / manifest.file
    engine: TextEngine | OnnxEngine
    if manifest.format == "onnx":
        engine = OnnxEngine(path, settings.onnx_threads)
    else:
        extra_buffers, kernels_row = _kernel_path(settings, manifest, path)
        from appliance.engines.llama import LlamaEngine

        engine = LlamaEngine(
            path,
            context_size=settings.context_size,
            threads=settings.threads,
            gpu_layers=settings.gpu_layers,
            model_context=manifest.context_length,
            parallel=settings.parallel_streams,
            kv_type=settings.kv_cache_type,
            extra_buffers=extra_buffers,
        )
        engine.info.extra["kernels"] = kernels_row
    # The file must be the one that was hashed, not one swapped in since.
    if file_identity(path) != verification.identity:
        engine.close()
        raise RuntimeError(f"{path} changed between verification and loading")
    return engine


def open_pool(settings: Settings) -> ModelPool:
    pool = ModelPool(settings)
    try:
        pool.manifests = load_manifests(settings, pool.problems)
    except ManifestError as exc:
        pool.problems.append(str(exc))
        log.error("manifests refused", extra={"reason": str(exc)})
        return pool
    for problem in pool.problems:  # bad imported manifests, left out
        log.error("manifest refused", extra={"reason": problem})
    budget = MemoryBudget(settings)
    for verification in verify_all(settings, pool.manifests.values()):
        manifest = pool.manifests[verification.name]
        if not verification.ok:
            pool.refused[manifest.name] = verification.message
            log.error(verification.message, extra={"model": manifest.name})
            continue
        path = settings.models_path / manifest.file
        too_big = budget.admit(manifest.name, footprint(manifest, path, settings))
        if too_big is not None:
            pool.refused[manifest.name] = too_big
            log.error(too_big, extra={"model": manifest.name})
            continue
        try:
            engine = _load_engine(settings, manifest, verification)
        except Exception as exc:  # a file that verifies may still fail to load
            pool.refused[manifest.name] = f"model {manifest.name!r} failed to load: {exc}"
            log.error(pool.refused[manifest.name], extra={"model": manifest.name})
            continue
        if isinstance(engine, OnnxEngine):
            slots = psutil.cpu_count(logical=False) or 1
            admission = Admission(manifest.name, slots, settings.queue_depth)
            pool.tensors[manifest.name] = ServedTensorModel(manifest, engine, admission)
            log.info("model loaded", extra={"model": manifest.name, "format": "onnx"})
            continue
        scheduler = ModelScheduler(manifest.name, engine, settings.queue_depth)
        scheduler.start()
        pool.served[manifest.name] = ServedModel(manifest, engine, scheduler)
        log.info(
            "model loaded",
            extra={
                "model": manifest.name,
                "n_ctx": engine.info.n_ctx,
                "parallel_streams": engine.free_slots(),
                "threads": engine.info.threads,
                "cached_hash": verification.cached,
                **engine.info.extra,
            },
        )
    return pool


def init_app(app: Flask, settings: Settings) -> ModelPool:
    pool = open_pool(settings)
    app.extensions[EXTENSION] = pool
    return pool


def get_pool(app: Flask) -> ModelPool:
    pool: ModelPool = app.extensions[EXTENSION]
    return pool
