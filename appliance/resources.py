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


def footprint(
    manifest: Manifest,
    path: Path,
    context_size: int,
    parallel_streams: int,
    settings: Settings,
    weights: bool = True,
) -> int:
    """Expected resident bytes: weights, plus the KV cache and work buffers for a
    language model; weights and activations for an ONNX model. A missing file: the size
    its manifest gives. ``weights=False``: a context of its own over weights another
    engine holds (a specialist over its base)."""
    size = path.stat().st_size if path.is_file() else (manifest.size_bytes or 0)
    if manifest.format != "gguf":
        if manifest.quantization == "int8":
            # int8 weights that onnxruntime widens to fp32 when it builds the session:
            # all-MiniLM-L6-v2's 22 MiB file took 172 MiB of RSS (bench/garden.py).
            return 8 * size + 16 * MIB
        return 2 * size + 16 * MIB
    try:
        info = gguf.read_info(path)
    except (OSError, gguf.GGUFError):
        return int(size * 1.1) + 64 * MIB
    n_ctx = min(context_size, manifest.context_length or context_size)
    kv = 0
    if info.layers and info.embedding and info.heads:
        kv_dim = info.embedding * (info.kv_heads or info.heads) // info.heads
        cells = n_ctx * parallel_streams
        per_value = 2.0 if settings.kv_cache_type == "f16" else 34 / 32  # q8_0 blocks
        kv = int(cells * info.layers * kv_dim * 2 * per_value)  # K and V
    return (int(size * 1.1) if weights else 0) + kv + 64 * MIB


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
