"""A minimal PDF 1.4 written by hand, for tests of text extraction: a catalog, a page
tree, one page per string with one Helvetica text object per line, an /Info
dictionary with the title when there is one, and a cross-reference table with the
objects' byte offsets. Written by hand so that what is extracted is known exactly,
and not merely what a PDF library would write back to itself."""

from __future__ import annotations

from pathlib import Path


def pdf_string(text: str) -> bytes:
    """A literal string: backslash and parentheses escaped; Latin-1 only (the
    standard Helvetica font's WinAnsi encoding covers no more)."""
    escaped = text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
    return b"(" + escaped.encode("latin-1") + b")"


def pdf_bytes(pages: list[str], title: str | None = None) -> bytes:
    n = len(pages)
    # Objects: 1 catalog, 2 page tree, 3 font, then a page and its content per page,
    # then the /Info dictionary.
    kids = " ".join(f"{4 + 2 * i} 0 R" for i in range(n))
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        f"<< /Type /Pages /Kids [{kids}] /Count {n} >>".encode(),
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>",
    ]
    for i, page in enumerate(pages):
        lines = []
        for j, line in enumerate(page.split("\n")):
            lines.append(b"BT /F1 12 Tf 72 %d Td " % (720 - 16 * j) + pdf_string(line) + b" Tj ET")
        content = b"\n".join(lines)
        objects.append(
            b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] "
            b"/Resources << /Font << /F1 3 0 R >> >> /Contents %d 0 R >>" % (5 + 2 * i)
        )
        objects.append(b"<< /Length %d >>\nstream\n" % len(content) + content + b"\nendstream")
    info = b"<< /Producer (tests/pdfs.py)"
    if title is not None:
        info += b" /Title " + pdf_string(title)
    objects.append(info + b" >>")

    out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    for offset in offsets:
        out += b"%010d 00000 n \n" % offset
    out += b"trailer\n<< /Size %d /Root 1 0 R /Info %d 0 R >>\n" % (len(objects) + 1, len(objects))
    out += b"startxref\n%d\n%%%%EOF\n" % xref
    return bytes(out)


def write_pdf(path: Path, pages: list[str], title: str | None = None) -> Path:
    """Write ``pages`` (lines separated by newlines) as a PDF at ``path``."""
    path.write_bytes(pdf_bytes(pages, title))
    return path
