"""Which of llama.cpp's CPU kernels this process runs, chosen at run time.

The appliance's llama.cpp is built once for every x86-64 CPU (GGML_BACKEND_DL with
GGML_CPU_ALL_VARIANTS: ``libggml-cpu-<variant>.so`` beside libllama, one per CPU
generation). ggml's own loader would take the best variant the CPU runs, which on a
CPU with AMX is the ``sapphirerapids`` one, and its AMX matrix kernels crash
(general protection fault in ``ggml_backend_amx_mul_mat``; llama.cpp #20824). So the
choice is made here, before llama.cpp loads any backend:

- ``auto``: the best-scoring variant that does not carry AMX kernels;
- ``amx``: the best variant, AMX included (then the start-up self-test guards it);
- a variant's name (``haswell``, ``zen4``, ...): that one, if this CPU can run it.

A build that is not split into variants (a wheel someone built with ``GGML_NATIVE``)
reaches AMX only through llama.cpp's *extra buffer types*; where such a build has AMX
and the CPU does too, models load with ``use_extra_bufts`` off, which the plan says.

The choice is per process (ggml keeps one backend registry), made once; ``plan()``
returns it, also for the log, ``/v1/models``, ``/status`` and ``appliance doctor``.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

VARIANT_PREFIX = "libggml-cpu-"
AMX_FLAGS = frozenset({"amx_tile", "amx_int8", "amx_bf16"})
# A variant library with AMX kernels exports this (ggml-cpu/amx/amx.cpp, C++ linkage).
AMX_SYMBOLS = ("_Z28ggml_backend_amx_buffer_typev", "ggml_backend_amx_buffer_type")


class KernelError(RuntimeError):
    """The CPU kernels asked for cannot be loaded; the message says which and why."""


@dataclass(frozen=True)
class Variant:
    name: str
    path: Path
    score: int  # ggml_backend_score(): 0 when this CPU lacks a feature it needs
    amx: bool


@dataclass
class KernelPlan:
    """What was chosen, and why; the same words everywhere they are shown."""

    setting: str
    variant: str  # the CPU variant loaded, or "built-in" for a build not split so
    features: list[str]  # llama.cpp's system info: the features the loaded kernels use
    cpu_amx: bool  # the CPU says it has AMX
    kernels_amx: bool  # the loaded kernels include AMX
    extra_buffers: bool  # models load with llama.cpp's extra buffer types (repack, AMX)
    reason: str

    def summary(self) -> str:
        buffers = "repacked weights" if self.extra_buffers else "no extra buffer types"
        return f"{self.variant} kernels, {buffers}: {self.reason}"


_lock = threading.Lock()
_plan: KernelPlan | None = None


def _cpuinfo(key: str, cpuinfo: Path) -> str | None:
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith(key):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    return set((_cpuinfo("flags", cpuinfo) or "").split())


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's name, as benchmarks print it beside their figures."""
    return _cpuinfo("model name", cpuinfo) or "?"


def library_dir() -> Path:
    import llama_cpp

    return Path(llama_cpp.__file__).parent / "lib"


def _dlclose(lib: ctypes.CDLL) -> None:
    import _ctypes

    _ctypes.dlclose(lib._handle)


def variants(lib_dir: Path) -> list[Variant]:
    """Every CPU variant in ``lib_dir`` with this CPU's score for it, best first."""
    import llama_cpp  # noqa: F401  (loads libggml-base, which the variants link)

    found = []
    for path in sorted(lib_dir.glob(f"{VARIANT_PREFIX}*.so")):
        name = path.name[len(VARIANT_PREFIX) : -len(".so")]
        lib = ctypes.CDLL(str(path), mode=ctypes.RTLD_LOCAL)
        try:
            score_fn = lib.ggml_backend_score
            score_fn.restype = ctypes.c_int
            score = int(score_fn())
            amx = any(hasattr(lib, symbol) for symbol in AMX_SYMBOLS)
        finally:
            _dlclose(lib)
        found.append(Variant(name, path, score, amx))
    return sorted(found, key=lambda v: (-v.score, v.name))


def choose(setting: str, found: list[Variant], cpu_amx: bool) -> tuple[Variant, str]:
    """The variant to load for ``setting``, and why (pure: the tests call it too)."""
    runnable = [v for v in found if v.score > 0]
    if not runnable:
        raise KernelError(
            f"no CPU variant of llama.cpp runs on this CPU (found {[v.name for v in found]})"
        )
    if setting == "amx":
        best = runnable[0]
        return best, "the best variant for this CPU, AMX allowed (cpu_kernels = amx)"
    if setting != "auto":
        named = {v.name: v for v in found}
        if setting not in named:
            raise KernelError(
                f"cpu_kernels is {setting!r}; this build has auto, amx and "
                f"{', '.join(sorted(named))}"
            )
        if named[setting].score <= 0:
            raise KernelError(
                f"cpu_kernels is {setting!r}, which this CPU cannot run (it lacks a feature "
                f"that variant needs); runnable here: {', '.join(v.name for v in runnable)}"
            )
        return named[setting], f"named by cpu_kernels = {setting}"
    safe = [v for v in runnable if not (v.amx and cpu_amx)]
    if safe[0] is runnable[0]:
        return safe[0], "the best variant for this CPU"
    return safe[0], (
        f"the best variant without AMX: this CPU has AMX, and llama.cpp's AMX kernels "
        f"crash (llama.cpp #20824), so {runnable[0].name} is not used"
    )


