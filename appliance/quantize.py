"""Requantize a GGUF with llama.cpp's own quantizers: e.g. the shipped Q4_1 default into
a format whose CPU kernels batch well (README, "The default model's format"). It runs in
llama.cpp's base library, not in the CPU kernel variants, so a pinned llama.cpp gives
the same bytes on every machine, and the result's SHA-256 can be pinned too.

Two ways:

- a llama.cpp file type (``FORMATS``) through ``llama_model_quantize``, as
  ``llama-quantize --allow-requantize`` does;
- a *mix* (``MIXES``): a format per tensor role, each tensor quantized by llama.cpp's
  ``ggml_quantize_chunk`` and the file written here (metadata copied byte for byte,
  plus ``appliance.quantization`` naming the mix). llama.cpp's own per-tensor choice
  is not reachable through its C API from Python, and its file types fall back from
  the K formats on SmolLM2's 576-wide rows.

Why a mix for the default model: on x86, llama.cpp batches several streams well only
where it has GEMM kernels (repacked Q4_0/IQ4_NL/Q4_K, llamafile's Q8_0/Q5_0/Q4_0). The
shipped file is already 4-bit (Q4_1), so every 4-bit format quantizes it a second time
and costs 6-18 % perplexity; Q8_0 keeps it (+0.4 %) but batches little better than Q4_1.
``Q5_MIX`` puts the layers' matrices in Q5_0 (llamafile's GEMM batches it), each
block's scale chosen with an importance matrix, and keeps attention's k and v and the
embeddings (also the output matrix), which cost most perplexity when requantized, in
Q8_0. Both kernels give a request the same numbers alone or batched, which the
repacked formats (Q4_K here) do not. bench/formats.py measures it against the others.
"""

from __future__ import annotations

import ctypes
import math
import mmap
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from appliance.gguf import MIX_KEY, read_directory

if TYPE_CHECKING:
    import numpy as np

FORMATS = {
    "Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
    "Q4_1": "LLAMA_FTYPE_MOSTLY_Q4_1",
    "Q5_0": "LLAMA_FTYPE_MOSTLY_Q5_0",
    "Q5_1": "LLAMA_FTYPE_MOSTLY_Q5_1",
    "Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
    "IQ4_NL": "LLAMA_FTYPE_MOSTLY_IQ4_NL",
    "Q4_K_S": "LLAMA_FTYPE_MOSTLY_Q4_K_S",
    "Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "Q5_K_M": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "Q6_K": "LLAMA_FTYPE_MOSTLY_Q6_K",
}


@dataclass(frozen=True)
class Mix:
    """A format for each tensor role (``attn_q``, ``ffn_up``, ``token_embd``: a tensor's
    name without its block number and ``.weight``); float tensors (norms) stay as they
    are. ``weighted``: roles quantized with an importance matrix (appliance/importance.py:
    how much each column's activations weigh), which llama.cpp's quantizers use to
    choose each block's scale; the model's manifest supplies it."""

    roles: dict[str, str]
    default: str
    file_type: str  # llama.cpp's LLAMA_FTYPE for general.file_type: the mix's main format
    weighted: frozenset[str] = field(default_factory=frozenset)

    def format_of(self, role: str) -> str:
        return self.roles.get(role, self.default)


_LAYERS_Q5 = ("attn_q", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
MIXES = {
    # Every matrix of the layers in Q5_0 but attention's k and v, weighted by an importance
    # matrix; attention's k and v and the embeddings in Q8_0.
    "Q5_MIX": Mix(
        roles=dict.fromkeys(_LAYERS_Q5, "Q5_0"),
        default="Q8_0",
        file_type="LLAMA_FTYPE_MOSTLY_Q5_0",
        weighted=frozenset(_LAYERS_Q5),
    ),
}

# "+E8": the token embeddings (and the output matrix, which SmolLM2 ties to them) stay
# Q8_0, as the shipped file has them; only the layers take the named format.
KEEP_EMBEDDINGS = "+E8"
_F32, _STRING, _UINT32 = 0, 8, 4


class QuantizeError(RuntimeError):
    """llama.cpp refused to quantize; the message names the files and the format."""


def check_format(fmt: str) -> None:
    """Raise QuantizeError unless ``fmt`` is a format or mix this module makes."""
    if fmt not in MIXES and fmt.removesuffix(KEEP_EMBEDDINGS) not in FORMATS:
        raise QuantizeError(
            f"format {fmt!r} is not one of {', '.join([*FORMATS, *MIXES])} (each of the "
            f"llama.cpp formats may end in {KEEP_EMBEDDINGS}: embeddings kept in Q8_0)"
        )


def requantize(
    source: Path,
    target: Path,
    fmt: str,
    threads: int = 0,
    importance: Mapping[str, np.ndarray] | None = None,
) -> Path:
    """``importance``: per tensor name, the importance matrix a mix's weighted roles
    need (appliance/importance.py)."""
    check_format(fmt)
    if fmt in MIXES:
        return requantize_mix(source, target, fmt, importance or {})
    base = fmt.removesuffix(KEEP_EMBEDDINGS)
    import llama_cpp

    from appliance.engines import kernels

    kernels.plan()  # llama.cpp needs its CPU backend loaded, whichever variant
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, FORMATS[base])
    if fmt.endswith(KEEP_EMBEDDINGS):
        params.token_embedding_type = params.output_tensor_type = llama_cpp.GGML_TYPE_Q8_0
    params.allow_requantize = True
    params.nthread = threads
    status = llama_cpp.llama_model_quantize(
        str(source).encode(), str(target).encode(), ctypes.byref(params)
    )
    if status != 0 or not target.is_file():
        raise QuantizeError(f"llama.cpp could not quantize {source} to {fmt} (status {status})")
    return target


