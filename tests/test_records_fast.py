"""A record's canonical bytes and hash are a file format (appliance-audit-v1): a log
written by one version must verify under the next, so they are pinned here byte for
byte. Content is stored as canonical JSON that reads back as what was given, lone
surrogates from a client's JSON included."""

from __future__ import annotations

import json
from typing import Any

import pytest

from appliance.audit.records import (
    FIELDS,
    GENESIS,
    aad,
    canonical,
    content_bytes,
    record_hash,
    storable,
)


def a_row() -> dict[str, Any]:
    row: dict[str, Any] = dict.fromkeys(FIELDS)
    row.update(
        seq=1,
        ts="2026-01-02T03:04:05.000006Z",
        kind="request",
        request_id="r1",
        actor_name="ana",
        client="é",
        route="/v1/chat/completions",
        status=200,
        latency_us=1500,
        key_id="k1",
        nonce=b"\x00\x01",
        ciphertext=bytes(range(4)),
        prev_hash=GENESIS,
    )
    return row


CANONICAL = (
    b"appliance-audit-v1\n"
    b'[1,"2026-01-02T03:04:05.000006Z","request","r1",null,"ana",null,"\xc3\xa9",null,'
    b'"/v1/chat/completions",null,null,200,null,1500,null,null,null,null,"k1","0001",'
    b'"00010203",null,"' + GENESIS.encode() + b'"]'
)
HASH = "f5468975daca966a0f38ebf7d00765516bb2f6fba6a6a70186f3f7f7c2125213"


def test_the_canonical_form_is_pinned() -> None:
    assert canonical(a_row()) == CANONICAL
    assert record_hash(a_row()) == HASH


def test_a_row_as_a_tuple_in_field_order_hashes_the_same() -> None:
    row = a_row()
    as_tuple = tuple(row[f] for f in FIELDS)
    assert canonical(as_tuple) == CANONICAL
    assert record_hash(as_tuple) == HASH


def test_every_field_is_covered_by_the_hash() -> None:
    unchanged = record_hash(a_row())
    for f in FIELDS:
        row = a_row()
        row[f] = "changed"
        assert record_hash(row) != unchanged, f


def test_a_value_the_format_has_no_form_for_is_refused() -> None:
    row = a_row()
    row["client"] = {1, 2}
    with pytest.raises(TypeError, match=r"^set in an audit record$"):
        canonical(row)


def test_content_is_canonical_json() -> None:
    assert content_bytes({"b": 1, "a": "é"}) == b'{"a":"\xc3\xa9","b":1}'


def test_content_with_a_lone_surrogate_reads_back_as_given() -> None:
    content = {"input": "a\ud800b", "n": [1, 2]}
    stored = content_bytes(content)
    stored.decode("utf-8")  # valid UTF-8, which SQLite and AES-GCM take
    assert json.loads(stored) == content


def test_storable_text_is_unchanged_unless_it_cannot_be_utf8() -> None:
    assert storable("plain") == "plain"
    assert storable("é ∑ 🙂") == "é ∑ 🙂"
    assert storable("a\ud800") == "a\\ud800"  # a visible escape, not an error
    assert storable(7) == 7
    assert storable(None) is None
    assert storable(b"\x00") == b"\x00"


def test_associated_data_binds_a_ciphertext_to_its_row() -> None:
    assert aad(7, "2026-01-02T03:04:05Z", "k1") == b"appliance-audit-v1|7|2026-01-02T03:04:05Z|k1"
