"""The machine's resources (psutil): how much memory a model will take, whether it may
be loaded, and whether the box is under memory pressure right now."""

from __future__ import annotations

from pathlib import Path

import psutil

from appliance import gguf
from appliance.config import Settings
from appliance.registry import Manifest

MIB = 1 << 20


def footprint(manifest: Manifest, path: Path, settings: Settings) -> int:
    """Expected resident bytes: weights, plus the KV cache and work buffers for a
    language model; weights and activations for a tensor model."""
    size = path.stat().st_size
    if manifest.format != "gguf":
        return 2 * size + 16 * MIB
    info = gguf.read_info(path)
    n_ctx = min(settings.context_size, manifest.context_length or settings.context_size)
    kv = 0
    if info.layers and info.embedding and info.heads:
        kv_dim = info.embedding * (info.kv_heads or info.heads) // info.heads
        cells = n_ctx * settings.parallel_streams
        kv = cells * info.layers * kv_dim * 2 * 2  # K and V, f16
    return int(size * 1.1) + kv + 64 * MIB


def available() -> int:
    return int(psutil.virtual_memory().available)


class MemoryBudget:
    """What may still be loaded: the machine's free memory less the reserve, and no
    more than memory_limit_mb in all."""

    def __init__(self, settings: Settings) -> None:
        self.reserve = settings.memory_reserve_mb * MIB
        self.limit = settings.memory_limit_mb * MIB or None
        self.used = 0

    def admit(self, name: str, need: int) -> str | None:
        """None if the model fits (and is counted), else why not."""
        free = available() - self.reserve
        if self.limit is not None:
            free = min(free, self.limit - self.used)
        if need > free:
            limit = f", memory_limit_mb {self.limit // MIB}" if self.limit else ""
            return (
                f"model {name!r} refused: it needs about {need // MIB} MiB and "
                f"{max(free, 0) // MIB} MiB may be used (available "
                f"{available() // MIB} MiB less reserve {self.reserve // MIB} MiB{limit})"
            )
        self.used += need
        return None


def pressure(settings: Settings) -> str | None:
    """Why new requests must wait, when the machine is below its memory reserve."""
    free = available()
    reserve = settings.memory_reserve_mb * MIB
    if free < reserve:
        return (
            f"the appliance is short of memory: {free // MIB} MiB available, "
            f"{reserve // MIB} MiB must stay free (memory_reserve_mb); retry shortly"
        )
    return None
