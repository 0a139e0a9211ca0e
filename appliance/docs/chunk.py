"""Passages of an extracted document: sized for a prompt, cited by span.

A passage is a span of the document's text (``text == doc.text[start:end]``, always),
so a citation shows exactly what the model was given. Passages stay inside one section
(a citation names one heading), pack whole paragraphs, and cut a paragraph too long for
one passage at sentence ends, else at spaces, else anywhere. Consecutive passages of a
section share up to ``overlap`` characters, from a sentence start (else a word start),
so a statement cut in two is still whole in one of them; sections never share any.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from appliance.docs.extract import Extracted, Section

_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")
_SENTENCE_BREAK = re.compile(r"(?<=[.?!])\s+|\s*\n\s*")


@dataclass(frozen=True)
class Passage:
    ordinal: int  # its place in the document's list, from 0
    start: int
    end: int
    text: str
    heading: str  # its section's heading path; "" where there is no heading


Span = tuple[int, int]


def chunk(doc: Extracted, max_chars: int = 800, overlap: int = 120) -> list[Passage]:
    """The document's passages, in order, each at most ``max_chars`` long."""
    if max_chars < 100:
        raise ValueError(f"max_chars must be at least 100, not {max_chars}")
    if not 0 <= overlap < max_chars / 2:
        raise ValueError(f"overlap must be from 0 to under max_chars/2, not {overlap}")
    text = doc.text
    sections = doc.sections or [Section("", 0, 0, len(text))]
    passages: list[Passage] = []
    done = 0
    for section in sections:
        if not done <= section.start <= section.end <= len(text):
            raise ValueError(
                f"section {section.heading!r} [{section.start}, {section.end}) is out of "
                f"order or outside the text ({len(text)} characters)"
            )
        done = section.end
        for start, end in _pack(text, _units(text, section, max_chars), max_chars, overlap):
            passages.append(Passage(len(passages), start, end, text[start:end], section.heading))
    return passages


def _strip(text: str, start: int, end: int) -> Span:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def _split(text: str, start: int, end: int, pattern: re.Pattern[str]) -> list[Span]:
    """The non-empty, stripped spans between the pattern's matches."""
    spans = []
    for match in pattern.finditer(text, start, end):
        spans.append(_strip(text, start, match.start()))
        start = match.end()
    spans.append(_strip(text, start, end))
    return [(s, e) for s, e in spans if s < e]


def _units(text: str, section: Section, max_chars: int) -> list[Span]:
    """What passages are packed from: whole paragraphs where they fit, else the
    paragraph's sentences, else a sentence's words, else cuts of max_chars."""
    units: list[Span] = []
    for paragraph in _split(text, section.start, section.end, _PARAGRAPH_BREAK):
        if paragraph[1] - paragraph[0] <= max_chars:
            units.append(paragraph)
            continue
        for start, end in _split(text, *paragraph, _SENTENCE_BREAK):
            while end - start > max_chars:
                limit = start + max_chars
                cut = next((i for i in range(limit, start, -1) if text[i].isspace()), limit)
                units.append(_strip(text, start, cut))
                start = _strip(text, cut, end)[0]
            units.append((start, end))
    return units


def _pack(text: str, units: list[Span], max_chars: int, overlap: int) -> list[Span]:
    spans: list[Span] = []
    i = 0
    while i < len(units):
        start, end = units[i]
        if spans and overlap:
            start = _overlap_start(text, spans[-1], end - max_chars, overlap) or start
        i += 1
        while i < len(units) and units[i][1] - start <= max_chars:
            end = units[i][1]
            i += 1
        spans.append((start, end))
    return spans


def _overlap_start(text: str, previous: Span, lowest: int, overlap: int) -> int | None:
    """The earliest sentence start, else word start, in the previous passage's last
    ``overlap`` characters (past its first, and not before ``lowest``, so that the new
    passage still fits); None where there is none."""
    first_word = None
    for p in range(max(previous[1] - overlap, previous[0] + 1, lowest), previous[1]):
        if text[p].isspace() or not text[p - 1].isspace():
            continue
        q = p - 1
        while text[q].isspace():
            if text[q] == "\n":
                return p
            q -= 1
        if text[q] in ".?!":
            return p
        if first_word is None:
            first_word = p
    return first_word
