"""/v2: the Open Inference Protocol (KServe v2 / Triton REST) for tensor models, with
Triton's binary tensor extension, so that `tritonclient.http` works unchanged.

Errors are {"error": "..."}: 400 naming the tensor and the expected against the received
shape or datatype, 404 for an unknown model or version.
"""

from __future__ import annotations

import json
import math
import struct
from typing import Any

import numpy as np
from flask import Blueprint, Response, current_app, request

from appliance import __version__, context
from appliance.api.errors import ApiError
from appliance.api.health import readiness
from appliance.engines.onnx import NUMPY_BY_DATATYPE, TensorSpec
from appliance.inference import get_pipeline
from appliance.serving import get_pool
from appliance.serving.models import RunModel
from appliance.serving.pool import Lease

bp = Blueprint("kserve", __name__, url_prefix="/v2")

HEADER_LENGTH = "Inference-Header-Content-Length"
HEADER_ENVIRON = "HTTP_" + HEADER_LENGTH.upper().replace("-", "_")  # as WSGI passes it
VERSION = "1"
PLATFORM = "onnxruntime_onnx"


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    resp = Response(json.dumps(data), status=status, mimetype="application/json")
    for key, value in (headers or {}).items():
        resp.headers[key] = value
    return resp


def _check_version(name: str, version: str | None) -> None:
    if version not in (None, VERSION):
        raise ApiError(404, f"model {name!r} has no version {version!r}; versions: {VERSION}")


def _lease(name: str, version: str | None) -> tuple[Lease, RunModel]:
    """The tensor model, loaded if need be, through the pipeline's one lookup."""
    _check_version(name, version)
    lease = get_pipeline(current_app).resolve(context.current(), name, "tensor")
    assert isinstance(lease.model, RunModel)
    return lease, lease.model


@bp.get("")
def server_metadata() -> Response:
    return _json(
        {"name": "appliance", "version": __version__, "extensions": ["binary_tensor_data"]}
    )


@bp.get("/health/live")
def live() -> Response:
    return _json({"live": True})


@bp.get("/health/ready")
def ready() -> Response:
    ready, reasons = readiness(current_app)
    if ready:
        return _json({"ready": True})
    return _json({"error": "not ready: " + "; ".join(reasons)}, 503)


@bp.get("/models/<name>")
@bp.get("/models/<name>/versions/<version>")
def model_metadata(name: str, version: str | None = None) -> Response:
    _, model = _lease(name, version)
    return _json(
        {
            "name": name,
            "versions": [VERSION],
            "platform": PLATFORM,
            "inputs": [s.public() for s in model.engine.inputs],
            "outputs": [s.public() for s in model.engine.outputs],
        }
    )


@bp.get("/models/<name>/ready")
@bp.get("/models/<name>/versions/<version>/ready")
def model_ready(name: str, version: str | None = None) -> Response:
    """Whether the model is loaded, without loading it: its state and memory too."""
    _check_version(name, version)
    pool = get_pool(current_app)
    pool.manifest(name)  # unknown: 404
    row = next(r for r in pool.state() if r["name"] == name)
    body = {
        "name": name,
        "ready": row["state"] == "ready",
        "state": row["state"],
        "kind": row["kind"],
        "memory_bytes": row["memory_bytes"],
    }
    if "reason" in row:
        body["reason"] = row["reason"]
    return _json(body)


def _split_body() -> tuple[dict[str, Any], bytes]:
    raw = request.get_data(cache=True)
    header = request.environ.get(HEADER_ENVIRON)
    if header is None:
        json_part, binary = raw, b""
    else:
        try:
            length = int(header)
        except ValueError:
            raise ApiError(400, f"{HEADER_LENGTH} must be an integer, got {header!r}") from None
        if not 0 <= length <= len(raw):
            raise ApiError(400, f"{HEADER_LENGTH} is {length} but the body has {len(raw)} bytes")
        json_part, binary = raw[:length], raw[length:]
    try:
        data = json.loads(json_part)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the inference request is not valid JSON: {exc}") from None
    except RecursionError:
        raise ApiError(400, "the inference request nests JSON too deeply") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the inference request must be a JSON object")
    return data, binary


def _flatten(data: Any) -> list[Any]:
    if isinstance(data, list):
        out: list[Any] = []
        for item in data:
            out.extend(_flatten(item))
        return out
    return [data]


