"""Reads a GGUF file's header: the facts a manifest records (architecture, context
length, quantization, parameter count) without loading the model.

Only the header is read, with every length bounded, so an imported file that is not
what it claims gives a clear error rather than a huge allocation.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

MAGIC = b"GGUF"
MIX_KEY = "appliance.quantization"  # written by appliance/quantize.py for its mixes
_MAX_STRING = 1 << 24
_MAX_COUNT = 1 << 24
_MAX_DIMS = 8

# llama.cpp's LLAMA_FTYPE values, as written in general.file_type.
FILE_TYPES = {
    0: "F32",
    1: "F16",
    2: "Q4_0",
    3: "Q4_1",
    7: "Q8_0",
    8: "Q5_0",
    9: "Q5_1",
    10: "Q2_K",
    11: "Q3_K_S",
    12: "Q3_K_M",
    13: "Q3_K_L",
    14: "Q4_K_S",
    15: "Q4_K_M",
    16: "Q5_K_S",
    17: "Q5_K_M",
    18: "Q6_K",
    19: "IQ2_XXS",
    20: "IQ2_XS",
    21: "Q2_K_S",
    22: "IQ3_XS",
    23: "IQ3_XXS",
    24: "IQ1_S",
    25: "IQ4_NL",
    26: "IQ3_S",
    27: "IQ3_M",
    28: "IQ2_S",
    29: "IQ2_M",
    30: "IQ4_XS",
    31: "IQ1_M",
    32: "BF16",
}

_SCALARS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_STRING, _ARRAY = 8, 9


class GGUFError(ValueError):
    """The file is not a GGUF file this reader understands."""


@dataclass(frozen=True)
class GGUFInfo:
    architecture: str | None
    name: str | None
    license: str | None
    context_length: int | None
    quantization: str | None
    parameters: int
    layers: int | None = None
    embedding: int | None = None
    heads: int | None = None
    kv_heads: int | None = None


class _Reader:
    def __init__(self, fh: IO[bytes]) -> None:
        self.fh = fh

    def take(self, n: int) -> bytes:
        data = self.fh.read(n)
        if len(data) != n:
            raise GGUFError("file ends inside its header")
        return data

    def unpack(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def count(self, what: str) -> int:
        n = int(self.unpack("<Q"))
        if n > _MAX_COUNT:
            raise GGUFError(f"{what} count {n} is larger than {_MAX_COUNT}")
        return n

    def string(self) -> str:
        n = int(self.unpack("<Q"))
        if n > _MAX_STRING:
            raise GGUFError(f"string of {n} bytes is larger than {_MAX_STRING}")
        return self.take(n).decode("utf-8", errors="replace")

    def value(self, kind: int, keep: bool) -> Any:
        if kind in _SCALARS:
            return self.unpack(_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item_kind = int(self.unpack("<I"))
            n = self.count("array")
            if item_kind in _SCALARS and not keep:
                self.take(n * struct.calcsize(_SCALARS[item_kind]))
                return None
            items = [self.value(item_kind, keep) for _ in range(n)]
            return items if keep else None
        raise GGUFError(f"unknown value type {kind}")


@dataclass(frozen=True)
class Directory:
    """A GGUF header as stored: metadata (scalars and strings; arrays skipped) and the
    tensor directory, each tensor's name, ne (ggml's order), type and data offset;
    ``end``: where the header ends (the data starts at the next alignment)."""

    meta: dict[str, Any]
    tensors: list[tuple[str, list[int], int, int]]
    end: int
    # Each metadata entry's bytes in the file (key, type and value): a writer can copy
    # the entries it keeps as they are.
    spans: dict[str, tuple[int, int]] = field(default_factory=dict)


def read_directory(path: Path) -> Directory:
    """The header of a GGUF file, every length bounded."""
    with path.open("rb") as fh:
        reader = _Reader(fh)
        if reader.take(4) != MAGIC:
            raise GGUFError(f"{path} is not a GGUF file (no GGUF magic)")
        version = int(reader.unpack("<I"))
        if version < 2:
            raise GGUFError(f"{path}: GGUF version {version} is too old")
        n_tensors = reader.count("tensor")
        n_kv = reader.count("metadata")
        meta: dict[str, Any] = {}
        spans: dict[str, tuple[int, int]] = {}
        for _ in range(n_kv):
            start = fh.tell()
            key = reader.string()
            kind = int(reader.unpack("<I"))
            meta[key] = reader.value(kind, keep=kind != _ARRAY)
            spans[key] = (start, fh.tell())
        tensors = []
        for _ in range(n_tensors):
            name = reader.string()
            n_dims = int(reader.unpack("<I"))
            if n_dims > _MAX_DIMS:
                raise GGUFError(f"{path}: tensor {name} has {n_dims} dimensions")
            ne = [int(reader.unpack("<Q")) for _ in range(n_dims)]
            ggml_type = int(reader.unpack("<I"))
            tensors.append((name, ne, ggml_type, int(reader.unpack("<Q"))))
        return Directory(meta, tensors, fh.tell(), spans)


def read_info(path: Path) -> GGUFInfo:
    directory = read_directory(path)
    meta = directory.meta
    parameters = sum(math.prod(ne) for _, ne, _, _ in directory.tensors)
    arch = meta.get("general.architecture")
    ctx = meta.get(f"{arch}.context_length") if arch else None

    def number(key: str) -> int | None:
        value = meta.get(f"{arch}.{key}") if arch else None
        return int(value) if isinstance(value, int) else None

    file_type = meta.get("general.file_type")
    # A per-tensor mix (appliance/quantize.py) names itself; llama.cpp's file type can
    # only say which format most of it is in.
    mix = meta.get(MIX_KEY)
    return GGUFInfo(
        architecture=arch,
        name=meta.get("general.name"),
        license=meta.get("general.license"),
        context_length=int(ctx) if isinstance(ctx, int) else None,
        quantization=mix
        if isinstance(mix, str)
        else FILE_TYPES.get(file_type)
        if isinstance(file_type, int)
        else None,
        parameters=parameters,
        layers=number("block_count"),
        embedding=number("embedding_length"),
        heads=number("attention.head_count"),
        kv_heads=number("attention.head_count_kv"),
    )
