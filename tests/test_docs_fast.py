"""Documents into text and passages, against expectations worked out by hand: each
kind's title, text and sections (Markdown, HTML, a hand-written PDF, plain text), the
documents refused (and why), and the chunker's promises: a passage is exactly its span
of the text, stays inside its section, fits, overlaps its neighbour in the section and
never across one, and cuts long paragraphs at sentences, then words, then anywhere.
No model, no server: about a second."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from pdfs import write_pdf
from pypdf import PdfWriter

from appliance.docs.chunk import Passage, chunk
from appliance.docs.extract import (
    Extracted,
    ExtractError,
    Section,
    extract,
    extract_bytes,
    normalise,
)

# -- extraction ----------------------------------------------------------------------

MARKDOWN = (
    "# Leaflet\r\n"
    "\r\n"
    "Read all of it.  \r\n"
    "\r\n\r\n\r\n"
    "## Dosing\n"
    "Adults take two.\n"
    "\n"
    "### Children\n"
    "Half a tablet.\n"
    "```sh\n"
    "# not a heading\n"
    "```\n"
    "### Elderly ##\n"
    "Ask.\n"
    "## Storage\n"
    "Keep cool.\n"
)


def spans(doc: Extracted) -> list[tuple[str, int, str]]:
    return [(s.heading, s.level, doc.text[s.start : s.end]) for s in doc.sections]


def test_markdown_keeps_its_text_and_nests_its_headings(tmp_path: Path) -> None:
    path = tmp_path / "leaflet.md"
    path.write_bytes(MARKDOWN.encode())
    doc = extract(path)
    assert doc.kind == "markdown" and doc.pages == 1
    assert doc.title == "Leaflet"
    assert doc.text == (
        "# Leaflet\n\nRead all of it.\n\n## Dosing\nAdults take two.\n\n### Children\n"
        "Half a tablet.\n```sh\n# not a heading\n```\n### Elderly ##\nAsk.\n"
        "## Storage\nKeep cool."
    )
    assert spans(doc) == [
        ("Leaflet", 1, "# Leaflet\n\nRead all of it.\n\n"),
        ("Leaflet > Dosing", 2, "## Dosing\nAdults take two.\n\n"),
        (
            "Leaflet > Dosing > Children",
            3,
            "### Children\nHalf a tablet.\n```sh\n# not a heading\n```\n",
        ),
        ("Leaflet > Dosing > Elderly", 3, "### Elderly ##\nAsk.\n"),
        ("Leaflet > Storage", 2, "## Storage\nKeep cool."),
    ]


def test_markdown_before_its_first_heading_and_without_a_title() -> None:
    doc = extract_bytes(b"Preface line\n\n## Part\nbody\n#hashtag\n", "markdown", "notes.md")
    assert doc.title == "Preface line"
    assert spans(doc) == [("", 0, "Preface line\n\n"), ("Part", 2, "## Part\nbody\n#hashtag")]


HTML = b"""<!doctype html>
<html><head><title> The   Leaflet </title>
<style>p { color: red }</style>
<script>var s = "<h1>not text</h1>";</script></head>
<body>
  <h1>Leaflet &amp; notes</h1>
  <p>Take   2 tablets
     &lt;daily&gt; &eacute;&#8212;ok</p>
  <h2>Dosing</h2>
  <ul><li>One <b>bold</b> item</li><li>Two</li></ul>
  <div>line<br>break</div>
  <pre>  code
    indented</pre>
  <h3>Children</h3>
  <table><tr><td>age</td><td>dose</td></tr><tr><td>6</td><td>half</td></tr></table>
