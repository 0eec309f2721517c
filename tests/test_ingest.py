"""Ingestion of a mixed folder into a real store: text, Markdown, HTML, PDF, and a binary to skip."""

import pytest

from llmos.memory.embed import default_embedder
from llmos.memory.ingest import chunk, html_text, ingest, read_text
from llmos.memory.store import MemoryStore


def minimal_pdf(text: str) -> bytes:
    """A one-page PDF showing `text` in Helvetica, with a correct xref table."""
    stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode()
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R /Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for i, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % i + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % off for off in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "docs"
    (d / "sub").mkdir(parents=True)
    (d / "notes.txt").write_text("The backup server is called Hyperion.\n\nIt runs every night at two o'clock.")
    (d / "readme.md").write_text("# Setup\n\nInstall the widget with `pip install widget`.\n\n## Usage\n\nRun widget --fast.")
    (d / "sub" / "page.html").write_text(
        "<html><head><style>body{color:red}</style><script>var secret = 1;</script></head>"
        "<body><h1>Opening hours</h1><p>The library opens at 9&nbsp;am on weekdays.</p></body></html>"
    )
    (d / "sub" / "report.pdf").write_bytes(minimal_pdf("Quarterly volcano inspection found no lava activity."))
    (d / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    (d / "data.txt").write_bytes(b"\x00\x01\x02binary junk")
    (d / "broken.pdf").write_bytes(b"%PDF-1.4 this is not really a pdf")
    return d


def test_readers_and_chunker(folder):
    assert "Quarterly volcano inspection" in read_text(folder / "sub" / "report.pdf")
    text = html_text((folder / "sub" / "page.html").read_text())
    assert "library opens at 9" in text and "secret" not in text and "color" not in text
    long = ("word " * 700).strip()
    pieces = chunk("short one\n\nshort two\n\n" + long, max_chars=500, overlap=50)
    assert pieces[0] == "short one\n\nshort two"
    assert all(len(p) <= 500 for p in pieces) and len(pieces) >= 7
    assert pieces[1][-20:] in pieces[2][:60]  # consecutive pieces overlap


def test_ingest_folder_with_skips_and_progress(folder, tmp_path):
    seen = []
    with MemoryStore(tmp_path / "mem", default_embedder()) as store:
        report = ingest(store, [folder], progress=lambda done, total, path: seen.append((done, total)))
        assert report.files == 4
        assert report.chunks == store.count() >= 4
        assert set(report.skipped) == {str(folder / n) for n in ("image.png", "data.txt", "broken.pdf")}
        assert "binary" in report.skipped[str(folder / "data.txt")]
        assert "unsupported" in report.skipped[str(folder / "image.png")]
        assert "PDF" in report.skipped[str(folder / "broken.pdf")]
        assert seen[-1] == (7, 7) and len(seen) == 7

        hit = store.search("when does the library open", k=1)[0]
        assert hit.source == str(folder / "sub" / "page.html") and hit.kind == "document"
        assert store.search("volcano", k=1)[0].source.endswith("report.pdf")
        assert "Hyperion" in store.search("name of the backup machine", k=1)[0].text

        again = ingest(store, [folder])
        assert again.chunks == 0 and again.duplicates == report.chunks
