"""The models this process serves: every manifest verified, every verified language
model loaded behind its scheduler. A refused model is kept with its reason so that
readiness and the API can say why; the others serve regardless."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from flask import Flask

from appliance.config import Settings
from appliance.engines.base import TextEngine
from appliance.registry import (
    Manifest,
    ManifestError,
    Verification,
    file_identity,
    load_manifests,
    verify_all,
)
from appliance.scheduler import ModelScheduler

log = logging.getLogger(__name__)
EXTENSION = "appliance.models"


@dataclass
class ServedModel:
    manifest: Manifest
    engine: TextEngine
    scheduler: ModelScheduler


@dataclass
class ModelPool:
    settings: Settings
    served: dict[str, ServedModel] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)  # name -> reason
    manifests: dict[str, Manifest] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)  # not tied to one model

    @property
    def ready(self) -> bool:
        return bool(self.served) and not self.refused and not self.problems

    def state(self) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        for name, manifest in sorted(self.manifests.items()):
            row: dict[str, Any] = {"name": name, "format": manifest.format}
            if name in self.served:
                row.update(state="serving", **self.served[name].scheduler.snapshot())
            else:
                row.update(state="refused", reason=self.refused.get(name, "not loaded"))
            rows.append(row)
        return rows

    def close(self) -> None:
        for model in self.served.values():
            model.scheduler.stop()
            model.engine.close()
        self.served.clear()


def _load_engine(settings: Settings, manifest: Manifest, verification: Verification) -> TextEngine:
    from appliance.engines.llama import LlamaEngine

    path = settings.models_path / manifest.file
    engine = LlamaEngine(
        path,
        context_size=settings.context_size,
        threads=settings.threads,
        gpu_layers=settings.gpu_layers,
        model_context=manifest.context_length,
    )
    # The file must be the one that was hashed, not one swapped in since.
    if file_identity(path) != verification.identity:
        engine.close()
        raise RuntimeError(f"{path} changed between verification and loading")
    return engine


def open_pool(settings: Settings) -> ModelPool:
    pool = ModelPool(settings)
    try:
        pool.manifests = load_manifests(settings)
    except ManifestError as exc:
        pool.problems.append(str(exc))
        log.error("manifests refused", extra={"reason": str(exc)})
        return pool
    for verification in verify_all(settings, pool.manifests.values()):
        manifest = pool.manifests[verification.name]
        if not verification.ok:
            pool.refused[manifest.name] = verification.message
            log.error(verification.message, extra={"model": manifest.name})
            continue
        if manifest.format != "gguf":
            pool.refused[manifest.name] = (
                f"model {manifest.name!r}: format {manifest.format} is not served yet"
            )
            continue
        try:
            engine = _load_engine(settings, manifest, verification)
        except Exception as exc:  # a file that verifies may still fail to load
            pool.refused[manifest.name] = f"model {manifest.name!r} failed to load: {exc}"
            log.error(pool.refused[manifest.name], extra={"model": manifest.name})
            continue
        scheduler = ModelScheduler(manifest.name, engine, settings.queue_depth)
        scheduler.start()
        pool.served[manifest.name] = ServedModel(manifest, engine, scheduler)
        log.info(
            "model loaded",
            extra={
                "model": manifest.name,
                "n_ctx": engine.info.n_ctx,
                "threads": engine.info.threads,
                "cached_hash": verification.cached,
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