def loaded_library(prefix: str) -> Path:
    """The file of the library libllama loaded (the wheel holds copies, not links, of
    libggml.so, .so.0 and .so.0.x: opening another copy would make a second registry)."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        path = line.split(maxsplit=5)[-1]
        if Path(path).name.startswith(prefix):
            return Path(path)
    raise KernelError(f"{prefix} is not loaded: is llama_cpp imported?")


def _ggml() -> ctypes.CDLL:
    from llama_cpp import _logger

    _logger.set_verbose(False)  # llama.cpp's own lines; the choice is logged below

    lib = ctypes.CDLL(str(loaded_library("libggml.so")))
    lib.ggml_backend_load.argtypes = [ctypes.c_char_p]
    lib.ggml_backend_load.restype = ctypes.c_void_p
    lib.ggml_backend_reg_count.restype = ctypes.c_size_t
    return lib


def _system_features() -> list[str]:
    import llama_cpp

    info = llama_cpp.llama_print_system_info().decode("utf-8", "replace")
    features = []
    for part in info.replace("|", "\n").splitlines():
        name, _, value = part.partition("=")
        if ":" in name:  # "CPU : SSE3" -> "SSE3"
            name = name.split(":", 1)[1]
        if value.strip() == "1":
            features.append(name.strip())
    return features


def _load(setting: str) -> KernelPlan:
    import llama_cpp

    cpu_amx = bool(AMX_FLAGS & cpu_flags())
    ggml = _ggml()
    # The variants link OpenMP and have no RUNPATH: a bundle's own copy (a minimal
    # Debian has none) must be loaded first for them to find it.
    gomp = library_dir() / "libgomp.so.1"
    if gomp.is_file():
        ctypes.CDLL(str(gomp), mode=ctypes.RTLD_GLOBAL)
    found = variants(library_dir())
    if found:
        if ggml.ggml_backend_reg_count() != 0:
            raise KernelError("a llama.cpp backend was loaded before the kernels were chosen")
        chosen, reason = choose(setting, found, cpu_amx)
        if not ggml.ggml_backend_load(str(chosen.path).encode()):
            raise KernelError(f"llama.cpp could not load {chosen.path}")
        # Other backends built as modules (a CUDA build's libggml-cuda.so).
        for path in sorted(library_dir().glob("libggml-*.so")):
            if path.name != "libggml-base.so" and not path.name.startswith(VARIANT_PREFIX):
                ggml.ggml_backend_load(str(path).encode())
        variant = chosen.name
    else:
        variant, reason = "built-in", "this llama.cpp build has one set of CPU kernels"
        if setting not in ("auto", "amx"):
            raise KernelError(
                f"cpu_kernels is {setting!r}, but this llama.cpp build is not split into CPU "
                "variants (built without GGML_BACKEND_DL); use auto"
            )
    llama_cpp.llama_backend_init()
    features = _system_features()
    kernels_amx = any(f.startswith("AMX") for f in features)
    extra_buffers = True
    if kernels_amx and cpu_amx and setting != "amx":
        # AMX reaches the model only through the extra buffer types; leave them out.
        extra_buffers = False
        reason += "; this build's kernels include AMX, so models load without extra buffers"
    return KernelPlan(
        setting=setting,
        variant=variant,
        features=features,
        cpu_amx=cpu_amx,
        kernels_amx=kernels_amx,
        extra_buffers=extra_buffers,
        reason=reason,
    )


def chosen() -> KernelPlan | None:
    """The plan, if this process has chosen its kernels (loaded llama.cpp's backends)."""
    with _lock:
        return _plan


def plan(setting: str | None = None) -> KernelPlan:
    """Choose and load the CPU kernels (once per process) and say what was chosen.
    ``None``: whatever this process chose already, else ``auto``."""
    global _plan
    with _lock:
        if _plan is None:
            _plan = _load(setting or "auto")
            log.info(
                "llama.cpp kernels chosen",
                extra={
                    "variant": _plan.variant,
                    "extra_buffers": _plan.extra_buffers,
                    "reason": _plan.reason,
                    "cpu_amx": _plan.cpu_amx,
                },
            )
        elif setting is not None and _plan.setting != setting:
            raise KernelError(
                f"the kernels were chosen for cpu_kernels = {_plan.setting!r}; "
                f"{setting!r} needs a new process"
            )
        return _plan
