"""Tensor models over the Open Inference Protocol v2: the line model through the app and
through `tritonclient.http` against the real server; every malformed tensor named;
metrics; memory admission; doctor."""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tritonclient.http as triton
from click.testing import CliRunner
from flask import Flask
from flask.testing import FlaskClient
from onnx import TensorProto, helper
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from appliance.app import close_app, create_app
from appliance.auth.store import AuthStore
from appliance.cli import main
from appliance.config import load_settings
from appliance.inference import get_pipeline
from appliance.registry import import_model

from helpers import ServerFactory

LINE = "line-anomaly"
READINGS = [[2.0, 50.0, 55.0, 12.0], [6.0, 70.0, 55.0, 12.0], [2.1, 49.0, 88.0, 12.5]]
HEADER = "Inference-Header-Content-Length"


def expected(readings: list[list[float]], model_dir: Path) -> list[np.ndarray]:
    session = ort.InferenceSession(str(model_dir / f"{LINE}.onnx"))
    return list(session.run(None, {"readings": np.array(readings, dtype=np.float32)}))


def infer(client: FlaskClient, body: dict[str, Any], model: str = LINE, **kw: Any) -> Any:
    return client.post(f"/v2/models/{model}/infer", json=body, **kw)


def readings_input(
    data: Any = READINGS,
    shape: list[int] | None = None,
    datatype: str = "FP32",
    name: str = "readings",
) -> dict[str, Any]:
    return {"name": name, "shape": shape or [len(READINGS), 4], "datatype": datatype, "data": data}


def error_of(resp: Any, status: int) -> str:
    assert resp.status_code == status, resp.data
    body = resp.get_json()
    assert set(body) == {"error"} and isinstance(body["error"], str)
    return str(body["error"])


def test_server_and_model_metadata(client: FlaskClient) -> None:
    assert client.get("/v2").get_json()["extensions"] == ["binary_tensor_data"]
    assert client.get("/v2/health/live").status_code == 200
    assert client.get("/v2/health/ready").status_code == 200
    meta = client.get(f"/v2/models/{LINE}").get_json()
    assert meta["platform"] == "onnxruntime_onnx" and meta["versions"] == ["1"]
    assert meta["inputs"] == [{"name": "readings", "datatype": "FP32", "shape": [-1, 4]}]
    assert {o["name"]: o["datatype"] for o in meta["outputs"]} == {
        "anomaly_score": "FP32",
        "is_anomaly": "BOOL",
    }
    assert client.get(f"/v2/models/{LINE}/versions/1").status_code == 200
    assert client.get(f"/v2/models/{LINE}/ready").status_code == 200
    assert "no version '2'" in error_of(client.get(f"/v2/models/{LINE}/versions/2"), 404)
    assert "does not exist" in error_of(client.get("/v2/models/ghost"), 404)
    wrong = error_of(client.get("/v2/models/smollm2-135m-instruct"), 400)
    assert "is a chat model (kind chat)" in wrong and "/v1/chat/completions" in wrong


def test_infer_json_nested_and_flat(client: FlaskClient, model_file: Path) -> None:
    score, flag = expected(READINGS, model_file.parent)
    nested = infer(client, {"id": "cam-7/42", "inputs": [readings_input()]})
    assert nested.status_code == 200, nested.data
    body = nested.get_json()
    assert body["id"] == "cam-7/42" and body["model_name"] == LINE
    outputs = {o["name"]: o for o in body["outputs"]}
    assert outputs["anomaly_score"]["shape"] == [3, 1]
    assert np.allclose(outputs["anomaly_score"]["data"], score.ravel())
    assert outputs["is_anomaly"]["data"] == flag.ravel().tolist() == [False, True, True]
    flat = infer(client, {"inputs": [readings_input([v for row in READINGS for v in row])]})
    assert flat.get_json()["outputs"] == body["outputs"]