def _bytes_elements(blob: bytes, count: int, name: str) -> list[bytes]:
    items, offset = [], 0
    for _ in range(count):
        if offset + 4 > len(blob):
            raise ApiError(400, f"input {name!r}: BYTES data ends inside an element length")
        (size,) = struct.unpack_from("<I", blob, offset)
        offset += 4
        if offset + size > len(blob):
            raise ApiError(400, f"input {name!r}: BYTES element runs past the data")
        items.append(blob[offset : offset + size])
        offset += size
    if offset != len(blob):
        raise ApiError(
            400, f"input {name!r}: {len(blob) - offset} bytes left after {count} BYTES elements"
        )
    return items


def _shape_ok(spec: TensorSpec, shape: list[int]) -> bool:
    return len(shape) == len(spec.shape) and all(
        want in (-1, got) for want, got in zip(spec.shape, shape, strict=True)
    )


def _decode_input(
    item: Any, spec: TensorSpec, binary: bytes, offset: int
) -> tuple[np.ndarray, int]:
    name = spec.name
    shape = item.get("shape")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise ApiError(
            400, f"input {name!r}: shape must be a list of non-negative integers, got {shape!r}"
        )
    datatype = item.get("datatype")
    if datatype != spec.datatype:
        raise ApiError(
            400, f"input {name!r}: datatype {datatype!r} does not match the model's {spec.datatype}"
        )
    if not _shape_ok(spec, shape):
        raise ApiError(
            400,
            f"input {name!r}: shape {shape} does not match the model's {spec.shape} (-1: any size)",
        )
    count = math.prod(shape)
    dtype = NUMPY_BY_DATATYPE[datatype]
    params = item.get("parameters") or {}
    if not isinstance(params, dict):
        raise ApiError(400, f"input {name!r}: parameters must be an object")
    size = params.get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ApiError(400, f"input {name!r}: binary_data_size must be a non-negative integer")
        if offset + size > len(binary):
            raise ApiError(
                400,
                f"input {name!r}: binary_data_size {size} runs past the "
                f"{len(binary) - offset} binary bytes left",
            )
        blob = binary[offset : offset + size]
        if datatype == "BYTES":
            # onnxruntime takes a string tensor's elements as str (bytes it would feed
            # the model as their repr, "b'...'"): text, so UTF-8.
            try:
                texts = [b.decode("utf-8") for b in _bytes_elements(blob, count, name)]
            except UnicodeDecodeError as exc:
                message = f"input {name!r}: a BYTES element is not UTF-8: {exc}"
                raise ApiError(400, message) from None
            array = np.array(texts, dtype=object)
        else:
            expected = count * np.dtype(dtype).itemsize
            if size != expected:
                raise ApiError(
                    400,
                    f"input {name!r}: shape {shape} of {datatype} needs "
                    f"{expected} bytes, binary_data_size is {size}",
                )
            array = np.frombuffer(blob, dtype=dtype)
        return array.reshape(shape), offset + size
    if "data" not in item:
        raise ApiError(400, f"input {name!r}: no data and no binary_data_size")
    flat = _flatten(item["data"])
    if len(flat) != count:
        raise ApiError(
            400, f"input {name!r}: shape {shape} needs {count} elements, data has {len(flat)}"
        )
    try:
        if datatype == "BYTES":
            if not all(isinstance(v, str) for v in flat):
                raise TypeError("BYTES data must be strings")
            array = np.array(flat, dtype=object)  # str, as onnxruntime takes them
        elif datatype == "BOOL":
            if not all(isinstance(v, bool) for v in flat):
                raise TypeError("BOOL data must be true or false")
            array = np.array(flat, dtype=dtype)
        else:
            if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in flat):
                raise TypeError(f"{datatype} data must be numbers")
            if np.dtype(dtype).kind in "iu" and not all(isinstance(v, int) for v in flat):
                # numpy would cut 1.5 to 1: a changed reading, not a refusal
                raise TypeError(f"{datatype} data must be whole numbers")
            array = np.array(flat, dtype=dtype)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ApiError(400, f"input {name!r}: {exc}") from None
    return array.reshape(shape), offset


