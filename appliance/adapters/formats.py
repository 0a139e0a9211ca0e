"""Reading what an adapter is checked against: a GGUF file's header and tensors (the
adapter's, or the base model's), the base model's shapes, and the checks a LoRA
adapter's pairs of lora_a/lora_b tensors must pass whichever format they come in."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from appliance.gguf import GGUFError, read_directory

Array = npt.NDArray[Any]

# What each base dimension is called, for messages: the input (columns) and output (rows)
# of each projection's weight, as numpy holds it ((out, in); ggml's ne reversed).
IN_SIZE = {"ffn_down": "n_ff"}
OUT_SIZE = {
    "attn_q": "n_head*head_dim",
    "attn_k": "n_head_kv*head_dim",
    "attn_v": "n_head_kv*head_dim",
    "attn_output": "n_embd",
    "ffn_gate": "n_ff",
    "ffn_up": "n_ff",
    "ffn_down": "n_embd",
}

# GGML tensor types an adapter may carry (what llama.cpp's converter writes).
F32, F16, Q8_0, BF16 = 0, 1, 8, 30
TYPE_NAMES = {F32: "F32", F16: "F16", Q8_0: "Q8_0", BF16: "BF16"}
FILE_TYPE = {F32: 0, F16: 1}  # LLAMA_FTYPE ALL_F32 and MOSTLY_F16, for general.file_type


class AdapterRefused(ValueError):
    """An adapter (or a specialist made of adapters) cannot be installed; the message
    says why and names the file or tensor, the expected and the actual value."""


# -- GGUF headers ---------------------------------------------------------------------


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # numpy order: ggml's ne reversed
    ggml_type: int
    offset: int  # from the start of the file
    nbytes: int


@dataclass(frozen=True)
class GGUFHeader:
    meta: dict[str, Any]  # scalars and strings; arrays are skipped
    tensors: dict[str, TensorInfo]
    size: int


def read_header(path: Path) -> GGUFHeader:
    """Metadata and tensor directory of a GGUF file, every length bounded. The gguf
    package's GGUFReader would do, but it takes 2 s over the base model's 49,152-token
    vocabulary, which this reader skips (85 ms)."""
    import gguf

    directory = read_directory(path)
    meta, end = directory.meta, directory.end
    raw = directory.tensors
    for name, ne, _, _ in raw:
        if len(ne) > 4:  # ggml's own limit: llama.cpp would refuse the file
            raise GGUFError(f"{path}: tensor {name} has {len(ne)} dimensions")
    alignment = meta.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment < 1:
        raise GGUFError(f"{path}: general.alignment {alignment!r} is not a positive integer")
    data_start = -(-end // alignment) * alignment
    tensors: dict[str, TensorInfo] = {}
    for name, ne, ggml_type, offset in raw:
        if name in tensors:  # llama.cpp refuses a file that names a tensor twice, too
            raise GGUFError(f"{path}: tensor {name} is named twice")
        try:
            block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ggml_type)]
        except (ValueError, KeyError):
            raise GGUFError(f"{path}: tensor {name} has unknown type {ggml_type}") from None
        count = math.prod(ne)
        if ne and ne[0] % block:
            raise GGUFError(f"{path}: tensor {name} rows of {ne[0]} are not whole blocks")
        tensors[name] = TensorInfo(
            name, tuple(reversed(ne)), ggml_type, data_start + offset, count // block * type_size
        )
    return GGUFHeader(meta, tensors, path.stat().st_size)


@dataclass(frozen=True)
class BaseShapes:
    """The base model's shapes: every 2-D weight's (out, in), which is what llama.cpp
    checks an adapter's tensors against, and its heads for the Q/K reordering."""

    path: Path
    architecture: str
    layers: int
    n_head: int
    n_head_kv: int
    weights: dict[str, tuple[int, ...]]

    def describe(self, kind: str) -> tuple[str, str]:
        return IN_SIZE.get(kind, "n_embd"), OUT_SIZE.get(kind, "out")


def read_base_shapes(base: Path) -> BaseShapes:
    try:
        header = read_header(base)
    except (GGUFError, OSError) as exc:
        raise AdapterRefused(f"base model {base}: {exc}") from None
    kind = header.meta.get("general.type", "model")
    if kind != "model":
        raise AdapterRefused(f"base {base} is not a model: general.type is {kind!r}")
    arch = header.meta.get("general.architecture")
    if not isinstance(arch, str):
        raise AdapterRefused(f"base model {base} has no general.architecture")

    def number(key: str, default: int | None = None) -> int:
        value = header.meta.get(f"{arch}.{key}", default)
        if not isinstance(value, int) or value < 1:
            raise AdapterRefused(f"base model {base}: {arch}.{key} is {value!r}")
        return value

    n_head = number("attention.head_count")
    return BaseShapes(
        path=base,
        architecture=arch,
        layers=number("block_count"),
        n_head=n_head,
        n_head_kv=number("attention.head_count_kv", n_head),
        weights={t.name: t.shape for t in header.tensors.values() if len(t.shape) == 2},
    )