def test_output_selection_and_binary_output(client: FlaskClient, model_file: Path) -> None:
    score, _ = expected(READINGS, model_file.parent)
    one = infer(client, {"inputs": [readings_input()], "outputs": [{"name": "is_anomaly"}]})
    assert [o["name"] for o in one.get_json()["outputs"]] == ["is_anomaly"]
    binary = infer(
        client, {"inputs": [readings_input()], "parameters": {"binary_data_output": True}}
    )
    assert binary.mimetype == "application/octet-stream"
    length = int(binary.headers[HEADER])
    header = json.loads(binary.data[:length])
    first = header["outputs"][0]
    assert first["name"] == "anomaly_score" and "data" not in first
    size = first["parameters"]["binary_data_size"]
    assert np.array_equal(
        np.frombuffer(binary.data[length : length + size], np.float32), score.ravel()
    )


def test_binary_input(client: FlaskClient, model_file: Path) -> None:
    raw = np.array(READINGS, dtype=np.float32).tobytes()
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "readings",
                    "shape": [3, 4],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": len(raw)},
                }
            ]
        }
    ).encode()
    resp = client.post(
        f"/v2/models/{LINE}/infer",
        data=header + raw,
        headers={HEADER: str(len(header)), "Content-Type": "application/octet-stream"},
    )
    assert resp.status_code == 200, resp.data
    score, _ = expected(READINGS, model_file.parent)
    assert np.allclose(resp.get_json()["outputs"][0]["data"], score.ravel())
    short = client.post(
        f"/v2/models/{LINE}/infer", data=header + raw[:-4], headers={HEADER: str(len(header))}
    )
    assert "runs past" in error_of(short, 400)


@pytest.mark.parametrize(
    ("body", "fragments"),
    [
        ({"inputs": [readings_input(datatype="FP64")]}, ["'readings'", "FP64", "FP32"]),
        ({"inputs": [readings_input(shape=[4, 3])]}, ["'readings'", "[4, 3]", "[-1, 4]"]),
        ({"inputs": [readings_input(shape=[3, 4, 1])]}, ["[3, 4, 1]", "[-1, 4]"]),
        ({"inputs": [readings_input(name="reading")]}, ["unknown input 'reading'", "readings"]),
        ({"inputs": []}, ["non-empty 'inputs'"]),
        ({"inputs": [readings_input(data=[1, 2, 3])]}, ["needs 12 elements", "data has 3"]),
        ({"inputs": [readings_input(data=["a"] * 12)]}, ["FP32 data must be numbers"]),
        ({"inputs": [readings_input(), readings_input()]}, ["given twice"]),
        (
            {"inputs": [readings_input()], "outputs": [{"name": "score"}]},
            ["unknown output 'score'", "anomaly_score"],
        ),
        (
            {"inputs": [{"name": "readings", "shape": [-1, 4], "datatype": "FP32", "data": []}]},
            ["non-negative integers"],
        ),
    ],
)
def test_bad_tensors_are_400_naming_what_is_wrong(
    client: FlaskClient, body: dict[str, Any], fragments: list[str]
) -> None:
    message = error_of(infer(client, body), 400)
    for fragment in fragments:
        assert fragment in message


def test_malformed_requests(client: FlaskClient) -> None:
    bad_json = client.post(f"/v2/models/{LINE}/infer", data=b"{", content_type="application/json")
    assert "not valid JSON" in error_of(bad_json, 400)
    bad_length = client.post(f"/v2/models/{LINE}/infer", data=b"{}", headers={HEADER: "99"})
    assert "99" in error_of(bad_length, 400)


def serve_graph(tmp_path: Path, graph: Any, name: str) -> Iterator[tuple[Flask, dict[str, str]]]:
    """An app with the ONNX graph imported as model ``name`` into a fresh state, and a
    line token's header; closed after."""
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    source = tmp_path / f"{name}.onnx"
    source.write_bytes(model.SerializeToString())
    settings = load_settings(env={}, overrides={"state_dir": tmp_path / "state"})
    import_model(settings, source, name, domain="test")
    app = create_app(settings)
    store = AuthStore(settings)
    token = store.create_token("t", "line")["token"]
    store.close()
    yield app, {"Authorization": f"Bearer {token}"}
    close_app(app)


