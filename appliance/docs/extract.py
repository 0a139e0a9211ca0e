"""Plain text out of the documents a site hands the appliance, with its sections' spans.

Grounded answers cite passages by character span, so the text made here is the text a
citation shows: one normalisation (``\\r\\n`` to ``\\n``, no trailing spaces, at most one
blank line in a row), applied once, here, and every span is into that exact string.

Sections partition the text: flat, in order, each from its heading's line to the next
heading of any level (the last to the end), named by heading path ("Dosing > Children")
so that a passage can stay inside one and still say where it sits. Text before the first
heading, and a document without headings (plain text, PDF), is a section with heading
``""`` and level 0.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import pypdf
from pypdf import PasswordType

SUFFIXES = {
    ".txt": "text",
    ".md": "markdown",
    ".markdown": "markdown",
    ".html": "html",
    ".htm": "html",
    ".pdf": "pdf",
}
KINDS = ("text", "markdown", "html", "pdf")
TITLE_MAX = 200


class ExtractError(ValueError):
    """A document that yields no text: the message names it and says why."""


@dataclass(frozen=True)
class Section:
    heading: str  # the heading path, "Dosing > Children"; "" where there is no heading
    level: int  # 1-6; 0 where there is no heading
    start: int
    end: int


@dataclass(frozen=True)
class Extracted:
    title: str
    text: str
    sections: list[Section]
    kind: str  # one of KINDS
    pages: int  # a PDF's page count; 1 for a document that is not paged


def kind_of(path: Path) -> str:
    """The kind of document a file is, by its suffix (any case)."""
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise ExtractError(
            f"{path}: unsupported kind of document ({path.suffix or 'no suffix'}); "
            f"supported: {', '.join(SUFFIXES)}"
        )
    return kind


def extract(path: Path) -> Extracted:
    """The file's text and sections; the kind comes from its suffix. An unreadable
    file's OSError passes through: that is the disk's problem, not the document's."""
    kind = kind_of(path)
    return extract_bytes(path.read_bytes(), kind, str(path))


def extract_bytes(data: bytes, kind: str, name: str) -> Extracted:
    """``name`` is only for messages and, as a last resort, the title (its stem)."""
    if kind == "pdf":
        raw, pdf_title, pages = _pdf(data, name)
        text = normalise(raw)
        sections = _sections(text, [])
        title = pdf_title
    else:
        if kind not in KINDS:
            raise ExtractError(f"{name}: unsupported kind {kind!r}; supported: {', '.join(KINDS)}")
        # utf-8-sig: a byte-order mark is not text to cite.
        decoded = data.decode("utf-8-sig", errors="replace")
        pages = 1
        if kind == "markdown":
            text = normalise(decoded)
            heads, title = _markdown_headings(text)
        elif kind == "html":
            text, heads, title = _html(decoded)
        else:
            text, heads, title = normalise(decoded), [], ""
        sections = _sections(text, heads)
    if not text.strip():
        raise ExtractError(f"{name} has no text")
    title = " ".join(title.split()) or _first_line(text) or Path(name).stem
    return Extracted(title[:TITLE_MAX], text, sections, kind, pages)


def normalise(raw: str) -> str:
    """Line ends to ``\\n``, no trailing whitespace on a line, no blank line at either
    end and never two in a row."""
    out: list[str] = []
    # split("\n"), not splitlines(): that would also break at form feeds and U+2028.
    for line in raw.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        line = line.rstrip()
        if line or (out and out[-1]):
            out.append(line)
    while out and not out[-1]:
        out.pop()
    return "\n".join(out)


def _first_line(text: str) -> str:
    return next((s for s in (line.strip() for line in text.split("\n")) if s), "")


Heading = tuple[int, int, str]  # offset of the heading's line, level, title


