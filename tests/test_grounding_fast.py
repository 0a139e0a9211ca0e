"""The grounding logic in seconds, without a model: citations checked as they stream,
an answer that cites nothing attributed by what it repeats, BM25 and vectors fused
and filtered by collection, the documents sealed on disk, and the schema Alembic's."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from appliance.docs.grounding import CitationFilter, Grounding, attribute
from appliance.docs.index import Hit, Index, fts_query
from appliance.docs.store import SCHEMA_HEAD, DocStore, Stored

FACT = "Tighten the Q-17 flange bolts to 63 Nm with the K-12 wrench."


def stored(
    i: int, text: str, collection: str = "plant", vector: list[float] | None = None
) -> Stored:
    v = np.array(vector or [1.0, 0.0], dtype=np.float32)
    return Stored(
        i,
        i,
        collection,
        f"doc {i}",
        f"/docs/{i}.md",
        "ab" * 32,
        1,
        0,
        0,
        len(text),
        "",
        text,
        v / np.linalg.norm(v),
    )


def grounding(n: int) -> Grounding:
    hits = [Hit(stored(i, f"passage {i}"), 0.1, 0.9, 1, 1) for i in range(1, n + 1)]
    return Grounding(collections=["plant"], sources=hits)


def test_citations_of_sources_not_given_are_removed_even_split_across_tokens() -> None:
    g = grounding(2)
    f = CitationFilter(g)
    pieces = ["Use 63 Nm [", "1] and the K-12 [", "7", "] wrench [2", "]. See [x] too."]
    text = "".join(f.feed(p) for p in pieces) + f.flush()
    assert text == "Use 63 Nm [1] and the K-12  wrench [2]. See [x] too."
    assert g.cited == [1, 2] and g.removed == 1 and g.attributed == []


def test_an_answer_that_cites_nothing_is_attributed_to_the_source_it_repeats() -> None:
    g = Grounding(
        collections=["plant"],
        sources=[
            Hit(stored(1, "Check the hydraulic oil level every week."), 0.1, 0.5, 1, 1),
            Hit(stored(2, FACT), 0.1, 0.8, 2, 2),
        ],
    )
    f = CitationFilter(g)
    text = f.feed("Tighten the Q-17 flange bolts to 63 Nm.") + f.flush()
    assert text.endswith(" [2]") and g.cited == [2] and g.attributed == [2]
    assert g.citations()[0]["cited_by"] == "attributed"
    assert attribute("Something else entirely about lunch menus.", g.sources) == []


def test_a_user_question_cannot_inject_fts_syntax() -> None:
    assert fts_query('torque" OR text:* NEAR(') == '"near" OR "text" OR "torque"'
    assert fts_query("What is the torque?") == '"torque"'  # common words left out
    assert fts_query("What is it?") == '"is" OR "it" OR "what"'  # unless that is all
    assert fts_query("?! a") is None


def test_fusion_ranks_by_both_lists_and_never_leaves_the_collections() -> None:
    passages = [
        stored(1, FACT, vector=[0.2, 1.0]),
        stored(2, "Flange gaskets are replaced yearly.", vector=[1.0, 0.1]),
        stored(3, "Q-17 torque 63 Nm flange bolts K-12", "wards", vector=[0.2, 1.0]),
    ]
    index = Index(passages, generation=1)
    vector = np.array([0.2, 1.0], np.float32) / np.linalg.norm([0.2, 1.0])
    hits = index.search("flange bolts torque Q-17", vector, ["plant"], 5)
    assert [h.passage.id for h in hits] == [1, 2]  # passage 3 is in another collection
    top = hits[0]
    assert top.text_rank == 1 and top.vector_rank == 1
    assert top.score == pytest.approx(2 / 61)  # 1/(60+1) from each list
    assert index.search("flange", vector, [], 5) == []
    # A passage left out of one list counts as just past its end there, and the
    # embeddings' weight scales their share: at 0, the words' order alone.
    words_only = index.search("gaskets flange", vector, ["plant"], 5, vector_weight=0.0)
    assert [h.passage.id for h in words_only] == [2, 1]
    assert words_only[0].score == pytest.approx(1 / 61)


def test_documents_are_sealed_on_disk_and_versioned(tmp_path: Path) -> None:
    doc = tmp_path / "torque.md"
    doc.write_text("# Torque card\n\n" + FACT + "\n")
    store = DocStore(tmp_path / "docs.db", os.urandom(32))

    def embed(texts: list[str]) -> np.ndarray:
        return np.ones((len(texts), 4), np.float32) / 2

    first = store.add(doc, "plant", embed, ("fake", "00" * 32))
    assert first.status == "added" and first.version == 1
    assert store.add(doc, "plant", embed, ("fake", "00" * 32)).status == "unchanged"
    doc.write_text("# Torque card\n\nTighten the Q-17 flange bolts to 71 Nm.\n")
    second = store.add(doc, "plant", embed, ("fake", "00" * 32))
    assert (second.status, second.version, second.retired) == ("new version", 2, 1)
    texts = [p.text for p in store.active()]
    assert any("71 Nm" in t for t in texts) and not any("63 Nm" in t for t in texts)
    store.close()
    on_disk = b"".join(p.read_bytes() for p in tmp_path.glob("docs.db*"))
    assert b"Q-17" not in on_disk and b"Nm" not in on_disk  # sealed, both versions
    other = DocStore(tmp_path / "docs.db", os.urandom(32))
    with pytest.raises(Exception, match="master key"):
        list(other.active())
    other.close()


def test_the_schema_head_is_the_newest_migration() -> None:
    versions = Path(__file__).parent.parent / "appliance" / "docs" / "migrations" / "versions"
    heads = sorted(p.stem.split("_")[0] for p in versions.glob("*.py"))
    assert heads[-1] == SCHEMA_HEAD
