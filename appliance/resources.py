"""The machine's resources (psutil): how much memory a model will take, whether it may
be loaded, and whether the box is under memory pressure right now."""

from __future__ import annotations

import os
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
        per_value = 2.0 if settings.kv_cache_type == "f16" else 34 / 32  # q8_0 blocks
        kv = int(cells * info.layers * kv_dim * 2 * per_value)  # K and V
    return int(size * 1.1) + kv + 64 * MIB


_MEMINFO = "/proc/meminfo"
_meminfo_fd: int | None = None


def _mem_available() -> int | None:
    """MemAvailable from /proc/meminfo, read through a descriptor kept open: what
    psutil reports as available, at a fifth of its cost (every request asks)."""
    global _meminfo_fd
    try:
        if _meminfo_fd is None:
            _meminfo_fd = os.open(_MEMINFO, os.O_RDONLY | os.O_CLOEXEC)
        data = os.pread(_meminfo_fd, 8192, 0)
    except OSError:
        return None
    start = data.find(b"MemAvailable:")
    if start < 0:
        return None
    fields = data[start : data.find(b"\n", start)].split()
    kib = int(fields[1]) if len(fields) >= 2 and fields[1].isdigit() else 0
    return kib * 1024 or None  # 0 happens (a kernel bug): psutil estimates it then


def available() -> int:
    fast = _mem_available()
    return fast if fast is not None else int(psutil.virtual_memory().available)


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