</body></html>"""


def test_html_text_is_the_body_with_blocks_as_lines(tmp_path: Path) -> None:
    path = tmp_path / "leaflet.HTM"
    path.write_bytes(HTML)
    doc = extract(path)
    assert doc.kind == "html" and doc.pages == 1
    assert doc.title == "The Leaflet"
    assert doc.text == (
        "Leaflet & notes\n\nTake 2 tablets <daily> é—ok\n\nDosing\n\nOne bold item\nTwo\n\n"
        "line\nbreak\n\n  code\n    indented\n\nChildren\n\nage dose\n6 half"
    )
    assert spans(doc) == [
        ("Leaflet & notes", 1, "Leaflet & notes\n\nTake 2 tablets <daily> é—ok\n\n"),
        (
            "Leaflet & notes > Dosing",
            2,
            "Dosing\n\nOne bold item\nTwo\n\nline\nbreak\n\n  code\n    indented\n\n",
        ),
        ("Leaflet & notes > Dosing > Children", 3, "Children\n\nage dose\n6 half"),
    ]


def test_html_without_a_title_takes_its_first_h1() -> None:
    doc = extract_bytes(b"<p>intro</p><h2>Sub</h2><h1>Main</h1>x", "html", "a.html")
    assert doc.title == "Main"
    assert doc.text == "intro\n\nSub\n\nMain\n\nx"
    assert spans(doc) == [("", 0, "intro\n\n"), ("Sub", 2, "Sub\n\n"), ("Main", 1, "Main\n\nx")]


def test_pdf_pages_are_joined_by_a_blank_line(tmp_path: Path) -> None:
    path = write_pdf(
        tmp_path / "leaflet.pdf",
        ["Dosing (adults)\nTake 2 tablets \\ day.", "Storage\nKeep cool."],
        title="Leaflet (v2)",
    )
    doc = extract(path)
    assert doc.kind == "pdf" and doc.pages == 2
    assert doc.title == "Leaflet (v2)"
    assert doc.text == "Dosing (adults)\nTake 2 tablets \\ day.\n\nStorage\nKeep cool."
    assert doc.sections == [Section("", 0, 0, len(doc.text))]


def test_pdf_without_a_title_takes_its_first_line(tmp_path: Path) -> None:
    doc = extract(write_pdf(tmp_path / "a.pdf", ["", "  First words  \nmore"]))
    assert doc.pages == 2
    assert doc.title == "First words"


def test_pdf_locked_by_an_owner_password_only_opens(tmp_path: Path) -> None:
    # Any viewer opens it with the empty user password; so does extraction.
    writer = PdfWriter(clone_from=write_pdf(tmp_path / "a.pdf", ["open text"]))
    writer.encrypt(user_password="", owner_password="owner")
    writer.write(tmp_path / "locked.pdf")
    assert extract(tmp_path / "locked.pdf").text == "open text"


def test_text_is_normalised_and_titled_by_its_first_line(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_bytes(b"\xef\xbb\xbf\r\n\r\n  First line \t\r\nnext\r\n\r\n\r\n\r\nlast \xff\n\n")
    doc = extract(path)
    assert doc.kind == "text" and doc.pages == 1
    assert doc.text == "  First line\nnext\n\nlast \ufffd"
    assert doc.title == "First line"
    assert doc.sections == [Section("", 0, 0, len(doc.text))]


def test_a_long_first_line_makes_a_title_of_200_characters() -> None:
    doc = extract_bytes(("x" * 300).encode(), "text", "a.txt")
    assert doc.title == "x" * 200


def test_normalise_keeps_form_feeds_inside_lines() -> None:
    assert normalise("a\x0cb\r\rc\u2028d  \n\n\n") == "a\x0cb\n\nc\u2028d"


# -- documents refused ---------------------------------------------------------------


def test_an_unsupported_kind_is_named_with_those_supported(tmp_path: Path) -> None:
    with pytest.raises(ExtractError, match=r"report\.docx.*\.txt.*\.md.*\.html.*\.pdf"):
        extract(tmp_path / "report.docx")
    with pytest.raises(ExtractError, match=r"a\.bin.*'word'.*text, markdown, html, pdf"):
        extract_bytes(b"x", "word", "a.bin")


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("empty.txt", b" \r\n\t\n"),
        ("empty.md", b""),
        ("empty.html", b"<html><head><title>T</title></head><script>x()</script></html>"),
    ],
)
def test_a_document_without_text_is_refused(tmp_path: Path, name: str, data: bytes) -> None:
    (tmp_path / name).write_bytes(data)
    with pytest.raises(ExtractError, match=rf"{name} has no text"):
        extract(tmp_path / name)


def test_a_pdf_without_text_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ExtractError, match=r"blank\.pdf has no text"):
        extract(write_pdf(tmp_path / "blank.pdf", ["", ""]))


def test_an_encrypted_pdf_is_refused(tmp_path: Path) -> None:
    writer = PdfWriter(clone_from=write_pdf(tmp_path / "a.pdf", ["secret"]))
    writer.encrypt("pw")
    writer.write(tmp_path / "secret.pdf")
    with pytest.raises(ExtractError, match=r"secret\.pdf is an encrypted PDF.*password"):
        extract(tmp_path / "secret.pdf")


def test_a_broken_pdf_is_refused_with_the_reason(tmp_path: Path) -> None:
    (tmp_path / "broken.pdf").write_bytes(b"this is not a PDF at all")
    with pytest.raises(ExtractError, match=r"broken\.pdf is not a readable PDF: .+"):
        extract(tmp_path / "broken.pdf")


# -- chunking ------------------------------------------------------------------------


def doc_of(markdown: str) -> Extracted:
    return extract_bytes(markdown.encode(), "markdown", "doc.md")


def sentences(n: int, first: int = 0) -> str:
    """n sentences of 19 characters, one space apart: sentence k at [20k, 20k + 19)."""
    return " ".join(f"Sentence {k:02d} is set." for k in range(first, first + n))


def check(doc: Extracted, passages: list[Passage], max_chars: int) -> None:
    """What every chunking promises, whatever the document."""
    assert [p.ordinal for p in passages] == list(range(len(passages)))
    for p in passages:
        assert p.text == doc.text[p.start : p.end]
        assert 0 < len(p.text) <= max_chars
        assert p.text == p.text.strip()
        (section,) = [s for s in doc.sections if s.start <= p.start and p.end <= s.end]
        assert p.heading == section.heading
    for s in doc.sections:  # nothing of a section's text is left out
        covered = set().union(*(range(p.start, p.end) for p in passages))
        assert all(doc.text[i].isspace() or i in covered for i in range(s.start, s.end))


def test_a_long_paragraph_is_cut_at_sentences_with_overlap_by_hand() -> None:
    doc = extract_bytes(sentences(12).encode(), "text", "a.txt")
    assert len(doc.text) == 239
    # 0: sentences 0-4 ([0, 99)); 5 would end at 119 > 100. Then each passage starts
    # at the earliest sentence start in the previous one's last 30 characters: 80, 160.
    got = chunk(doc, max_chars=100, overlap=30)
    assert [(p.start, p.end) for p in got] == [(0, 99), (80, 179), (160, 239)]
    check(doc, got, 100)
    no_overlap = chunk(doc, max_chars=100, overlap=0)
    assert [(p.start, p.end) for p in no_overlap] == [(0, 99), (100, 199), (200, 239)]


def test_whole_paragraphs_are_packed_and_never_cut_when_they_fit() -> None:
    paragraphs = [sentences(15, 0), sentences(15, 15), sentences(15, 30)]  # 299 each
    doc = extract_bytes("\n\n".join(paragraphs).encode(), "text", "a.txt")
    got = chunk(doc, max_chars=700, overlap=0)
    assert [p.text for p in got] == [paragraphs[0] + "\n\n" + paragraphs[1], paragraphs[2]]
    check(doc, got, 700)


def test_passages_stay_in_their_section_and_overlap_only_inside_it() -> None:
    doc = doc_of(
        "# Dosing\n\n"
        + "\n\n".join(sentences(8, 8 * i) for i in range(6))
        + "\n\n## Children\n\n"
        + sentences(30)
        + "\n\n## Storage\n\nKeep cool.\n"
    )
    got = chunk(doc, max_chars=400, overlap=120)
    check(doc, got, 400)
    assert {p.heading for p in got} == {"Dosing", "Dosing > Children", "Dosing > Storage"}
    assert got[-1].text == "## Storage\n\nKeep cool."
    pairs = list(itertools.pairwise(got))
    inside = [(a, b) for a, b in pairs if a.heading == b.heading]
    across = [(a, b) for a, b in pairs if a.heading != b.heading]
    assert len(inside) >= 4 and len(across) == 2
    for a, b in inside:
        assert a.start < b.start < a.end <= b.end and a.end - b.start <= 120
        assert b.text.startswith("Sentence")  # a sentence start, not mid-sentence
    for a, b in across:
        assert a.end < b.start
        section = next(s for s in doc.sections if s.heading == b.heading)
        assert b.start == section.start


def test_a_paragraph_of_3000_characters_is_cut_at_sentence_ends() -> None:
    words = ["alpha", "beta", "gamma", "delta", "epsilon"]
    text, k = "", 0
    while len(text) < 3000:
        end = ".?!"[k % 3]
        text += " ".join(words[(k + i) % 5] for i in range(3 + k % 11)).capitalize() + end + " "
        k += 1
    doc = extract_bytes(text[:3000].encode(), "text", "a.txt")
    assert "\n" not in doc.text and len(doc.text) > 2900
    got = chunk(doc)
    check(doc, got, 800)
    assert len(got) >= 4
    for p in got[:-1]:
        assert p.text[-1] in ".?!" and p.text[0].isupper()
    for a, b in itertools.pairwise(got):
        assert 0 < a.end - b.start <= 120


def test_a_word_longer_than_a_passage_is_cut_at_max_chars() -> None:
    doc = extract_bytes(b"x" * 2000, "text", "a.txt")
    got = chunk(doc, max_chars=800, overlap=120)
    assert [(p.start, p.end) for p in got] == [(0, 800), (800, 1600), (1600, 2000)]
    check(doc, got, 800)


def test_a_sentence_longer_than_a_passage_is_cut_at_spaces() -> None:
    doc = extract_bytes(" ".join(["dosage"] * 60).encode(), "text", "a.txt")
    # Word k at [7k, 7k + 6): the last space at or before start + 100 is 97, then 195...
    got = chunk(doc, max_chars=100, overlap=0)
    assert [(p.start, p.end) for p in got] == [
        (0, 97),
        (98, 195),
        (196, 293),
        (294, 391),
        (392, 419),
    ]
    check(doc, got, 100)


def test_spans_are_stripped_not_copied() -> None:
    text = " \t alpha beta \t \n"
    doc = Extracted("t", text, [Section("", 0, 0, len(text))], "text", 1)
    assert chunk(doc) == [Passage(0, 3, 13, "alpha beta", "")]


def test_chunking_is_deterministic() -> None:
    doc = doc_of("# A\n\n" + sentences(40) + "\n\n## B\n\n" + "word " * 300)
    assert chunk(doc, 300, 90) == chunk(doc, 300, 90)
    assert chunk(doc_of(doc.text), 300, 90) == chunk(doc, 300, 90)


@pytest.mark.parametrize(("max_chars", "overlap"), [(99, 0), (800, -1), (800, 400), (100, 50)])
def test_sizes_are_checked(max_chars: int, overlap: int) -> None:
    with pytest.raises(ValueError, match=r"^(max_chars|overlap) must be"):
        chunk(doc_of("text"), max_chars=max_chars, overlap=overlap)
    assert chunk(doc_of("text"), max_chars=100, overlap=49)[0].text == "text"