# -- the checks both formats share ---------------------------------------------------------


@dataclass(frozen=True)
class LoraPair:
    """One projection's update: lora_a (rank, in) and lora_b (out, rank), as numpy
    holds them, named for messages as the source file names them."""

    layer: int
    kind: str  # the GGUF name: attn_q, ffn_down, ...
    a: Array | None
    b: Array | None
    a_name: str
    b_name: str

    @property
    def target(self) -> str:
        return f"blk.{self.layer}.{self.kind}.weight"


def add_half(
    pairs: dict[tuple[int, str], LoraPair],
    layer: int,
    kind: str,
    is_a: bool,
    values: Array,
    names: tuple[str, str],
) -> None:
    """Put lora_a or lora_b of a projection into ``pairs`` (named as its file names
    them), whichever of the two comes first."""
    pair = pairs.get((layer, kind)) or LoraPair(layer, kind, None, None, *names)
    pairs[(layer, kind)] = replace(pair, a=values) if is_a else replace(pair, b=values)


def check_pairs(
    pairs: list[LoraPair], base: BaseShapes, rank: int | None, rank_from: str, source: Path
) -> int:
    """Every pair complete and fitting its base tensor, all of one rank (``rank`` if
    given); the rank. ``rank_from`` says where an expected rank comes from."""
    if not pairs:
        raise AdapterRefused(f"{source} holds no LoRA tensors")
    for pair in pairs:
        if pair.a is None or pair.b is None:
            missing, present = (
                (pair.a_name, pair.b_name) if pair.a is None else (pair.b_name, pair.a_name)
            )
            raise AdapterRefused(f"{source}: tensor {missing} is missing ({present} is there)")
        if pair.layer >= base.layers:
            raise AdapterRefused(
                f"{source}: tensor {pair.a_name} is for layer {pair.layer}; the base "
                f"{base.path.name} has {base.layers} layers (0 to {base.layers - 1})"
            )
        want = base.weights.get(pair.target)
        if want is None:
            raise AdapterRefused(
                f"{source}: tensor {pair.a_name} adapts {pair.target}, which the base "
                f"{base.path.name} ({base.architecture}) does not have"
            )
        out, inp = want
        in_label, out_label = base.describe(pair.kind)
        for name, array, what in ((pair.a_name, pair.a, "lora_A"), (pair.b_name, pair.b, "lora_B")):
            if array.ndim != 2:
                raise AdapterRefused(
                    f"{source}: tensor {name} ({what}) must have 2 dimensions, got shape "
                    f"{tuple(array.shape)}"
                )
        got = rank if rank is not None else int(pair.a.shape[0])
        checks = (
            (pair.a_name, pair.a.shape, (got, inp), f"rank, the base's {in_label}"),
            (pair.b_name, pair.b.shape, (out, got), f"the base's {out_label}, rank"),
        )
        for name, shape, expected, meaning in checks:
            if tuple(shape) != expected:
                raise AdapterRefused(
                    f"{source}: tensor {name}: expected shape {expected} ({meaning}), got "
                    f"{tuple(shape)}" + _rank_note(shape, expected, name == pair.b_name, rank_from)
                )
        rank = got
    assert rank is not None
    return rank


def _rank_note(
    shape: tuple[int, ...], expected: tuple[int, ...], is_b: bool, rank_from: str
) -> str:
    """Say so when it is the rank that differs (the likeliest mistake in a hand-made or
    truncated adapter), and where the expected rank comes from."""
    axis = 1 if is_b else 0
    if shape[axis] != expected[axis]:
        return f": rank mismatch, {shape[axis]} against {expected[axis]} ({rank_from})"
    return ""


def check_finite(name: str, values: Array, source: Path) -> None:
    # A NaN or an infinity in an update spreads through every later layer: every answer
    # of the specialist would be garbage, and nothing at load time would say so.
    if not np.isfinite(values).all():
        raise AdapterRefused(f"{source}: tensor {name} has values that are not finite")


def tensor_values(path: Path, info: TensorInfo) -> Array:
    """A tensor's values as float32 (numpy's shape), read from its place in the file."""
    import gguf

    count = math.prod(info.shape)
    with path.open("rb") as fh:
        fh.seek(info.offset)
        data = fh.read(info.nbytes)
    if info.ggml_type == F32:
        values = np.frombuffer(data, dtype="<f4")
    elif info.ggml_type == F16:
        values = np.frombuffer(data, dtype="<f2").astype(np.float32)
    elif info.ggml_type == BF16:
        values = (np.frombuffer(data, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
    else:
        raw = np.frombuffer(data, dtype=np.uint8).reshape(count // info.shape[-1], -1)
        values = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType(info.ggml_type))
    return values.reshape(info.shape)
