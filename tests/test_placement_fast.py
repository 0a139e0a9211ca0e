"""Where a language model's layers run for a gpu_layers setting (appliance/engines/
devices.py): llama.cpp's own rule, applied to the GPUs it sees, in the words shown in
/v1/models, /status, /metrics, the log and `appliance doctor`."""

from __future__ import annotations

from appliance.engines.devices import Device, placement

H200 = Device("CUDA0", "NVIDIA H200", free_bytes=140 << 30, total_bytes=141 << 30)
L4 = Device("CUDA1", "NVIDIA L4", free_bytes=20 << 30, total_bytes=24 << 30)


def test_zero_keeps_every_layer_on_the_cpu_even_with_a_gpu() -> None:
    p = placement(0, 30, [H200])
    assert (p.layers, p.offloaded, p.devices) == (31, 0, [])
    assert p.reason == "gpu_layers = 0: every layer runs on the CPU"
    assert not p.wanted_gpu


def test_all_layers_count_the_output_layer() -> None:
    p = placement(-1, 30, [H200])
    assert (p.layers, p.offloaded) == (31, 31)
    assert p.devices == ["CUDA0 (NVIDIA H200)"]
    assert p.reason == "31/31 layers on CUDA0 (NVIDIA H200)"


def test_some_layers_split_with_the_cpu_and_more_than_there_are_means_all() -> None:
    p = placement(10, 30, [H200, L4])
    assert p.offloaded == 10
    assert p.reason == "10/31 layers on CUDA0 (NVIDIA H200), CUDA1 (NVIDIA L4); 21 on the CPU"
    assert placement(99, 30, [H200]).offloaded == 31


def test_an_integrated_gpu_serves_only_where_no_discrete_one_is() -> None:
    igpu = Device("Vulkan0", "Intel Arc", 1 << 30, 2 << 30, integrated=True)
    assert placement(-1, 30, [igpu, H200]).devices == ["CUDA0 (NVIDIA H200)"]
    assert placement(-1, 30, [igpu]).devices == ["Vulkan0 (Intel Arc)"]


def test_a_gpu_asked_for_and_not_seen_is_said() -> None:
    p = placement(-1, 30, [])
    assert (p.offloaded, p.devices) == (0, [])
    assert p.wanted_gpu
    assert p.reason.startswith("gpu_layers = -1, but llama.cpp sees no GPU")
    assert p.reason.endswith("every layer runs on the CPU")
