"""A Hugging Face PEFT LoRA adapter converted to llama.cpp's GGUF adapter format
(peft_to_gguf), and a GGUF adapter checked against the very base file it is for
(check_gguf_adapter): both checked as formats.py says, both described by AdapterFacts."""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from appliance.adapters.formats import (
    F16,
    F32,
    FILE_TYPE,
    TYPE_NAMES,
    AdapterRefused,
    Array,
    LoraPair,
    add_half,
    check_finite,
    check_pairs,
    read_base_shapes,
    read_header,
    tensor_values,
)
from appliance.gguf import GGUFError

# Hugging Face's decoder-layer projections (Llama, Mistral, Qwen2, Gemma name them alike)
# and the GGUF tensor each one becomes.
MODULES = {
    "q_proj": ("self_attn", "attn_q"),
    "k_proj": ("self_attn", "attn_k"),
    "v_proj": ("self_attn", "attn_v"),
    "o_proj": ("self_attn", "attn_output"),
    "gate_proj": ("mlp", "ffn_gate"),
    "up_proj": ("mlp", "ffn_up"),
    "down_proj": ("mlp", "ffn_down"),
}
PEFT_TENSOR = re.compile(
    r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+?)\.lora_([AB])\.weight$"
)
GGUF_TENSOR = re.compile(r"^blk\.(\d+)\.(\w+)\.weight\.lora_([ab])$")

# llama.cpp rotates each head's query and key in pairs of neighbouring rows (2i, 2i+1)
# for these architectures ("NORM" rope), while Hugging Face's Llama rotates row i with
# row i + head_dim/2 ("rotate_half"); llama.cpp's converter reorders q_proj and k_proj
# rows to match, so a LoRA update of them must be reordered the same way.
ROPE_PAIRS_ADJACENT = frozenset({"llama"})
# These rotate as Hugging Face does ("NEOX" rope): their rows are kept in order.
ROPE_PAIRS_HALVES = frozenset({"qwen2", "qwen3", "gemma", "gemma2", "gemma3"})


@dataclass(frozen=True)
class AdapterFacts:
    """What an adapter is, as checked against its base: ``target_modules`` by their GGUF
    names (attn_q, attn_v, ...); ``tensors``: lora_a and lora_b tensors in all;
    ``base_model``: what a PEFT adapter says it was trained on (a Hugging Face id or
    path; only recorded, since the base is checked by its file)."""

    architecture: str
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    tensors: int
    layers: int
    quantization: str
    parameters: int
    base_model: str | None = None


# -- PEFT to GGUF ---------------------------------------------------------------------------


def _read_config(peft_dir: Path) -> dict[str, Any]:
    path = peft_dir / "adapter_config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AdapterRefused(f"{peft_dir} is not a PEFT adapter: no adapter_config.json") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise AdapterRefused(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise AdapterRefused(f"{path} must hold a JSON object")
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise AdapterRefused(f"{path}: peft_type {peft_type!r} is not supported (only LORA)")
    refusals = {
        # GGUF holds lora_a as (rank, in); fan_in_fan_out (GPT-2's Conv1D) stores it the
        # other way round and would need every tensor transposed.
        "fan_in_fan_out": (False, "fan_in_fan_out must be false"),
        "use_rslora": (False, "use_rslora is not supported (llama.cpp scales by alpha/rank)"),
        "use_dora": (False, "use_dora is not supported (llama.cpp has no DoRA magnitudes)"),
    }
    for key, (allowed, message) in refusals.items():
        if bool(config.get(key, allowed)) != allowed:
            raise AdapterRefused(f"{path}: {message}, got {key} = {config.get(key)!r}")
    bias = config.get("bias", "none")
    if bias != "none":
        raise AdapterRefused(
            f"{path}: bias must be 'none' (a GGUF LoRA adapter carries no biases), got {bias!r}"
        )
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            raise AdapterRefused(
                f"{path}: {key} is not supported (a GGUF adapter has one alpha and the "
                f"manifest one rank), got {config[key]!r}"
            )
    if config.get("modules_to_save"):
        raise AdapterRefused(
            f"{path}: modules_to_save {config['modules_to_save']!r} is not supported: those are "
            "whole modules, which a LoRA adapter cannot carry"
        )
    rank = config.get("r")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise AdapterRefused(f"{path}: r must be a positive integer, got {rank!r}")
    alpha = config.get("lora_alpha", rank)
    if not isinstance(alpha, int | float) or isinstance(alpha, bool) or not 0 < alpha <= 1e6:
        raise AdapterRefused(f"{path}: lora_alpha must be a number above 0, got {alpha!r}")
    targets = config.get("target_modules")
    if isinstance(targets, list):
        for target in targets:
            if target not in MODULES:
                raise AdapterRefused(
                    f"{path}: unknown target module {target!r}; supported: {', '.join(MODULES)}"
                )
    elif not isinstance(targets, str):  # a regular expression or "all-linear": the tensors say
        raise AdapterRefused(f"{path}: target_modules must be a list or a string, got {targets!r}")
    return config


