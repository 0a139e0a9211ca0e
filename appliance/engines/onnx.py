"""Tensor models through onnxruntime. Input and output metadata come from the model
itself; datatypes are named as the Open Inference Protocol names them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

# onnxruntime's type strings -> (OIP datatype, numpy dtype)
TYPES: dict[str, tuple[str, Any]] = {
    "tensor(bool)": ("BOOL", np.bool_),
    "tensor(int8)": ("INT8", np.int8),
    "tensor(int16)": ("INT16", np.int16),
    "tensor(int32)": ("INT32", np.int32),
    "tensor(int64)": ("INT64", np.int64),
    "tensor(uint8)": ("UINT8", np.uint8),
    "tensor(uint16)": ("UINT16", np.uint16),
    "tensor(uint32)": ("UINT32", np.uint32),
    "tensor(uint64)": ("UINT64", np.uint64),
    "tensor(float16)": ("FP16", np.float16),
    "tensor(float)": ("FP32", np.float32),
    "tensor(double)": ("FP64", np.float64),
    "tensor(string)": ("BYTES", np.object_),
}
NUMPY_BY_DATATYPE = {datatype: dtype for datatype, dtype in TYPES.values()}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str
    shape: list[int]  # -1 where the model leaves a dimension free

    def public(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": self.shape}


def _spec(arg: Any) -> TensorSpec:
    datatype = TYPES.get(arg.type, (arg.type, None))[0]
    shape = [d if isinstance(d, int) and d >= 0 else -1 for d in arg.shape]
    return TensorSpec(arg.name, datatype, shape)


def open_session(path: Path, threads: int) -> ort.InferenceSession:
    """An onnxruntime session on the CPU: ``threads`` for one run (0: onnxruntime's
    choice), one run's operators one after another."""
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


class OnnxEngine:
    """One onnxruntime session; run() is safe from several threads at once."""

    def __init__(self, path: Path, threads: int) -> None:
        self.session = open_session(path, threads)
        self.inputs = [_spec(a) for a in self.session.get_inputs()]
        self.outputs = [_spec(a) for a in self.session.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        results = self.session.run(outputs, feeds)
        return dict(zip(outputs, results, strict=True))

    def close(self) -> None:
        del self.session
