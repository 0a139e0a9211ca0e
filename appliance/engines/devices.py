"""The GPUs llama.cpp sees, and where a language model's layers run.

A llama.cpp built with a GPU backend (``-DGGML_CUDA=on``: ``libggml-cuda.so`` beside
the CPU variants, loaded by ``kernels.plan``) lists its devices in ggml's backend
registry. A model's ``gpu_layers`` setting asks for some of its layers on them; what
llama.cpp then does follows one rule (``llama_model::load_tensors``): of the model's
``n_layer + 1`` layers (the blocks and the output layer), ``min(gpu_layers, n_layer +
1)`` go to the GPUs (``-1``: all), none when it sees no GPU. ``placement`` applies that
rule, so that the log, ``/v1/models``, ``/status``, ``/metrics`` and ``appliance
doctor`` say where a model runs, and a GPU setting on a build or box without a GPU is
said, not silently run on the CPU.
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass
from typing import Any

# enum ggml_backend_dev_type (ggml-backend.h): CPU, GPU, IGPU, ACCEL, META.
_GPU, _IGPU = 1, 2


@dataclass(frozen=True)
class Device:
    name: str  # llama.cpp's name for it: CUDA0, ...
    description: str  # the driver's: NVIDIA H200, ...
    free_bytes: int
    total_bytes: int
    integrated: bool = False  # an integrated GPU (used only where no discrete one is)


@dataclass(frozen=True)
class Placement:
    """Where a model's layers run; the same words wherever they are shown."""

    gpu_layers: int  # the setting
    layers: int  # the model's layers, the output layer counted (n_layer + 1)
    offloaded: int  # of those, how many run on the GPUs
    devices: list[str]  # the GPUs they run on, as "CUDA0 (NVIDIA H200)"
    reason: str

    @property
    def wanted_gpu(self) -> bool:
        """The setting asked for the GPU and got none of it."""
        return self.gpu_layers != 0 and self.offloaded == 0


def placement(gpu_layers: int, n_layer: int, devices: list[Device]) -> Placement:
    """Where llama.cpp puts a model of ``n_layer`` blocks (its next-token prediction
    layers counted) for ``gpu_layers`` (pure)."""
    layers = n_layer + 1
    discrete = [d for d in devices if not d.integrated]
    devices = discrete or devices  # llama.cpp takes integrated GPUs only when alone
    names = [f"{d.name} ({d.description})" for d in devices]
    if gpu_layers == 0:
        return Placement(0, layers, 0, [], "gpu_layers = 0: every layer runs on the CPU")
    if not devices:
        return Placement(
            gpu_layers,
            layers,
            0,
            [],
            f"gpu_layers = {gpu_layers}, but llama.cpp sees no GPU (built without a GPU "
            "backend, or no device or driver): every layer runs on the CPU",
        )
    offloaded = layers if gpu_layers < 0 else min(gpu_layers, layers)
    rest = "" if offloaded == layers else f"; {layers - offloaded} on the CPU"
    return Placement(
        gpu_layers,
        layers,
        offloaded,
        names,
        f"{offloaded}/{layers} layers on {', '.join(names)}{rest}",
    )


def cpu_only(params: Any) -> None:
    """Model parameters for a model kept off the GPUs llama.cpp sees (gpu_layers = 0):
    no device in its list (one device, none chosen), so its contexts start no GPU
    backend: no CUDA context or GPU memory, and no prompt batch of 32 tokens or more
    handed to a GPU (llama.cpp's op_offload), which would make a CPU model's answers
    depend on the GPU and on which prompts share its step."""
    import llama_cpp

    params.split_mode = llama_cpp.LLAMA_SPLIT_MODE_NONE
    params.main_gpu = -1


@functools.cache
def _lib() -> ctypes.CDLL:
    from appliance.engines import kernels

    lib = ctypes.CDLL(str(kernels.loaded_library("libggml.so")))
    lib.ggml_backend_dev_count.restype = ctypes.c_size_t
    lib.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
    lib.ggml_backend_dev_get.restype = ctypes.c_void_p
    for fn in ("ggml_backend_dev_name", "ggml_backend_dev_description"):
        getattr(lib, fn).argtypes = [ctypes.c_void_p]
        getattr(lib, fn).restype = ctypes.c_char_p
    lib.ggml_backend_dev_type.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_dev_type.restype = ctypes.c_int
    lib.ggml_backend_dev_memory.argtypes = [
        ctypes.c_void_p,
        ctypes.POINTER(ctypes.c_size_t),
        ctypes.POINTER(ctypes.c_size_t),
    ]
    lib.ggml_backend_dev_memory.restype = None
    return lib


def gpus() -> list[Device]:
    """The GPUs in llama.cpp's registry, with their memory now (after ``kernels.plan``
    has loaded the backends; an empty list on a CPU-only build, and before that)."""
    from appliance.engines import kernels

    if kernels.chosen() is None:
        return []  # no backend loaded in this process: nothing to ask
    lib = _lib()
    found = []
    for index in range(lib.ggml_backend_dev_count()):
        dev = lib.ggml_backend_dev_get(index)
        kind = lib.ggml_backend_dev_type(dev)
        if kind not in (_GPU, _IGPU):
            continue
        free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
        lib.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
        found.append(
            Device(
                name=(lib.ggml_backend_dev_name(dev) or b"?").decode("utf-8", "replace"),
                description=(lib.ggml_backend_dev_description(dev) or b"?").decode(
                    "utf-8", "replace"
                ),
                free_bytes=int(free.value),
                total_bytes=int(total.value),
                integrated=kind == _IGPU,
            )
        )
    return found
