"""llama.cpp's CPU kernels chosen at run time (issue #13): never the AMX ones on an
AMX CPU unless asked, a start-up self-test in a child process that a native crash
cannot take the server down with, and the choice shown where IT looks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from appliance.engines import kernels, selftest
from appliance.engines.kernels import KernelError, Variant, choose

from helpers import ServerFactory, audit_rows, make_state, metric, run_cli, wait_for

P = Path("/x")
HELLO = [{"role": "user", "content": "Hi"}]
# Scores as ggml_backend_score() gives them: 0 where the CPU lacks a feature.
AMX_CPU = [
    Variant("sapphirerapids", P, 90, amx=True),
    Variant("zen4", P, 80, amx=False),
    Variant("haswell", P, 20, amx=False),
    Variant("x64", P, 1, amx=False),
]
AVX2_CPU = [
    Variant("haswell", P, 20, amx=False),
    Variant("x64", P, 1, amx=False),
    Variant("sapphirerapids", P, 0, amx=True),
    Variant("zen4", P, 0, amx=False),
]


def test_auto_never_picks_amx_on_an_amx_cpu() -> None:
    chosen, reason = choose("auto", AMX_CPU, cpu_amx=True)
    assert chosen.name == "zen4"
    assert "AMX" in reason and "#20824" in reason and "sapphirerapids" in reason


def test_auto_takes_the_best_variant_elsewhere() -> None:
    assert choose("auto", AVX2_CPU, cpu_amx=False)[0].name == "haswell"
    # An AMX variant that scores best where the CPU reports no AMX flags is no risk.
    assert choose("auto", AMX_CPU, cpu_amx=False)[0].name == "sapphirerapids"


def test_amx_setting_allows_the_amx_variant() -> None:
    assert choose("amx", AMX_CPU, cpu_amx=True)[0].name == "sapphirerapids"


def test_named_variant_must_exist_and_run_here() -> None:
    assert choose("x64", AMX_CPU, cpu_amx=True)[0].name == "x64"
    with pytest.raises(KernelError, match="'zen4', which this CPU cannot run"):
        choose("zen4", AVX2_CPU, cpu_amx=False)
    with pytest.raises(KernelError, match="'pentium'; this build has auto, amx and haswell"):
        choose("pentium", AVX2_CPU, cpu_amx=False)
    with pytest.raises(KernelError, match="no CPU variant"):
        choose("auto", [Variant("zen4", P, 0, amx=False)], cpu_amx=False)


# ggml's x86 CPU variants (ggml/src/CMakeLists.txt) with the features each needs, and
# the weight ggml's score gives each feature (ggml-cpu/arch/x86/cpu-feats.cpp), as
# /proc/cpuinfo names them: the expectation is read from the CPU, not from the build.
_FEATURES = {
    "FMA": (1, {"fma"}),
    "F16C": (1 << 1, {"f16c"}),
    "SSE42": (1 << 2, {"sse4_2"}),
    "BMI2": (1 << 3, {"bmi2"}),
    "AVX": (1 << 4, {"avx"}),
    "AVX2": (1 << 5, {"avx2"}),
    "AVX_VNNI": (1 << 6, {"avx_vnni"}),
    "AVX512": (1 << 7, {"avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw"}),
    "AVX512_VBMI": (1 << 8, {"avx512vbmi"}),
    "AVX512_BF16": (1 << 9, {"avx512_bf16"}),
    "AVX512_VNNI": (1 << 10, {"avx512_vnni"}),
}
_HASWELL = "SSE42 AVX F16C FMA AVX2 BMI2"
_VARIANTS = {  # every variant but the AMX one (sapphirerapids), which auto never picks
    "x64": "",
    "sse42": "SSE42",
    "sandybridge": "SSE42 AVX",
    "ivybridge": "SSE42 AVX F16C",
    "piledriver": "SSE42 AVX F16C FMA",
    "haswell": _HASWELL,
    "skylakex": f"{_HASWELL} AVX512",
    "cannonlake": f"{_HASWELL} AVX512 AVX512_VBMI",
    "cascadelake": f"{_HASWELL} AVX512 AVX512_VNNI",
    "icelake": f"{_HASWELL} AVX512 AVX512_VBMI AVX512_VNNI",
    "cooperlake": f"{_HASWELL} AVX512 AVX512_VNNI AVX512_BF16",
    "zen4": f"{_HASWELL} AVX512 AVX512_VBMI AVX512_VNNI AVX512_BF16",
    "alderlake": f"{_HASWELL} AVX_VNNI",
}


def _expected_variant(flags: set[str]) -> str:
    """What a reader of /proc/cpuinfo expects ggml's best non-AMX variant to be: the
    highest score among the variants whose features the CPU has (ties: by name)."""
    scores = {
        name: 1 + sum(_FEATURES[f][0] for f in needs.split())
        for name, needs in _VARIANTS.items()
        if all(_FEATURES[f][1] <= flags for f in needs.split())
    }
    return min(scores, key=lambda name: (-scores[name], name))


def test_the_expected_variant_follows_ggml_s_features() -> None:
    """The expectation above, on the CPUs the CI hosts have been and a few more."""
    haswell = {"sse4_2", "avx", "f16c", "fma", "avx2", "bmi2"}
    avx512 = haswell | {"avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw"}
    zen4 = avx512 | {"avx512vbmi", "avx512_vnni", "avx512_bf16"}
    assert _expected_variant(zen4 | {"amx_int8", "amx_tile", "avx_vnni"}) == "zen4"
    assert _expected_variant(avx512 | {"avx512_vnni", "avx512_bf16"}) == "cooperlake"
    assert _expected_variant(avx512 | {"avx512_vnni"}) == "cascadelake"
    assert _expected_variant(avx512 | {"avx512vbmi"}) == "cannonlake"
    assert _expected_variant(avx512) == "skylakex"
    assert _expected_variant(haswell | {"avx_vnni"}) == "alderlake"
    assert _expected_variant(haswell) == "haswell"
    assert _expected_variant({"sse4_2", "avx", "f16c"}) == "ivybridge"
    assert _expected_variant({"sse4_2"}) == "sse42"
    assert _expected_variant(set()) == "x64"


def test_the_build_is_split_into_cpu_variants() -> None:
    """The installed llama.cpp carries a variant per CPU generation, scores them on
    this CPU, and only the AMX variant exports AMX kernels."""
    found = {v.name: v for v in kernels.variants(kernels.library_dir())}
    assert {"x64", "haswell", "skylakex", "icelake", "zen4", "sapphirerapids"} <= set(found)
    assert found["x64"].score > 0
    assert found["sapphirerapids"].amx and not found["zen4"].amx and not found["haswell"].amx
    flags = kernels.cpu_flags()
    assert (found["haswell"].score > 0) == ("avx2" in flags)
    assert (found["sapphirerapids"].score > 0) == ("amx_int8" in flags)


def test_selftest_decodes_in_a_child(model_file: Path) -> None:
    outcome, attempts = selftest.check(model_file, "auto", True, 0)
    assert outcome.ok and outcome.extra_buffers, outcome.detail
    assert len(attempts) == 1 and outcome.detail == f"decoded {selftest.DECODE_TOKENS} tokens"


def test_selftest_falls_back_when_the_fast_path_crashes(
    model_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(selftest.FAULT_ENV, "extra-buffers")
    outcome, attempts = selftest.check(model_file, "auto", True, 0)
    assert [a.ok for a in attempts] == [False, True]
    assert attempts[0].detail.startswith("killed by SIGABRT")
    assert outcome.ok and not outcome.extra_buffers
    monkeypatch.setenv(selftest.FAULT_ENV, "always")
    outcome, attempts = selftest.check(model_file, "auto", True, 0)
    assert not outcome.ok and len(attempts) == 2


def _card(server_url: str, auth: dict[str, str], name: str) -> dict[str, object]:
    card: dict[str, object] = httpx.get(
        f"{server_url}/v1/models/{name}", headers=auth, timeout=10
    ).json()
    return card


@pytest.mark.server
def test_server_shows_its_kernels_everywhere(shared_server: object, model_name: str) -> None:
    from helpers import Server

    assert isinstance(shared_server, Server)
    kernels_row = _card(shared_server.url, shared_server.auth, model_name)["kernels"]
    assert isinstance(kernels_row, dict)
    assert kernels_row["variant"] == _expected_variant(kernels.cpu_flags())
    assert kernels_row["extra_buffers"] is True
    assert kernels_row["selftest"].startswith("self-test passed")
    chosen = [r for r in shared_server.log_records() if r.get("msg") == "llama.cpp kernels chosen"]
    assert chosen and chosen[0]["variant"] == kernels_row["variant"]
    metrics = httpx.get(f"{shared_server.url}/metrics", timeout=10).text
    assert (
        f'appliance_llama_kernels{{extra_buffers="true",model="{model_name}",'
        f'variant="{kernels_row["variant"]}"}} 1.0' in metrics
    )
    page = httpx.get(f"{shared_server.url}/status", headers=shared_server.auth, timeout=30)
    assert f"{kernels_row['variant']}, extra buffers on" in page.text
    assert "llama.cpp kernels" in page.text
    # Where its layers run (gpu_layers = 0, the default): all on the CPU, said so.
    placement = _card(shared_server.url, shared_server.auth, model_name)["placement"]
    assert placement == {
        "gpu_layers": 0,
        "layers": 31,
        "offloaded": 0,
        "devices": [],
        "reason": "gpu_layers = 0: every layer runs on the CPU",
    }
    assert metric(shared_server, "appliance_llama_layers", model=model_name, on="cpu") == 31
    assert metric(shared_server, "appliance_llama_layers", model=model_name, on="gpu") == 0
    assert "CPU: gpu_layers = 0: every layer runs on the CPU" in page.text


@pytest.mark.server
def test_a_gpu_asked_for_and_not_seen_is_said_everywhere(
    tmp_path: Path, model_file: Path, model_name: str, server_factory: ServerFactory
) -> None:
    """gpu_layers = -1 where llama.cpp sees no GPU (a CPU-only build; on a GPU host,
    hidden from CUDA): the model answers from the CPU, and the log, /v1/models,
    /metrics, /status and doctor say that the GPU setting is not in effect."""
    state = make_state(tmp_path / "state", model_file)
    hidden = {"APPLIANCE_GPU_LAYERS": "-1", "CUDA_VISIBLE_DEVICES": ""}
    server = server_factory(state, env=hidden)
    placement = _card(server.url, server.auth, model_name)["placement"]
    assert isinstance(placement, dict)
    assert (placement["gpu_layers"], placement["offloaded"]) == (-1, 0)
    assert str(placement["reason"]).startswith("gpu_layers = -1, but llama.cpp sees no GPU")
    warned = [r for r in server.log_records() if r.get("level") == "warning"]
    assert any(str(r["msg"]).startswith("model placed on the CPU: gpu_layers = -1") for r in warned)
    assert metric(server, "appliance_llama_layers", model=model_name, on="cpu") == 31
    assert metric(server, "appliance_gpu_memory_bytes", default=-1) == -1  # no GPU, no gauge
    page = server.http.get("/status", timeout=30).text
    assert "CPU: gpu_layers = -1, but llama.cpp sees no GPU" in page
    answer = server.http.post(
        "/v1/chat/completions",
        json={
            "model": model_name,
            "max_tokens": 4,
            "messages": [{"role": "user", "content": "Hi"}],
        },
    )
    assert answer.status_code == 200, answer.text
    doctor = run_cli("doctor", "--json", state=state, env=hidden)
    gpu = {c["name"]: c for c in json.loads(doctor.stdout)}["gpu"]
    assert gpu["status"] == "warn", gpu
    assert gpu["detail"].startswith("gpu_layers = -1, but llama.cpp sees no GPU"), gpu


def test_a_model_on_the_cpu_is_given_no_gpu(model_file: Path) -> None:
    """gpu_layers = 0: llama.cpp's device list is emptied (one device, none chosen), so
    no GPU backend starts for the model, and none takes its prompt batches (op_offload
    would hand a CPU layer's batch of 32+ tokens to any GPU it sees)."""
    import llama_cpp

    from appliance.engines.llama import LlamaEngine

    cases = ((0, llama_cpp.LLAMA_SPLIT_MODE_NONE, -1), (-1, llama_cpp.LLAMA_SPLIT_MODE_LAYER, 0))
    for gpu_layers, split, main in cases:
        engine = LlamaEngine(model_file, 256, 1, gpu_layers)
        try:
            params = engine._model.params
            assert (params.split_mode, params.main_gpu) == (split, main), gpu_layers
        finally:
            engine.close()


def test_importing_the_appliance_puts_the_cpp_runtime_in_the_global_scope() -> None:
    """So that llama.cpp's libraries bind std:: symbols to one libstdc++ (see
    appliance/__init__.py); a plain interpreter has none there."""
    probe = "import ctypes{}; print(hasattr(ctypes.CDLL(None), '_ZNSt6locale7classicEv'))"
    found = [
        subprocess.run(
            [sys.executable, "-c", probe.format(extra)], capture_output=True, text=True, check=True
        ).stdout.strip()
        for extra in ("", ", appliance")
    ]
    assert found == ["False", "True"]


@pytest.mark.server
def test_server_survives_a_crashing_kernel_path(
    tmp_path: Path, model_file: Path, model_name: str, server_factory: ServerFactory
) -> None:
    """A child that dies on the fast path: the server loads the model on the safe path,
    says why, and answers."""
    state = make_state(tmp_path / "state", model_file)
    server = server_factory(state, env={selftest.FAULT_ENV: "extra-buffers"})
    card = _card(server.url, server.auth, model_name)
    kernels_row = card["kernels"]
    assert isinstance(kernels_row, dict)
    assert kernels_row["extra_buffers"] is False
    assert "safe path" in kernels_row["selftest"] and "SIGABRT" in kernels_row["selftest"]
    failures = [r for r in server.log_records() if r.get("msg", "").startswith("self-test failed")]
    assert failures and "SIGABRT" in str(failures[0]["child"])
    answer = httpx.post(
        f"{server.url}/v1/chat/completions",
        headers=server.auth,
        json={
            "model": model_name,
            "max_tokens": 4,
            "temperature": 0,
            "messages": [{"role": "user", "content": "Hello"}],
        },
        timeout=60,
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["usage"]["completion_tokens"] > 0
    # The audit log's load record says the same, for an auditor: kernels and where.
    load = _load_record(state, model_name)
    assert load["content"]["kernels"] == kernels_row
    assert load["content"]["placement"]["offloaded"] == 0


def _load_record(state: Path, model_name: str) -> dict[str, Any]:
    loads = [
        r
        for r in audit_rows(state)
        if (r["route"], r["method"], r["model"]) == ("models", "LOAD", model_name)
    ]
    assert len(loads) == 1, loads
    return loads[0]


@pytest.mark.server
@pytest.mark.skipif(
    not kernels.AMX_FLAGS & kernels.cpu_flags(), reason="this CPU has no AMX (amx_* flags)"
)
def test_amx_asked_for_on_an_amx_cpu_is_guarded_by_the_selftest(
    tmp_path: Path, model_file: Path, model_name: str, server_factory: ServerFactory
) -> None:
    """cpu_kernels = amx on a CPU with AMX, no fault injected: llama.cpp's own AMX
    kernels. Seen on a 2-core Xeon VM (amx_tile, amx_int8, amx_bf16): they die with
    SIGILL on the first prompt batch, in-process and in the self-test's child. The
    server loads the AMX variant, keeps AMX's extra buffers only if the self-test
    decoded with them, and answers a prompt long enough for the batched kernels
    either way, staying up."""
    state = make_state(tmp_path / "state", model_file)
    server = server_factory(state, env={"APPLIANCE_CPU_KERNELS": "amx"})
    kernels_row = _card(server.url, server.auth, model_name)["kernels"]
    assert isinstance(kernels_row, dict)
    assert kernels_row["variant"] == "sapphirerapids", kernels_row
    failures = [r for r in server.log_records() if r.get("msg", "").startswith("self-test failed")]
    if kernels_row["extra_buffers"]:  # AMX decoded here: the self-test let it stay
        assert kernels_row["selftest"].startswith("self-test passed") and not failures
    else:
        assert "safe path" in kernels_row["selftest"], kernels_row
        assert failures and "killed by" in str(failures[0]["child"]), failures
    question = "How should a hospital keep patient records safe? " * 6  # > 32 tokens
    answer = server.http.post(
        "/v1/chat/completions",
        json={
            "model": model_name,
            "max_tokens": 8,
            "temperature": 0,
            "messages": [{"role": "user", "content": question}],
        },
        timeout=60,
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["usage"]["prompt_tokens"] > 48
    assert server.proc.poll() is None
    assert _load_record(state, model_name)["content"]["kernels"] == kernels_row


@pytest.mark.server
def test_server_refuses_a_model_whose_every_path_crashes(
    tmp_path: Path, model_file: Path, model_name: str, server_factory: ServerFactory
) -> None:
    state = make_state(tmp_path / "state", model_file)
    server = server_factory(state, env={selftest.FAULT_ENV: "always"})
    ready = httpx.get(f"{server.url}/readyz", timeout=10)
    assert ready.status_code == 503
    refused = next(m for m in ready.json()["models"] if m["name"] == model_name)
    assert refused["state"] == "refused"
    assert "self-test crashed on every kernel path" in refused["reason"]
    assert "SIGABRT" in refused["reason"]
    assert wait_for(lambda: server.proc.poll() is None, 1)


def test_doctor_runs_the_selftest(tmp_path: Path, model_file: Path, model_name: str) -> None:
    state = make_state(tmp_path / "state", model_file)
    result = run_cli("doctor", "--json", state=state)
    checks = {c["name"]: c for c in json.loads(result.stdout)}
    assert checks["llama.cpp kernels"]["status"] == "ok"
    assert _expected_variant(kernels.cpu_flags()) in checks["llama.cpp kernels"]["detail"]
    assert checks[f"self-test {model_name}"]["status"] == "ok"
    assert result.returncode == 0, result.stdout
    crashing = run_cli("doctor", "--json", state=state, env={selftest.FAULT_ENV: "extra-buffers"})
    warned = {c["name"]: c for c in json.loads(crashing.stdout)}[f"self-test {model_name}"]
    assert warned["status"] == "warn" and "SIGABRT" in warned["detail"]
    broken = run_cli("doctor", "--json", state=state, env={selftest.FAULT_ENV: "always"})
    failed = {c["name"]: c for c in json.loads(broken.stdout)}[f"self-test {model_name}"]
    assert failed["status"] == "fail" and broken.returncode == 1
