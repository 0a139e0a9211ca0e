"""A model as the pool holds it once loaded, one type per kind: its manifest, its
engine, and the bound on the requests it runs at once."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from appliance.engines.base import TextEngine
from appliance.registry import Manifest
from appliance.serving.scheduler import Admission, ModelScheduler

log = logging.getLogger(__name__)
STOP_SECONDS = 60.0  # a step reads at most 512 prompt tokens: seconds, not minutes


@dataclass
class ChatModel:
    """A language model: one worker thread runs its batch (see scheduler.py)."""

    manifest: Manifest
    engine: TextEngine
    scheduler: ModelScheduler

    def snapshot(self) -> dict[str, Any]:
        row: dict[str, Any] = dict(self.scheduler.snapshot())
        row["n_ctx"] = self.engine.info.n_ctx
        if "kernels" in self.engine.info.extra:
            row["kernels"] = self.engine.info.extra["kernels"]
        if "placement" in self.engine.info.extra:
            row["placement"] = self.engine.info.extra["placement"]
        return row

    def stalled(self, limit: float) -> str | None:
        return self.scheduler.stalled(limit)

    def close(self) -> bool:
        """Stop the worker, then free the engine; never under a step still running (a
        long prompt read in llama_decode): then the engine is left, not freed, and
        False says so (a specialist's base must then stay too)."""
        self.scheduler.stop(timeout=STOP_SECONDS)
        if self.scheduler.running():
            log.error(
                "model worker still busy after stopping; its engine is not freed",
                extra={"model": self.manifest.name, "waited_s": STOP_SECONDS},
            )
            return False
        self.engine.close()
        return True


@dataclass
class RunModel:
    """A model whose runs may overlap (onnxruntime sessions): a tensor model, or an
    embedding model. ``engine`` is an OnnxEngine or an EmbeddingEngine."""

    manifest: Manifest
    engine: Any
    admission: Admission

    def snapshot(self) -> dict[str, Any]:
        return dict(self.admission.snapshot())

    def stalled(self, limit: float) -> str | None:
        return None

    def close(self) -> bool:
        self.engine.close()
        return True


Loaded = ChatModel | RunModel
