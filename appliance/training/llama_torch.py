"""A llama-architecture model in torch, built from a GGUF file's own weights
(dequantized) and laid out as llama.cpp lays them out: Q and K rows as the GGUF holds
them, rotary embeddings over adjacent pairs (llama.cpp's "normal" rope). An adapter
trained on this layout is what llama.cpp applies, with no permutation to undo.

LoRA sits on the projections named in ``targets``: y = W x + (alpha / r) * B (A x),
with A (r, in) and B (out, r) as the GGUF adapter format stores them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
from torch import nn

PROJECTIONS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


@dataclass(frozen=True)
class Shape:
    layers: int
    embd: int
    heads: int
    kv_heads: int
    ff: int
    vocab: int
    rope_base: float
    eps: float

    @property
    def head_dim(self) -> int:
        return self.embd // self.heads


def _field(reader: gguf.GGUFReader, key: str) -> object:
    field = reader.fields.get(key)
    if field is None:
        raise ValueError(f"the GGUF has no {key}")
    return field.contents()


def read_weights(path: Path) -> tuple[Shape, dict[str, torch.Tensor]]:
    """The model's shape and every tensor, dequantized to float32."""
    reader = gguf.GGUFReader(str(path))
    arch = str(_field(reader, "general.architecture"))
    if arch != "llama":
        raise ValueError(f"training supports the llama architecture; {path.name} is {arch!r}")

    def number(key: str) -> float:
        value = _field(reader, f"{arch}.{key}")
        assert isinstance(value, int | float)
        return float(value)

    tensors: dict[str, torch.Tensor] = {}
    for tensor in reader.tensors:
        data = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        shape = [int(d) for d in reversed(tensor.shape)]  # numpy order: (out, in)
        tensors[tensor.name] = torch.from_numpy(np.array(data, np.float32).reshape(shape))
    embd = int(number("embedding_length"))
    shape_ = Shape(
        layers=int(number("block_count")),
        embd=embd,
        heads=int(number("attention.head_count")),
        kv_heads=int(number("attention.head_count_kv")),
        ff=int(number("feed_forward_length")),
        vocab=int(tensors["token_embd.weight"].shape[0]),
        rope_base=number("rope.freq_base"),
        eps=number("attention.layer_norm_rms_epsilon"),
    )
    return shape_, tensors


class Lora(nn.Module):
    def __init__(self, inputs: int, outputs: int, rank: int, alpha: float, seed: int) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        # A small and random, B zero: training starts from the base model exactly.
        self.a = nn.Parameter(torch.randn(rank, inputs, generator=generator) / math.sqrt(inputs))
        self.b = nn.Parameter(torch.zeros(outputs, rank))
        self.scale = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.a.T) @ self.b.T * self.scale


class LlamaLora(nn.Module):
    """The frozen base, and the trainable adapters (``self.loras``)."""

    def __init__(
        self,
        shape: Shape,
        weights: dict[str, torch.Tensor],
        targets: tuple[str, ...] = ("attn_q", "attn_v"),
        rank: int = 8,
        alpha: float = 16.0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        unknown = set(targets) - set(PROJECTIONS)
        if unknown:
            raise ValueError(f"unknown target(s) {sorted(unknown)}; known: {PROJECTIONS}")
        self.shape, self.w, self.targets = shape, weights, targets
        self.rank, self.alpha = rank, alpha
        self.loras = nn.ModuleDict()
        for layer in range(shape.layers):
            for target in targets:
                out, inp = weights[f"blk.{layer}.{target}.weight"].shape
                key = f"blk.{layer}.{target}"
                self.loras[key.replace(".", "_")] = Lora(inp, out, rank, alpha, seed + layer)
        half = shape.head_dim // 2
        inv = shape.rope_base ** (-torch.arange(half, dtype=torch.float32) * 2 / shape.head_dim)
        self.register_buffer("inv_freq", inv, persistent=False)

    def _proj(self, layer: int, name: str, x: torch.Tensor) -> torch.Tensor:
        y = x @ self.w[f"blk.{layer}.{name}.weight"].T
        lora = self.loras[f"blk_{layer}_{name}"] if name in self.targets else None
        return y + lora(x) if lora is not None else y

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.shape.eps) * weight

    def _rope(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # Adjacent pairs (x0, x1), (x2, x3)... rotated: llama.cpp's normal rope.
        inv_freq: torch.Tensor = self.inv_freq  # type: ignore[assignment]  # a buffer
        angles = positions[:, None].float() * inv_freq[None, :]  # (T, half)
        cos, sin = angles.cos()[:, None, :], angles.sin()[:, None, :]  # over the heads
        even, odd = x[..., 0::2], x[..., 1::2]
        rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
        return rotated.flatten(-2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits (batch, T, vocab) for token ids (batch, T); causal attention."""
        return self.logits(self.hidden(ids))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        head = self.w.get("output.weight", self.w["token_embd.weight"])
        return hidden @ head.T

    def hidden(self, ids: torch.Tensor) -> torch.Tensor:
        """The last layer's normalised states (batch, T, embd): training projects only
        the answers' positions onto the vocabulary (a fifth of the model's work)."""
        s = self.shape
        batch, length = ids.shape
        x = self.w["token_embd.weight"][ids]
        positions = torch.arange(length)
        mask = torch.full((length, length), float("-inf")).triu(1)
        for layer in range(s.layers):
            h = self._norm(x, self.w[f"blk.{layer}.attn_norm.weight"])
            q = self._proj(layer, "attn_q", h).view(batch, length, s.heads, s.head_dim)
            k = self._proj(layer, "attn_k", h).view(batch, length, s.kv_heads, s.head_dim)
            v = self._proj(layer, "attn_v", h).view(batch, length, s.kv_heads, s.head_dim)
            q, k = self._rope(q, positions), self._rope(k, positions)
            repeat = s.heads // s.kv_heads
            k = k.repeat_interleave(repeat, dim=2)
            v = v.repeat_interleave(repeat, dim=2)
            scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(s.head_dim) + mask
            attended = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)
            x = x + self._proj(layer, "attn_output", attended.reshape(batch, length, s.embd))
            h = self._norm(x, self.w[f"blk.{layer}.ffn_norm.weight"])
            gate = nn.functional.silu(self._proj(layer, "ffn_gate", h))
            x = x + self._proj(layer, "ffn_down", gate * self._proj(layer, "ffn_up", h))
        return self._norm(x, self.w["output_norm.weight"])

    def adapter_tensors(self) -> dict[str, np.ndarray]:
        """The adapters in the GGUF adapter format's names and layout."""
        out: dict[str, np.ndarray] = {}
        for key, lora in self.loras.items():
            layer, name = key.split("_", 2)[1], key.split("_", 2)[2]
            assert isinstance(lora, Lora)
            out[f"blk.{layer}.{name}.weight.lora_a"] = lora.a.detach().numpy().copy()
            out[f"blk.{layer}.{name}.weight.lora_b"] = lora.b.detach().numpy().copy()
        return out
