"""Sentence embeddings through onnxruntime: a BERT-style encoder (all-MiniLM-L6-v2 with
int8 weights) and its `tokenizers` WordPiece tokenizer. A text's vector is the mean of
the encoder's last hidden state over its real tokens, scaled to unit length, as
sentence-transformers computes it for this model.

Texts are run in padded batches. Measured on this model (onnxruntime 1.32, AVX-512 and
one or two threads): a text's vector inside a padded batch of 32 mixed-length texts is
bit-for-bit the one it gets alone. The weights are int8 but dequantized into fp32 once
(Cast and Mul on initializers, no DynamicQuantizeLinear), so no scale is computed over the
batch, and padded positions add exact zeros to every sum (their attention weight is 0).
tests/test_embed_engine.py holds the engine to that: alone and in a batch within 1e-5.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from appliance.engines.onnx import open_session

# Texts are sorted by length and run in groups of at most this many padded tokens
# (texts x longest). Measured on two cores, one or two threads: for 32 short texts,
# groups of 128-256 tokens ran 25-35% faster than one text per run and 15% faster than
# one padded batch of 32; for 32 texts of mixed length they ran as fast as one text per
# run and twice as fast as one padded batch, whose work on padding outweighs the gain.
TOKENS_PER_RUN = 256


class EmbeddingEngine:
    """One onnxruntime session and one tokenizer. embed() is safe from several request
    threads at once: session.run() is thread-safe and nothing here changes after
    __init__."""

    def __init__(
        self, model_path: Path, tokenizer_path: Path, threads: int, max_input_tokens: int = 256
    ) -> None:
        tokenizer = Tokenizer.from_file(str(tokenizer_path))
        # tokenizer.json files often carry the exporter's truncation and fixed padding
        # (this one: 128 and 128); the caller must see every token to reject long
        # inputs, and padding is done here per group.
        tokenizer.no_truncation()
        tokenizer.no_padding()
        self._tokenizer = tokenizer
        # The special tokens around one sequence, read from the tokenizer's own
        # template, so that wrap_ids(ids) is exactly what tokenize() gives for a text.
        bare = tokenizer.encode("a", add_special_tokens=False).ids
        wrapped = tokenizer.encode("a").ids
        start = next((i for i in range(len(wrapped)) if wrapped[i : i + len(bare)] == bare), None)
        if not bare or start is None:
            raise ValueError(f"{tokenizer_path}: cannot tell its special tokens apart")
        self._prefix = wrapped[:start]
        self._suffix = wrapped[start + len(bare) :]
        self._vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

        specials = len(self._prefix) + len(self._suffix)
        if max_input_tokens <= specials:
            raise ValueError(
                f"max_input_tokens is {max_input_tokens}; it must leave room for text "
                f"beside the {specials} special tokens"
            )
        self.max_input_tokens = max_input_tokens

        self.session = open_session(model_path, threads)
        self._inputs = {a.name for a in self.session.get_inputs()}
        missing = {"input_ids", "attention_mask"} - self._inputs
        if missing:
            raise ValueError(f"{model_path}: no input named {', '.join(sorted(missing))}")
        # One run at the longest input accepted: a limit beyond the model's position
        # table fails here, at load, rather than on some request; and it gives the width
        # where the model leaves it free.
        probe = self._run([self._prefix + [0] * (max_input_tokens - specials) + self._suffix])
        self.dimensions = int(probe.shape[1])

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        """Unit vectors of texts, each cut to what the model reads (its first tokens,
        then its end token): for search, where a long passage is still found by its
        beginning rather than refused."""
        limit = self.max_input_tokens
        cut = [
            ids[: limit - len(self._suffix)] + self._suffix if len(ids) > limit else ids
            for ids in self.tokenize(texts)
        ]
        return self.embed(cut)

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        # One encode() per text, not encode_batch(): the batch call starts a Rust thread
        # pool that competes with onnxruntime for the cores, and that tokenizers turns off
        # with a warning in processes forked after it ran (gunicorn workers).
        return [self._tokenizer.encode(text).ids for text in texts]

    def wrap_ids(self, ids: list[int]) -> list[int]:
        return [*self._prefix, *ids, *self._suffix]

    def vocab_size(self) -> int:
        return self._vocab_size

    def embed(self, batch: list[list[int]]) -> np.ndarray:
        """Unit-length float32 rows, one per input, each the same whatever else is in
        the batch. Inputs are token ids with their special tokens (tokenize, wrap_ids)."""
        for index, ids in enumerate(batch):
            if not ids:
                raise ValueError(f"input {index} is empty")
            if len(ids) > self.max_input_tokens:
                raise ValueError(
                    f"input {index} has {len(ids)} tokens; the limit is {self.max_input_tokens}"
                )
            bad = next((i for i in ids if not 0 <= i < self._vocab_size), None)
            if bad is not None:
                raise ValueError(
                    f"input {index} has token id {bad}; ids must be in 0..{self._vocab_size - 1}"
                )
        out = np.empty((len(batch), self.dimensions), dtype=np.float32)
        order = sorted(range(len(batch)), key=lambda i: len(batch[i]))
        group: list[int] = []
        for index in order:
            if group and (len(group) + 1) * len(batch[index]) > TOKENS_PER_RUN:
                out[group] = self._run([batch[i] for i in group])
                group = []
            group.append(index)
        if group:
            out[group] = self._run([batch[i] for i in group])
        return out

    def _run(self, batch: list[list[int]]) -> np.ndarray:
        lengths = np.array([len(ids) for ids in batch], dtype=np.int64)
        ids = np.zeros((len(batch), int(lengths.max())), dtype=np.int64)
        for row, tokens in enumerate(batch):
            ids[row, : len(tokens)] = tokens
        mask = (np.arange(ids.shape[1]) < lengths[:, None]).astype(np.int64)
        feeds = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self._inputs:
            feeds["token_type_ids"] = np.zeros_like(ids)
        hidden = np.asarray(self.session.run(None, feeds)[0], dtype=np.float32)
        # Padded positions still get hidden states; only the real tokens are averaged.
        pooled = (hidden * mask[:, :, None].astype(np.float32)).sum(axis=1)
        pooled /= lengths[:, None].astype(np.float32)
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        return np.asarray(pooled / np.maximum(norms, 1e-12), dtype=np.float32)

    def close(self) -> None:
        del self.session