def role(tensor: str) -> str:
    """``blk.7.ffn_up.weight`` -> ``ffn_up``; ``token_embd.weight`` -> ``token_embd``."""
    parts = tensor.removesuffix(".weight").split(".")
    return parts[2] if parts[0] == "blk" and len(parts) > 2 else ".".join(parts)


def _string(text: str) -> bytes:
    data = text.encode()
    return struct.pack("<Q", len(data)) + data


def _quantizer() -> ctypes.CDLL:
    """libggml-base, as libllama loaded it (its quantizers are plain C, the same on
    every CPU)."""
    from appliance.engines import kernels

    kernels.plan()
    lib = ctypes.CDLL(str(kernels.loaded_library("libggml-base.so")))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [
        ctypes.c_int,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_void_p,
    ]
    return lib


def requantize_mix(
    source: Path, target: Path, name: str, importance: Mapping[str, np.ndarray]
) -> Path:
    """Write ``target``: ``source`` with each tensor in the format ``MIXES[name]`` gives
    its role. Checked before anything is written: every format must divide the rows,
    and every weighted tensor must have its importance, one number a column."""
    import llama_cpp
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    mix = MIXES[name]
    directory = read_directory(source)
    alignment = int(directory.meta.get("general.alignment", 32))

    def aligned(n: int) -> int:
        return -(-n // alignment) * alignment

    def nbytes(ne: list[int], ggml_type: int) -> int:
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
        return math.prod(ne) // block * size

    plan: list[tuple[str, list[int], int, int, int]] = []  # name, ne, from, to, offset
    offset = 0
    for tensor, ne, ggml_type, _ in directory.tensors:
        new = ggml_type
        if ggml_type != _F32:
            fmt = mix.format_of(role(tensor))
            new = int(GGMLQuantizationType[fmt])
            block = GGML_QUANT_SIZES[GGMLQuantizationType(new)][0]
            if ne[0] % block:
                raise QuantizeError(
                    f"{name}: {tensor} has rows of {ne[0]} values; {fmt} needs a "
                    f"multiple of {block}"
                )
            if role(tensor) in mix.weighted:
                weights = importance.get(tensor)
                if weights is None or weights.shape != (ne[0],):
                    found = "none" if weights is None else f"shape {weights.shape}"
                    raise QuantizeError(
                        f"{name}: {tensor} needs its importance, {ne[0]} numbers; "
                        f"the importance matrix has {found}"
                    )
        plan.append((tensor, ne, ggml_type, new, offset))
        offset = aligned(offset + nbytes(ne, new))

    # The metadata as the source has it, but for the file type and the mix's name.
    file_type = getattr(llama_cpp, mix.file_type)
    with source.open("rb") as fh:
        raw = fh.read(directory.end)
    entries = [
        raw[start:end]
        for key, (start, end) in directory.spans.items()
        if key not in ("general.file_type", MIX_KEY)
    ]
    entries.append(_string("general.file_type") + struct.pack("<II", _UINT32, file_type))
    entries.append(_string(MIX_KEY) + struct.pack("<I", _STRING) + _string(name))
    header = bytearray(raw[:8] + struct.pack("<QQ", len(plan), len(entries)))
    header += b"".join(entries)
    for tensor, ne, _, new, offset in plan:
        header += _string(tensor) + struct.pack(f"<I{len(ne)}QIQ", len(ne), *ne, new, offset)
    header += bytes(aligned(len(header)) - len(header))

    lib = _quantizer()
    data_start = aligned(directory.end)
    tmp = target.with_name(target.name + ".part")
    try:
        with (
            source.open("rb") as fh,
            mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as src,
            tmp.open("wb") as out,
        ):
            out.write(header)
            for (tensor, ne, old, new, _), (_, _, _, at) in zip(
                plan, directory.tensors, strict=True
            ):
                start = data_start + at
                data = src[start : start + nbytes(ne, old)]
                if new != old:
                    weights = importance[tensor] if role(tensor) in mix.weighted else None
                    data = _quantize(lib, data, ne, old, new, weights)
                out.write(data)
                out.write(bytes(aligned(len(data)) - len(data)))
        tmp.replace(target)
    except BaseException:
        tmp.unlink(missing_ok=True)  # nothing half written is left behind
        raise
    return target


def _quantize(
    lib: ctypes.CDLL, data: bytes, ne: list[int], old: int, new: int, weights: np.ndarray | None
) -> bytes:
    """One tensor's bytes from format ``old`` to ``new``, through float32."""
    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import dequantize

    rows, per_row = math.prod(ne[1:]), ne[0]
    packed = np.frombuffer(data, dtype=np.uint8).reshape(rows, -1)
    values = np.ascontiguousarray(
        dequantize(packed, GGMLQuantizationType(old)), dtype=np.float32
    ).reshape(rows, per_row)
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType(new)]
    out = np.zeros(rows * per_row // block * size, dtype=np.uint8)
    if weights is not None:
        weights = np.ascontiguousarray(weights, dtype=np.float32)
    written = lib.ggml_quantize_chunk(
        new,
        values.ctypes.data,
        out.ctypes.data,
        0,
        rows,
        per_row,
        None if weights is None else weights.ctypes.data,
    )
    if written != out.nbytes:
        raise QuantizeError(f"llama.cpp wrote {written} bytes for a tensor of {out.nbytes}")
    return out.tobytes()