def _sections(text: str, heads: list[Heading]) -> list[Section]:
    sections = []
    if not heads or heads[0][0] > 0:
        sections.append(Section("", 0, 0, heads[0][0] if heads else len(text)))
    path: list[tuple[int, str]] = []
    for i, (start, level, title) in enumerate(heads):
        while path and path[-1][0] >= level:
            path.pop()
        path.append((level, title))
        end = heads[i + 1][0] if i + 1 < len(heads) else len(text)
        sections.append(Section(" > ".join(t for _, t in path), level, start, end))
    return sections


# -- Markdown ------------------------------------------------------------------------

_ATX = re.compile(r" {0,3}(#{1,6})(?:[ \t]+(.*))?$")
_CLOSING = re.compile(r"(?:^|[ \t]+)#+$")
_FENCE = re.compile(r" {0,3}(`{3,}|~{3,})(.*)$")


def _markdown_headings(text: str) -> tuple[list[Heading], str]:
    """ATX headings (``#`` to ``######``) outside fenced code, and the first level-1
    heading as the title. Setext headings (underlined) are not sections."""
    heads: list[Heading] = []
    title = ""
    fence = ""  # the open fence's marker; "" outside code
    offset = 0
    for line in text.split("\n"):
        here, offset = offset, offset + len(line) + 1
        found = _FENCE.match(line)
        if fence:
            # A closing fence: the opening's character, at least as many, nothing after.
            if found and found[1][0] == fence[0] and len(found[1]) >= len(fence):
                fence = fence if found[2].strip() else ""
            continue
        if found and not (found[1][0] == "`" and "`" in found[2]):
            fence = found[1]
            continue
        head = _ATX.match(line)
        if head is None:
            continue
        name = _CLOSING.sub("", (head[2] or "").strip()).strip()
        if not name:
            continue  # an empty heading names nothing
        level = len(head[1])
        heads.append((here, level, name))
        if level == 1 and not title:
            title = name
    return heads, title


# -- HTML ----------------------------------------------------------------------------

# A blank line (a paragraph break, which chunking splits on) around these ...
_PARAGRAPHS = {
    *(f"h{n}" for n in range(1, 7)),
    *[
        "p",
        "pre",
        "ul",
        "ol",
        "dl",
        "table",
        "blockquote",
        "section",
        "article",
        "header",
        "footer",
        "main",
        "nav",
        "aside",
    ],
    *["figure", "form", "hr"],
}
# ... and a line break around these.
_LINES = {*["div", "li", "tr", "br", "dt", "dd", "caption", "figcaption", "address"]}
_DROPPED = {"head", "script", "style", "template", "title"}
_SPACE = re.compile(r"[ \t\n\r\f]+")  # HTML's whitespace; not U+00A0 (&nbsp;)
_MARK = "\ue000"  # where a heading starts; private use, removed from the input first