def _load_safetensors(path: Path) -> dict[str, Array]:
    """The tensors of a safetensors file as float arrays. numpy has no bfloat16, which
    training in bf16 commonly leaves: those are widened to float32 here (exactly)."""
    import safetensors
    from safetensors.numpy import load_file

    if not path.is_file():
        # adapter_model.bin is a pickle, which runs code as it loads: it is not read.
        raise AdapterRefused(
            f"{path.parent} is not a PEFT adapter this appliance reads: no {path.name} "
            "(an adapter_model.bin must be saved as safetensors first)"
        )
    try:
        try:
            loaded = dict(load_file(path))
        except TypeError:  # "data type 'bfloat16' not understood"
            pass
        else:  # where ml_dtypes is imported, numpy knows bfloat16: widened all the same
            return {
                name: array.astype(np.float32) if array.dtype.name == "bfloat16" else array
                for name, array in loaded.items()
            }
        found: dict[str, Array] = {}
        raw: list[tuple[str, dict[str, Any]]] = safetensors.deserialize(  # type: ignore[no-untyped-call]
            path.read_bytes()
        )
        for name, view in raw:
            dtype, shape, data = view["dtype"], view["shape"], view["data"]
            if dtype == "BF16":
                wide = np.frombuffer(data, dtype="<u2").astype(np.uint32) << 16
                found[name] = wide.view(np.float32).reshape(shape)
            elif dtype in ("F32", "F16", "F64"):
                found[name] = np.frombuffer(data, dtype=dtype.replace("F", "<f")).reshape(shape)
            else:
                found[name] = np.zeros(shape, dtype=np.int8)  # refused below, by its dtype
        return found
    except safetensors.SafetensorError as exc:
        raise AdapterRefused(f"{path} is not a whole safetensors file: {exc}") from None
    except OSError as exc:
        raise AdapterRefused(f"{path}: {exc}") from None


def _rope_reorder(b: Array, n_head: int) -> Array:
    """lora_b's rows from Hugging Face's order to llama.cpp's, head by head: the GGUF
    row 2i (and 2i+1) of a head is its Hugging Face row i (and i + head_dim/2). The
    update B @ A is reordered by its rows alone, so lora_a stays as it is."""
    out, rank = b.shape
    half = out // n_head // 2
    return np.ascontiguousarray(
        b.reshape(n_head, 2, half, rank).transpose(0, 2, 1, 3).reshape(out, rank)
    )