def _decode_inputs(
    request_body: dict[str, Any], binary: bytes, model: RunModel
) -> dict[str, np.ndarray]:
    inputs = request_body.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise ApiError(400, "the request needs a non-empty 'inputs' list")
    specs = {s.name: s for s in model.engine.inputs}
    feeds: dict[str, np.ndarray] = {}
    offset = 0
    for item in inputs:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise ApiError(400, "each input needs a 'name'")
        name = item["name"]
        if name not in specs:
            raise ApiError(
                400,
                f"unknown input {name!r}; model {model.manifest.name} takes: "
                + ", ".join(f"{s.name} ({s.datatype} {s.shape})" for s in specs.values()),
            )
        if name in feeds:
            raise ApiError(400, f"input {name!r} is given twice")
        feeds[name], offset = _decode_input(item, specs[name], binary, offset)
    missing = [s for s in specs.values() if s.name not in feeds]
    if missing:
        raise ApiError(
            400,
            "missing input(s): " + ", ".join(f"{s.name} ({s.datatype} {s.shape})" for s in missing),
        )
    if offset != len(binary):
        raise ApiError(400, f"{len(binary) - offset} binary bytes are not claimed by any input")
    return feeds


def _requested_outputs(request_body: dict[str, Any], model: RunModel) -> list[tuple[str, bool]]:
    params = request_body.get("parameters") or {}
    binary_default = bool(isinstance(params, dict) and params.get("binary_data_output"))
    known: list[str] = [s.name for s in model.engine.outputs]
    asked = request_body.get("outputs")
    if asked is None:
        return [(n, binary_default) for n in known]
    if not isinstance(asked, list):
        raise ApiError(400, "'outputs' must be a list")
    chosen = []
    for item in asked:
        name = item.get("name") if isinstance(item, dict) else None
        if name not in known:
            raise ApiError(
                400,
                f"unknown output {name!r}; model {model.manifest.name} gives: " + ", ".join(known),
            )
        out_params = item.get("parameters") or {}
        binary = (
            out_params.get("binary_data", binary_default)
            if isinstance(out_params, dict)
            else binary_default
        )
        chosen.append((name, bool(binary)))
    return chosen


def _encode_output(
    spec: TensorSpec, array: np.ndarray, binary: bool
) -> tuple[dict[str, Any], bytes]:
    entry: dict[str, Any] = {
        "name": spec.name,
        "datatype": spec.datatype,
        "shape": list(array.shape),
    }
    if spec.datatype == "BYTES":
        items = [v if isinstance(v, bytes) else str(v).encode() for v in array.reshape(-1)]
        if binary:
            blob = b"".join(struct.pack("<I", len(v)) + v for v in items)
            entry["parameters"] = {"binary_data_size": len(blob)}
            return entry, blob
        entry["data"] = [v.decode("utf-8", errors="replace") for v in items]
        return entry, b""
    if binary:
        blob = np.ascontiguousarray(array).tobytes()
        entry["parameters"] = {"binary_data_size": len(blob)}
        return entry, blob
    entry["data"] = array.reshape(-1).tolist()
    return entry, b""


def _audit_input(request_body: dict[str, Any], binary: bytes) -> dict[str, Any]:
    record = dict(request_body)
    if binary:
        record["binary_data_hex"] = binary.hex()
    return record


@bp.post("/models/<name>/infer")
@bp.post("/models/<name>/versions/<version>/infer")
def infer(name: str, version: str | None = None) -> Response:
    body, binary = _split_body()  # a body that is not even JSON loads nothing
    lease, model = _lease(name, version)
    feeds = _decode_inputs(body, binary, model)
    wanted = _requested_outputs(body, model)
    ctx = context.current()
    results = get_pipeline(current_app).run_tensors(
        ctx, lease, feeds, [n for n, _ in wanted], _audit_input(body, binary)
    )
    specs = {s.name: s for s in model.engine.outputs}
    outputs, blobs = [], []
    audited: dict[str, Any] = {}  # what the outcome record keeps of the answer
    for out_name, as_binary in wanted:
        spec, array = specs[out_name], results[out_name]
        entry, blob = _encode_output(spec, array, as_binary)
        outputs.append(entry)
        blobs.append(blob)
        if spec.datatype == "BYTES":
            audited[out_name] = len(array)
        else:  # the flat values, as the JSON answer has them already
            audited[out_name] = entry["data"] if "data" in entry else array.reshape(-1).tolist()
    response: dict[str, Any] = {"model_name": name, "model_version": VERSION, "outputs": outputs}
    if "id" in body:
        response["id"] = body["id"]
    ctx.audit.output.append(json.dumps(audited))
    header = json.dumps(response).encode()
    if not any(blobs):
        return Response(header, mimetype="application/json")
    resp = Response(header + b"".join(blobs), mimetype="application/octet-stream")
    resp.headers[HEADER_LENGTH] = str(len(header))
    return resp