class _Html(HTMLParser):
    """The body's text, with line breaks where blocks are, and a mark where each
    heading's text begins (offsets only make sense once the text is normalised)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.out: list[str] = []
        self.pending = ""  # the break owed before the next text
        self.at_line_start = True
        self.space_after = False  # the last text ended in a space
        self.dropped: list[str] = []
        self.pre = 0
        self.in_title = False
        self.title: list[str] = []
        self.heading: tuple[int, list[str]] | None = None
        self.marked = False  # the open heading's mark is out
        self.heads: list[tuple[int, str]] = []
        self.first_h1 = ""

    def _break(self, owed: str) -> None:
        if len(owed) > len(self.pending):
            self.pending = owed

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "body" and "head" in self.dropped:
            self.dropped.remove("head")  # </head> may be left out
        if tag in _DROPPED:
            self.dropped.append(tag)
            self.in_title = self.in_title or tag == "title"
            return
        if tag in _PARAGRAPHS:
            self._break("\n\n")
        elif tag in _LINES:
            self._break("\n")
        elif tag in ("td", "th") and not self.at_line_start:
            self._text(" ")
        if tag == "pre":
            self.pre += 1
        elif len(tag) == 2 and tag[0] == "h" and tag[1] in "123456":
            self._close_heading()
            self.heading = (int(tag[1]), [])

    def handle_endtag(self, tag: str) -> None:
        if tag in _DROPPED:
            if tag in self.dropped:
                del self.dropped[len(self.dropped) - 1 - self.dropped[::-1].index(tag)]
            self.in_title = self.in_title and tag != "title"
            return
        if tag in _PARAGRAPHS:
            self._break("\n\n")
        elif tag in _LINES and tag != "br":
            self._break("\n")
        if tag == "pre":
            self.pre = max(0, self.pre - 1)
        elif len(tag) == 2 and tag[0] == "h" and tag[1] in "123456":
            self._close_heading()

    def handle_data(self, data: str) -> None:
        data = data.replace(_MARK, "")
        if self.in_title:
            self.title.append(data)
        elif not self.dropped:
            self._text(data)

    def _text(self, data: str) -> None:
        if not self.pre:
            data = _SPACE.sub(" ", data)
            if self.at_line_start or self.pending or self.space_after:
                data = data.lstrip(" ")
        if not data:
            return
        if self.heading is not None:
            self.heading[1].extend((" ", data) if self.pending else (data,))
        if self.pending and self.out:
            self.out.append(self.pending)
            self.at_line_start = True
        self.pending = ""
        lead = len(data) - len(data.lstrip())
        if self.heading is not None and not self.marked and lead < len(data):
            # Right before the first visible character, so that no line the mark is
            # on counts as blank, and normalising the text cannot move it.
            self.out += [data[:lead], _MARK, data[lead:]]
            self.heads.append((self.heading[0], ""))
            self.marked = True
        else:
            self.out.append(data)
        self.at_line_start = data.endswith("\n")
        self.space_after = data.endswith(" ")

    def _close_heading(self) -> None:
        if self.heading is not None and self.marked:
            name = " ".join("".join(self.heading[1]).split())
            self.heads[-1] = (self.heading[0], name)
            if self.heading[0] == 1 and not self.first_h1:
                self.first_h1 = name
        self.heading = None
        self.marked = False


def _html(source: str) -> tuple[str, list[Heading], str]:
    parser = _Html()
    parser.feed(source)
    parser.close()
    parser._close_heading()
    marked = normalise("".join(parser.out)).split(_MARK)
    text = "".join(marked)
    heads: list[Heading] = []
    offset = len(marked[0])
    for (level, name), part in zip(parser.heads, marked[1:], strict=True):
        # A heading's line may open with whitespace (&nbsp;, or inside <pre>) before
        # the mark: the section starts with the line, unless that is the last one's.
        line = text.rfind("\n", 0, offset) + 1
        heads.append((line if not heads or line > heads[-1][0] else offset, level, name))
        offset += len(part)
    title = " ".join("".join(parser.title).split()) or parser.first_h1
    return text, heads, title


# -- PDF -----------------------------------------------------------------------------


def _pdf(data: bytes, name: str) -> tuple[str, str, int]:
    """The pages' text joined by blank lines, the metadata title, the page count.

    A PDF protected by only an owner password opens with the empty user password,
    as in any viewer; one that needs a password is refused."""
    try:
        reader = pypdf.PdfReader(io.BytesIO(data))
        if reader.is_encrypted and reader.decrypt("") == PasswordType.NOT_DECRYPTED:
            raise ExtractError(
                f"{name} is an encrypted PDF: it cannot be read without its password"
            )
        texts = [page.extract_text() for page in reader.pages]
        meta = reader.metadata
        title = (meta.title if meta is not None else None) or ""
    except ExtractError:
        raise
    except Exception as exc:
        # pypdf meets a malformed file with any of a dozen exception types.
        raise ExtractError(f"{name} is not a readable PDF: {type(exc).__name__}: {exc}") from exc
    return "\n\n".join(texts), str(title), len(texts)
