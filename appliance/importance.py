"""How much each weight column matters when a matrix is quantized: llama.cpp's
"importance matrix" (imatrix), the mean square of the activations that multiply each
column, over a calibration text. llama.cpp's quantizers take it per tensor and choose
each block's scale to fit the columns that carry most of the signal best; for the
default model's Q5_MIX (appliance/quantize.py) it cuts what requantizing the shipped
Q4_1 weights costs in perplexity about threefold.

The file is made once from the shipped weights and kept beside the manifest (pinned by
its sha256), because the activations depend, in their last bits, on the CPU and the
library that computes them, and the requantized file must be the same bytes on every
machine. It is remade with the train extra (torch):

    .venv/bin/python -m appliance.importance MODEL.gguf OUT.npz

The calibration text is English of two kinds, from files every Debian box with Python
has: the GNU GPL version 3 (/usr/share/common-licenses/GPL-3, legal prose) and the
first 60,000 characters of Python's own documentation topics (pydoc_data, technical
prose). Neither is a text the formats are measured on (bench/data/fixed-text.txt is
the Apache License).
"""

from __future__ import annotations

import argparse
import hashlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

# The roles whose inputs are measured: every matrix of a llama block.
ROLES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
WINDOW = 512
GPL = Path("/usr/share/common-licenses/GPL-3")
PYDOC_CHARS = 60_000


class ImportanceError(ValueError):
    """The importance file is missing, altered, or lacks a tensor it must have."""


def calibration_text() -> bytes:
    import pydoc_data.topics as topics

    docs = "\n\n".join(topics.topics[key] for key in sorted(topics.topics))
    return GPL.read_bytes() + docs[:PYDOC_CHARS].encode()


def measure(model: Path, text: bytes, roles: Iterable[str] = ROLES) -> dict[str, np.ndarray]:
    """Per tensor (``blk.N.ROLE.weight``): the mean square of each input column's
    activation over ``text``, read in windows of WINDOW tokens through the model's
    float32 reconstruction in torch (appliance/training/llama_torch.py)."""
    import torch

    from appliance.engines.llama import LlamaEngine
    from appliance.training.llama_torch import LlamaLora, read_weights

    wanted = set(roles)
    engine = LlamaEngine(model, WINDOW, 1, 0)  # its tokenizer: llama.cpp's, as served
    try:
        tokens = engine.text_prompt(text.decode("utf-8"))
    finally:
        engine.close()
    sums: dict[str, Any] = {}
    seen: dict[str, int] = {}

    class Recording(LlamaLora):
        def _proj(self, layer: int, name: str, x: torch.Tensor) -> torch.Tensor:
            if name in wanted:
                key = f"blk.{layer}.{name}.weight"
                flat = x.reshape(-1, x.shape[-1]).double()
                sums[key] = sums.get(key, 0.0) + flat.pow(2).sum(0)
                seen[key] = seen.get(key, 0) + flat.shape[0]
            return super()._proj(layer, name, x)

    shape, weights = read_weights(model)
    torch_model = Recording(shape, weights, targets=())
    with torch.no_grad():
        for start in range(0, len(tokens) - WINDOW + 1, WINDOW):
            torch_model.hidden(torch.tensor([tokens[start : start + WINDOW]]))
    if not seen:
        raise ImportanceError(f"the text is {len(tokens)} tokens; a window is {WINDOW}")
    return {name: (sums[name] / seen[name]).numpy().astype(np.float32) for name in sorted(sums)}


def save(path: Path, importance: dict[str, np.ndarray]) -> str:
    """Write the file (numpy's npz, no pickles); its sha256."""
    write: Any = np.savez_compressed  # (numpy's stubs read **arrays as its keywords)
    with path.open("wb") as fh:
        write(fh, **importance)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load(path: Path, sha256: str) -> dict[str, np.ndarray]:
    """The file, checked against its pin first."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ImportanceError(f"cannot read the importance file {path}: {exc}") from None
    actual = hashlib.sha256(data).hexdigest()
    if actual != sha256:
        raise ImportanceError(f"importance file {path} has sha256 {actual}, expected {sha256}")
    with np.load(path, allow_pickle=False) as npz:
        return {name: np.ascontiguousarray(npz[name], dtype=np.float32) for name in npz.files}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="the GGUF to measure (the shipped file)")
    parser.add_argument("out", type=Path, help="the .npz to write")
    parser.add_argument(
        "--roles", default="attn_q,attn_output,ffn_gate,ffn_up,ffn_down", help="which to keep"
    )
    args = parser.parse_args()
    sha = save(args.out, measure(args.model, calibration_text(), args.roles.split(",")))
    print(f"{args.out}: sha256 {sha}")


if __name__ == "__main__":
    main()