@pytest.fixture
def two_input_app(tmp_path: Path) -> Iterator[tuple[Flask, dict[str, str]]]:
    """A model with two inputs (FP32 x and y, BOOL mask) imported into a fresh state."""
    graph = helper.make_graph(
        [
            helper.make_node("Add", ["x", "y"], ["sum"]),
            helper.make_node("Not", ["mask"], ["flipped"]),
        ],
        "pair",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3]),
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3]),
            helper.make_tensor_value_info("mask", TensorProto.BOOL, ["n"]),
        ],
        [
            helper.make_tensor_value_info("sum", TensorProto.FLOAT, ["n", 3]),
            helper.make_tensor_value_info("flipped", TensorProto.BOOL, ["n"]),
        ],
    )
    yield from serve_graph(tmp_path, graph, "pair")


def test_missing_inputs_and_bool_data(two_input_app: tuple[Flask, dict[str, str]]) -> None:
    app, auth = two_input_app
    client = app.test_client()
    x = {"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}
    y = {"name": "y", "shape": [1, 3], "datatype": "FP32", "data": [10, 20, 30]}
    mask = {"name": "mask", "shape": [1], "datatype": "BOOL", "data": [True]}
    missing = infer(client, {"inputs": [x]}, model="pair", headers=auth)
    message = error_of(missing, 400)
    assert "missing input(s): y (FP32 [-1, 3]), mask (BOOL [-1])" in message
    not_bool = infer(client, {"inputs": [x, y, {**mask, "data": [1]}]}, model="pair", headers=auth)
    assert "BOOL data must be true or false" in error_of(not_bool, 400)
    ok = infer(client, {"inputs": [x, y, mask]}, model="pair", headers=auth).get_json()
    outputs = {o["name"]: o["data"] for o in ok["outputs"]}
    assert outputs == {"sum": [11.0, 22.0, 33.0], "flipped": [False]}


# Each OIP datatype beyond FP32 and BOOL, with values at its edges (as JSON gives them).
TYPED: dict[str, tuple[int, Any, list[Any]]] = {
    "INT8": (TensorProto.INT8, np.int8, [-128, 0, 127]),
    "INT16": (TensorProto.INT16, np.int16, [-32768, 1, 32767]),
    "INT32": (TensorProto.INT32, np.int32, [-(2**31), 7, 2**31 - 1]),
    "INT64": (TensorProto.INT64, np.int64, [-(2**63), 2**53 + 1, 2**63 - 1]),
    "UINT8": (TensorProto.UINT8, np.uint8, [0, 128, 255]),
    "UINT16": (TensorProto.UINT16, np.uint16, [0, 1, 65535]),
    "UINT32": (TensorProto.UINT32, np.uint32, [0, 1, 2**32 - 1]),
    "UINT64": (TensorProto.UINT64, np.uint64, [0, 2**53 + 1, 2**64 - 1]),
    "FP16": (TensorProto.FLOAT16, np.float16, [-65504.0, 0.099975586, 0.5]),
    "FP64": (TensorProto.DOUBLE, np.float64, [-1e300, 0.1, 2.0**-1074]),
    "BYTES": (TensorProto.STRING, np.object_, ["", "Zürich ward 7", "a\u0000b"]),
}


@pytest.fixture
def typed_app(tmp_path: Path) -> Iterator[tuple[Flask, dict[str, str]]]:
    """A model that gives back each input unchanged (ONNX Identity), one input of each
    datatype in TYPED, imported into a fresh state."""
    graph = helper.make_graph(
        [helper.make_node("Identity", [f"in_{t}"], [f"out_{t}"]) for t in TYPED],
        "identity",
        [helper.make_tensor_value_info(f"in_{t}", p, ["n"]) for t, (p, _, _) in TYPED.items()],
        [helper.make_tensor_value_info(f"out_{t}", p, ["n"]) for t, (p, _, _) in TYPED.items()],
    )
    yield from serve_graph(tmp_path, graph, "typed")


def test_every_datatype_round_trips_as_json_and_as_binary(
    typed_app: tuple[Flask, dict[str, str]],
) -> None:
    """Each datatype through the real onnxruntime and back, bit for bit: as JSON data,
    and as binary data (BYTES as length-prefixed elements), in the metadata as
    declared; a value its type cannot hold, or a fraction for an integer type, is a
    400 naming the input, never a 500 nor a silently changed number."""
    app, auth = typed_app
    client = app.test_client()
    meta = client.get("/v2/models/typed", headers=auth).get_json()
    assert {i["name"]: i["datatype"] for i in meta["inputs"]} == {f"in_{t}": t for t in TYPED}
    assert {o["name"]: o["datatype"] for o in meta["outputs"]} == {f"out_{t}": t for t in TYPED}

    inputs = [
        {"name": f"in_{t}", "shape": [3], "datatype": t, "data": values}
        for t, (_, _, values) in TYPED.items()
    ]
    resp = infer(client, {"inputs": inputs}, model="typed", headers=auth)
    assert resp.status_code == 200, resp.data
    outputs = {o["name"]: o for o in resp.get_json()["outputs"]}
    for t, (_, dtype, values) in TYPED.items():
        assert outputs[f"out_{t}"]["datatype"] == t and outputs[f"out_{t}"]["shape"] == [3]
        want = values if t == "BYTES" else np.array(values, dtype=dtype).tolist()
        assert outputs[f"out_{t}"]["data"] == want, t

    def blob(t: str) -> bytes:
        values = TYPED[t][2]
        if t == "BYTES":
            return b"".join(struct.pack("<I", len(v.encode())) + v.encode() for v in values)
        return np.array(values, dtype=TYPED[t][1]).tobytes()

    binary_inputs = [
        {"name": f"in_{t}", "shape": [3], "datatype": t, "parameters": {"binary_data_size": n}}
        for t, n in ((t, len(blob(t))) for t in TYPED)
    ]
    header = json.dumps(
        {"inputs": binary_inputs, "parameters": {"binary_data_output": True}}
    ).encode()
    resp = client.post(
        "/v2/models/typed/infer",
        data=header + b"".join(blob(t) for t in TYPED),
        headers={**auth, HEADER: str(len(header))},
        content_type="application/octet-stream",
    )
    assert resp.status_code == 200, resp.data
    length = int(resp.headers[HEADER])
    answer, rest = json.loads(resp.data[:length]), resp.data[length:]
    for out in answer["outputs"]:
        size = out["parameters"]["binary_data_size"]
        t = out["datatype"]
        assert rest[:size] == blob(t), t  # the same bytes back
        rest = rest[size:]
    assert rest == b""
    # BYTES reach a model as text: an element that is not UTF-8 is refused, by name.
    not_text = blob("BYTES").replace(b"Z", b"\xff")  # Zürich's Z: the same length
    resp = client.post(
        "/v2/models/typed/infer",
        data=header + b"".join(blob(t) for t in TYPED if t != "BYTES") + not_text,
        headers={**auth, HEADER: str(len(header))},
        content_type="application/octet-stream",
    )
    assert "'in_BYTES': a BYTES element is not UTF-8" in error_of(resp, 400)

    for t, bad, says in (
        ("INT8", 128, "out of bounds"),
        ("UINT8", -1, "out of bounds"),
        ("INT32", 1.5, "INT32 data must be whole numbers"),
        ("UINT64", 2**64, "in_UINT64"),
        ("INT64", "7", "INT64 data must be numbers"),
        ("BYTES", 7, "BYTES data must be strings"),
    ):
        wrong = [
            {**item, "data": [bad, *item["data"][1:]]} if item["name"] == f"in_{t}" else item
            for item in inputs
        ]
        refused = infer(client, {"inputs": wrong}, model="typed", headers=auth)
        message = error_of(refused, 400)
        assert f"in_{t}" in message and says in message, (t, message)


def test_tritonclient_against_the_real_server(
    server_factory: ServerFactory, state_dir: Path, model_file: Path
) -> None:
    server = server_factory(state_dir)
    client = triton.InferenceServerClient(url=f"127.0.0.1:{server.port}")

    def auth() -> dict[str, str]:
        return dict(server.auth)  # tritonclient writes into the headers it is given

    assert client.is_server_live(headers=auth()) and client.is_server_ready(headers=auth())
    assert client.is_model_ready(LINE, headers=auth())
    meta = client.get_model_metadata(LINE, headers=auth())
    assert meta["inputs"][0]["shape"] == [-1, 4]
    readings = np.array(READINGS, dtype=np.float32)
    score, flag = expected(READINGS, model_file.parent)
    for binary in (True, False):
        tensor = triton.InferInput("readings", list(readings.shape), "FP32")
        tensor.set_data_from_numpy(readings, binary_data=binary)
        wanted = [
            triton.InferRequestedOutput(n, binary_data=binary)
            for n in ("anomaly_score", "is_anomaly")
        ]
        result = client.infer(LINE, [tensor], outputs=wanted, headers=auth(), request_id="r1")
        assert np.allclose(result.as_numpy("anomaly_score"), score)
        assert np.array_equal(result.as_numpy("is_anomaly"), flag)
        assert result.get_response()["id"] == "r1"
    wrong = triton.InferInput("readings", [2, 3], "FP32")
    wrong.set_data_from_numpy(np.zeros((2, 3), dtype=np.float32))
    with pytest.raises(InferenceServerException, match=r"shape \[2, 3\]"):
        client.infer(LINE, [wrong], headers=auth())
    with pytest.raises(InferenceServerException, match="401"):
        client.get_model_metadata(LINE)  # no token
    server.stop()


def test_bytes_tensors_in_binary_form() -> None:
    from appliance.api.kserve import _bytes_elements

    blob = b"".join(struct.pack("<I", len(v)) + v for v in (b"ab", b"", b"xyz"))
    assert _bytes_elements(blob, 3, "t") == [b"ab", b"", b"xyz"]


def test_metrics_parse_and_move(client: FlaskClient) -> None:
    def count() -> float:
        text = client.get("/metrics").get_data(as_text=True)
        families = {f.name: f for f in text_string_to_metric_families(text)}
        total = 0.0
        for sample in families["appliance_requests"].samples:
            if (
                sample.name == "appliance_requests_total"
                and sample.labels["route"] == "/v2/models/<name>/infer"
            ):
                total += sample.value
        assert "appliance_model_loaded" in families
        assert "appliance_system_memory_available_bytes" in families
        assert "process_resident_memory_bytes" in families
        assert "appliance_queue_depth" in families
        return total

    before = count()
    for _ in range(3):
        infer(client, {"inputs": [readings_input()]})
    assert count() == before + 3


def test_tokens_metric_moves(client: FlaskClient, model_name: str) -> None:
    def tokens() -> float:
        text = client.get("/metrics").get_data(as_text=True)
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if (
                    sample.name == "appliance_tokens_generated_total"
                    and sample.labels.get("model") == model_name
                ):
                    return sample.value
        return 0.0

    before = tokens()
    client.post(
        "/v1/completions",
        json={"model": model_name, "prompt": "Hi", "max_tokens": 3, "ignore_eos": True},
    )
    assert tokens() == before + 3


def test_memory_admission_refuses_a_model_that_does_not_fit(
    tmp_path: Path, model_file: Path
) -> None:
    from helpers import make_state

    state = make_state(tmp_path / "state", model_file)
    settings = load_settings(env={}, overrides={"state_dir": state, "memory_limit_mb": 64})
    app = create_app(settings)
    try:
        pool = app.extensions["appliance.models"]
        reason = pool.refused()["smollm2-135m-instruct"]
        assert "needs about" in reason and "memory_limit_mb 64" in reason
        assert LINE in pool.loaded()  # the small one still fits
        ready = app.test_client().get("/readyz")
        assert ready.status_code == 503 and any(
            "needs about" in r for r in ready.get_json()["reasons"]
        )
        assert "needs about" in error_of(app.test_client().get("/v2/health/ready"), 503)
    finally:
        close_app(app)


def test_memory_pressure_gives_503(app: Flask, client: FlaskClient, model_name: str) -> None:
    pipeline = get_pipeline(app)
    settings = pipeline.settings
    # More than any machine has: the pipeline's check before each request trips.
    pipeline.settings = dataclasses.replace(settings, memory_reserve_mb=10**8)
    try:
        v2 = infer(client, {"inputs": [readings_input()]})
        assert "short of memory" in error_of(v2, 503)
        v1 = client.post("/v1/completions", json={"model": model_name, "prompt": "Hi"})
        assert v1.status_code == 503 and v1.get_json()["error"]["code"] == "memory_pressure"
    finally:
        pipeline.settings = settings


def test_doctor_on_this_machine(state_dir: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(main, ["doctor", "--json", "--state-dir", str(state_dir)])
    assert result.exit_code == 0, result.output
    checks = {c["name"]: c for c in json.loads(result.output)}
    for name in (
        "cpu features",
        "cpu cores",
        "memory",
        "disk for the audit log",
        "gpu",
        "master key",
        "signing key",
        "tls certificate",
        "audit chain",
        f"model {LINE}",
    ):
        assert name in checks
    assert checks["memory"]["status"] == "ok"
    key = state_dir / "keys" / "audit-master.key"
    key.parent.mkdir(mode=0o700, exist_ok=True)
    key.write_text(os.urandom(32).hex())
    os.chmod(key, 0o644)
    failed = runner.invoke(main, ["doctor", "--state-dir", str(state_dir)])
    assert failed.exit_code == 1
    assert "FAIL  master key" in failed.output and "0644" in failed.output


def test_line_model_build_is_reproducible(tmp_path: Path, model_file: Path) -> None:
    import subprocess
    import sys

    from helpers import REPO

    subprocess.run(
        [sys.executable, str(REPO / "models" / "line" / "build.py"), str(tmp_path)],
        check=True,
        capture_output=True,
    )
    assert (tmp_path / f"{LINE}.onnx").read_bytes() == (
        model_file.parent / f"{LINE}.onnx"
    ).read_bytes()
    onnx.checker.check_model(onnx.load(str(tmp_path / f"{LINE}.onnx")))
    assert (tmp_path / "MODEL_CARD.md").read_text() == (
        REPO / "models" / "line" / "MODEL_CARD.md"
    ).read_text()


def test_tensor_inference_leaves_its_record_pair(app: Flask, client: FlaskClient) -> None:
    from appliance.api.trail import get_store
    from appliance.audit.reader import records

    resp = infer(client, {"id": "cam-9", "inputs": [readings_input()]})
    request_id = resp.headers["X-Request-Id"]
    rows = [r for r in records(get_store(app)) if r["request_id"] == request_id]
    assert [r["kind"] for r in rows] == ["request", "outcome"]
    assert rows[1]["seq"] == rows[0]["seq"] + 1  # one commit, request first
    assert rows[0]["content"]["input"]["id"] == "cam-9"
    assert rows[0]["model_sha256"] == rows[1]["model_sha256"] != ""
    assert json.loads(rows[1]["content"]["output"])["is_anomaly"] == [False, True, True]