def peft_to_gguf(peft_dir: Path, base: Path, out: Path) -> AdapterFacts:
    """Convert the PEFT LoRA adapter in ``peft_dir`` (adapter_config.json and
    adapter_model.safetensors) to a GGUF adapter for the GGUF model ``base``, written to
    ``out`` whole or not at all (f16 if every tensor is f16, else f32)."""
    config = _read_config(peft_dir)
    where = peft_dir / "adapter_model.safetensors"
    tensors = _load_safetensors(where)
    base_info = read_base_shapes(base)
    declared = config["target_modules"]
    pairs: dict[tuple[int, str], LoraPair] = {}
    all_f16 = True
    for name, array in tensors.items():
        match = PEFT_TENSOR.match(name)
        if match is None:
            raise AdapterRefused(
                f"{where}: tensor {name} is not a LoRA tensor of a decoder layer "
                "(base_model.model.model.layers.N.{self_attn|mlp}.MODULE.lora_{A|B}.weight)"
            )
        layer, block, module, which = int(match[1]), match[2], match[3], match[4]
        if module not in MODULES:
            raise AdapterRefused(
                f"{where}: tensor {name}: unknown target module {module!r}; supported: "
                f"{', '.join(MODULES)}"
            )
        if MODULES[module][0] != block:
            raise AdapterRefused(
                f"{where}: tensor {name}: {module} belongs in {MODULES[module][0]}, not {block}"
            )
        if isinstance(declared, list) and module not in declared:
            raise AdapterRefused(
                f"{where}: tensor {name} is for module {module!r}, which adapter_config.json's "
                f"target_modules {declared!r} does not list"
            )
        if array.dtype.kind != "f":
            raise AdapterRefused(
                f"{where}: tensor {name} has dtype {array.dtype}; LoRA tensors are floating point"
            )
        check_finite(name, array, where)
        all_f16 = all_f16 and array.dtype == np.float16
        kind = MODULES[module][1]
        stem = f"base_model.model.model.layers.{layer}.{block}.{module}"
        names = (f"{stem}.lora_A.weight", f"{stem}.lora_B.weight")
        add_half(pairs, layer, kind, which == "A", array, names)
    rank = check_pairs(
        list(pairs.values()), base_info, int(config["r"]), "adapter_config.json r", where
    )
    kinds = {kind for _, kind in pairs}
    if isinstance(declared, list):
        for module in declared:
            if MODULES[module][1] not in kinds:
                raise AdapterRefused(
                    f"{where}: target module {module!r} (adapter_config.json) has no tensors"
                )
    permute = base_info.architecture in ROPE_PAIRS_ADJACENT
    rope_unknown = base_info.architecture not in ROPE_PAIRS_HALVES
    if kinds & {"attn_q", "attn_k"} and not permute and rope_unknown:
        raise AdapterRefused(
            f"{where}: q_proj/k_proj updates for architecture {base_info.architecture!r} "
            "are not converted here (its rotary layout is not known to the appliance); "
            "convert the adapter with llama.cpp's convert_lora_to_gguf.py and import the GGUF"
        )
    dtype = np.float16 if all_f16 else np.float32
    alpha = float(config.get("lora_alpha", rank))
    written: list[tuple[str, Array]] = []
    for (layer, kind), pair in sorted(pairs.items()):
        assert pair.a is not None and pair.b is not None  # check_pairs insists
        b = pair.b
        if permute and kind in ("attn_q", "attn_k"):
            b = _rope_reorder(b, base_info.n_head if kind == "attn_q" else base_info.n_head_kv)
        written.append((f"blk.{layer}.{kind}.weight.lora_a", np.ascontiguousarray(pair.a, dtype)))
        written.append((f"blk.{layer}.{kind}.weight.lora_b", np.ascontiguousarray(b, dtype)))
    write_gguf_adapter(
        out, base_info.architecture, alpha, FILE_TYPE[F16 if all_f16 else F32], written
    )
    base_model = config.get("base_model_name_or_path")
    return AdapterFacts(
        architecture=base_info.architecture,
        rank=rank,
        alpha=alpha,
        target_modules=tuple(sorted(kinds)),
        tensors=len(written),
        layers=len({layer for layer, _ in pairs}),
        quantization="F16" if all_f16 else "F32",
        parameters=sum(array.size for _, array in written),
        base_model=base_model if isinstance(base_model, str) else None,
    )


