"""Ingestion: text, Markdown, HTML and PDF files (or folders of them) chunked into a MemoryStore.

A file that cannot be read (binary, undecodable, broken PDF) is skipped with a reason and the
rest keep going; the caller gets counts and the reasons, plus an optional progress callback.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable

if TYPE_CHECKING:
    from llmos.memory.store import MemoryStore

TEXT_SUFFIXES = {".txt", ".md", ".markdown", ".rst", ".text", ""}
HTML_SUFFIXES = {".html", ".htm"}
PDF_SUFFIXES = {".pdf"}
MAX_CHARS = 1200  # ~250 tokens: fits all-MiniLM-L6-v2's 256-token window
OVERLAP = 150  # characters carried into the next chunk so a sentence cut at a boundary stays findable


@dataclass
class IngestReport:
    """What an ingest did: files read, chunks added, duplicates skipped, files skipped with reasons."""

    files: int = 0
    chunks: int = 0
    duplicates: int = 0
    skipped: dict[str, str] = field(default_factory=dict)  # path -> reason


class _TextOfHTML(HTMLParser):
    """Visible text of an HTML page: drops script/style, breaks paragraphs at block elements."""

    BLOCKS = {"p", "div", "br", "li", "h1", "h2", "h3", "h4", "h5", "h6", "tr", "pre", "section", "article", "table"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._hidden = 0

    def handle_starttag(self, tag: str, attrs: object) -> None:
        if tag in ("script", "style", "noscript", "template"):
            self._hidden += 1
        elif tag in self.BLOCKS:
            self.parts.append("\n\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style", "noscript", "template"):
            self._hidden = max(0, self._hidden - 1)
        elif tag in self.BLOCKS:
            self.parts.append("\n\n")

    def handle_data(self, data: str) -> None:
        if not self._hidden:
            self.parts.append(data)


def html_text(html: str) -> str:
    parser = _TextOfHTML()
    parser.feed(html)
    parser.close()
    return "".join(parser.parts)


def _decode(data: bytes) -> str:
    if b"\x00" in data[:8192]:
        raise ValueError("binary file (contains NUL bytes)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("not UTF-8 text") from None


def read_text(path: Path) -> str:
    """The plain text of one supported file; raises ValueError with a reason for anything else."""
    suffix = path.suffix.lower()
    if suffix in PDF_SUFFIXES:
        import pypdf
        from pypdf.errors import PdfReadError

        try:
            reader = pypdf.PdfReader(str(path))
            return "\n\n".join(page.extract_text() or "" for page in reader.pages)
        except (PdfReadError, ValueError, KeyError, OSError) as exc:
            raise ValueError(f"unreadable PDF: {exc}") from None
    if suffix not in TEXT_SUFFIXES | HTML_SUFFIXES:
        raise ValueError(f"unsupported file type {suffix!r}")
    text = _decode(path.read_bytes())
    return html_text(text) if suffix in HTML_SUFFIXES else text


def chunk(text: str, max_chars: int = MAX_CHARS, overlap: int = OVERLAP) -> list[str]:
    """Paragraph-packed chunks of at most `max_chars`; oversize paragraphs are split with overlap."""
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", text)]
    pieces: list[str] = []
    for p in paragraphs:
        if not p:
            continue
        while len(p) > max_chars:
            cut = p.rfind(" ", overlap, max_chars)
            cut = cut if cut > 0 else max_chars
            pieces.append(p[:cut])
            p = p[max(cut - overlap, 1) :].lstrip()
        pieces.append(p)
    chunks: list[str] = []
    for piece in pieces:
        if chunks and len(chunks[-1]) + 2 + len(piece) <= max_chars:
            chunks[-1] += "\n\n" + piece
        else:
            chunks.append(piece)
    return chunks


def _files(paths: Iterable[str | Path]) -> list[Path]:
    out: list[Path] = []
    for p in map(Path, [paths] if isinstance(paths, (str, Path)) else paths):  # one path is not a list of characters
        if p.is_dir():
            out.extend(sorted(f for f in p.rglob("*") if f.is_file() and not any(part.startswith(".") for part in f.relative_to(p).parts)))
        else:
            out.append(p)
    return out


def ingest(
    store: "MemoryStore",
    paths: Iterable[str | Path],
    *,
    collection: str = "default",
    progress: Callable[[int, int, Path], None] | None = None,
) -> IngestReport:
    """Read, chunk and store files and folders; `progress(done, total, path)` is called per file."""
    files = _files(paths)
    report = IngestReport()
    for n, path in enumerate(files, 1):
        try:
            text = read_text(path)
        except (ValueError, OSError) as exc:
            report.skipped[str(path)] = str(exc) if isinstance(exc, ValueError) else f"cannot read: {exc.strerror or exc}"
        else:
            pieces = chunk(text)
            if pieces:
                added, dups = store.add(pieces, collection=collection, source=str(path), kind="document",
                                        metas=[{"provenance": f"document:{path}", "untrusted": True}] * len(pieces))
                report.chunks += len(added)
                report.duplicates += dups
                report.files += 1
            else:
                report.skipped[str(path)] = "no text"
        if progress is not None:
            progress(n, len(files), path)
    return report
