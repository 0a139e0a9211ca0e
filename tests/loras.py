"""LoRA adapters made by the tests, in llama.cpp's GGUF adapter format (the `gguf`
package writes it): random low-rank updates of a base model's attention projections,
strong enough at scale 1 to change a greedy answer."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

from appliance.gguf import read_info


def write_lora(
    path: Path,
    base: Path,
    rank: int = 4,
    alpha: float = 4.0,
    seed: int = 0,
    strength: float = 0.5,
    architecture: str | None = None,
) -> Path:
    """An adapter for ``base`` (a GGUF chat model) on every layer's attn_q and attn_v:
    lora_a is [rank, n_embd], lora_b [out, rank] as numpy holds them (ggml's ne order
    reversed), which is what llama.cpp checks against the base's tensors."""
    info = read_info(base)
    assert info.layers and info.embedding and info.heads
    head_dim = info.embedding // info.heads
    outs = {"attn_q": info.heads * head_dim, "attn_v": (info.kv_heads or info.heads) * head_dim}
    writer = gguf.GGUFWriter(str(path), architecture or info.architecture or "llama")
    writer.add_string("general.type", "adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", alpha)
    rng = np.random.default_rng(seed)
    for layer in range(info.layers):
        for name, out in outs.items():
            a = rng.standard_normal((rank, info.embedding)).astype(np.float32) * strength
            b = rng.standard_normal((out, rank)).astype(np.float32) * strength
            writer.add_tensor(f"blk.{layer}.{name}.weight.lora_a", a)
            writer.add_tensor(f"blk.{layer}.{name}.weight.lora_b", b)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