def write_gguf_adapter(
    out: Path, architecture: str, alpha: float, file_type: int, tensors: list[tuple[str, Array]]
) -> None:
    """llama.cpp's adapter format, written to a temporary name beside ``out`` and renamed
    into place once whole and on disk."""
    import gguf

    partial = out.with_name(f".{out.name}.{os.getpid()}.partial")
    try:
        writer = gguf.GGUFWriter(str(partial), architecture)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        writer.add_file_type(file_type)
        for name, array in tensors:
            writer.add_tensor(name, array)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        fd = os.open(partial, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)


# -- GGUF adapters --------------------------------------------------------------------------


def check_gguf_adapter(path: Path, base: Path) -> AdapterFacts:
    """Check a GGUF LoRA adapter against the GGUF model ``base`` as llama.cpp will when
    it loads it, and more: whole (no tensor past the end of the file), one rank, finite."""
    try:
        header = read_header(path)
    except (GGUFError, OSError) as exc:
        raise AdapterRefused(f"{path} is not a whole GGUF file: {exc}") from None
    meta = header.meta
    if meta.get("general.type") != "adapter":
        raise AdapterRefused(
            f"{path} is not a LoRA adapter: general.type is {meta.get('general.type')!r}, "
            "expected 'adapter'"
        )
    if meta.get("adapter.type") != "lora":
        raise AdapterRefused(
            f"{path} is not a LoRA adapter: adapter.type is {meta.get('adapter.type')!r}, "
            "expected 'lora'"
        )
    base_info = read_base_shapes(base)
    arch = meta.get("general.architecture")
    if arch != base_info.architecture:
        raise AdapterRefused(
            f"adapter {path} is for architecture {arch!r}; base {base.name} is "
            f"{base_info.architecture!r}"
        )
    pairs: dict[tuple[int, str], LoraPair] = {}
    types: set[int] = set()
    for info in header.tensors.values():
        match = GGUF_TENSOR.match(info.name)
        if match is None:
            raise AdapterRefused(
                f"{path}: tensor {info.name} is not a LoRA tensor of a layer "
                "(blk.N.NAME.weight.lora_a or .lora_b)"
            )
        if info.ggml_type not in TYPE_NAMES:
            raise AdapterRefused(
                f"{path}: tensor {info.name} has GGML type {info.ggml_type}; supported: "
                f"{', '.join(TYPE_NAMES.values())}"
            )
        if info.offset + info.nbytes > header.size:
            raise AdapterRefused(
                f"{path} is truncated: tensor {info.name} needs bytes up to "
                f"{info.offset + info.nbytes}, the file has {header.size}"
            )
        values = tensor_values(path, info)
        check_finite(info.name, values, path)
        types.add(info.ggml_type)
        layer, kind, which = int(match[1]), match[2], match[3]
        stem = f"blk.{layer}.{kind}.weight"
        add_half(pairs, layer, kind, which == "a", values, (f"{stem}.lora_a", f"{stem}.lora_b"))
    rank = check_pairs(list(pairs.values()), base_info, None, "the adapter's first tensor", path)
    # llama.cpp reads a missing or zero alpha as "no alpha": the update at scale s is
    # s * B @ A, which is what alpha = rank says.
    alpha = meta.get("adapter.lora.alpha")
    alpha = float(alpha) if isinstance(alpha, int | float) and alpha > 0 else float(rank)
    return AdapterFacts(
        architecture=base_info.architecture,
        rank=rank,
        alpha=alpha,
        target_modules=tuple(sorted({kind for _, kind in pairs})),
        tensors=len(header.tensors),
        layers=len({layer for layer, _ in pairs}),
        quantization=TYPE_NAMES[types.pop()] if len(types) == 1 else "mixed",
        parameters=sum(math.prod(t.shape) for t in header.tensors.values()),
    )
