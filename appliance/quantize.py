"""Requantize a GGUF through llama.cpp's own quantize API (llama_model_quantize), as
`llama-quantize --allow-requantize` does: e.g. the shipped Q4_1 default into a format
whose CPU kernels batch well (see README, "Models"). Quantization runs in llama.cpp's
base library, not in the CPU kernel variants, so a pinned llama.cpp gives the same
bytes on every machine, and the result's SHA-256 can be pinned too.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

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


class QuantizeError(RuntimeError):
    """llama.cpp refused to quantize; the message names the files and the format."""


# "+E8": the token embeddings (and the output matrix, which SmolLM2 ties to them) stay
# Q8_0, as the shipped file has them; only the layers take the named format.
KEEP_EMBEDDINGS = "+E8"


def requantize(source: Path, target: Path, fmt: str, threads: int = 0) -> Path:
    base = fmt.removesuffix(KEEP_EMBEDDINGS)
    if base not in FORMATS:
        raise QuantizeError(
            f"format {fmt!r} is not one of {', '.join(FORMATS)} (each may end in "
            f"{KEEP_EMBEDDINGS}: embeddings kept in Q8_0)"
        )
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
