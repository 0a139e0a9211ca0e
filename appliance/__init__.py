"""On-prem inference appliance: specialist models served locally, audited, measured."""

import contextlib
import ctypes

__version__ = "0.1.0"

# llama.cpp's libraries are loaded privately (ctypes), so a C++ runtime symbol they use
# binds to the first library of their own group that defines it. Built with a
# toolchain that links parts of libstdc++ into each shared library (seen with the GCC
# of a CUDA host's image: libggml.so then exports std::filesystem, std::codecvt, ...),
# that is a partial copy, and the tokenizer's std::regex crashes on the first model
# load (SIGSEGV; the start-up self-test refuses the model). The system's libstdc++,
# loaded into the global scope first, is found before any of them.
with contextlib.suppress(OSError):  # no GNU C++ runtime here: nothing to unify
    ctypes.CDLL("libstdc++.so.6", mode=ctypes.RTLD_GLOBAL)
