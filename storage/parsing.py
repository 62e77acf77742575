"""Turn an uploaded file (PDF, plain text or EPUB) into numbered pages of text.

    pages = parse_document("upload.bin", filename="Report.pdf")
    for page in iter_pages(path): ...        # streaming, for large files

Page numbers are what a reader would cite: a PDF's own pages (pages without
text are skipped but keep their number); for plain text, synthetic pages of
about PAGE_CHARS characters cut at paragraph or line breaks; for EPUB, one
page per spine document (chapter or section) that has text, in reading order.

Every failure the document itself causes is a DocumentError subclass whose
message is one sentence naming the file, fit to show to the person who
uploaded it. Problems of the server (file not found, out of memory) are not
wrapped.

Pure standard library plus pypdf (AES-encrypted PDFs also need the
`cryptography` package, pypdf's "crypto" extra).
"""

from __future__ import annotations

import codecs
import logging
import os
import posixpath
import re
import zipfile
import zlib
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import IO, Iterable, Iterator
from urllib.parse import unquote
from xml.etree import ElementTree

log = logging.getLogger(__name__)

PAGE_CHARS = 3000  # target size of a synthetic plain-text page

_SNIFF_BYTES = 64 * 1024
_READ_BYTES = 1024 * 1024
_TEXT_EXTENSIONS = {".txt", ".text", ".md", ".markdown", ".rst", ".csv", ".log"}
# Text files whose markup would be read as words: refuse rather than mislead.
_MARKUP_EXTENSIONS = {".html", ".htm", ".xhtml", ".xml", ".rtf", ".svg", ".json"}
# A spine document larger than this once unzipped is treated as a zip bomb.
_MAX_EPUB_MEMBER = 256 * 1024 * 1024


@dataclass(frozen=True)
class Page:
    number: int  # 1-based
    text: str


class DocumentError(Exception):
    """Base of every error the uploaded document causes; str() is one sentence."""


class EncryptedDocumentError(DocumentError):
    """The document needs a password, or the password given is wrong."""


class NoTextLayerError(DocumentError):
    """A PDF has pages but none of them has extractable text (a scan)."""


class MalformedDocumentError(DocumentError):
    """The file is damaged or not what its format claims."""


class EmptyDocumentError(DocumentError):
    """The document contains no text at all."""


class UnsupportedFormatError(DocumentError):
    """The file is none of PDF, EPUB or plain text."""


def parse_document(
    path: str | os.PathLike, *, password: str | None = None, filename: str | None = None
) -> list[Page]:
    """All pages of a document; raises DocumentError (subclasses) on failure."""
    return list(iter_pages(path, password=password, filename=filename))


def iter_pages(
    path: str | os.PathLike, *, password: str | None = None, filename: str | None = None
) -> Iterator[Page]:
    """Yield the pages one at a time without holding the whole document twice.

    A generator: errors surface while iterating. When the document turns out
    to have no text the generator raises EmptyDocumentError (NoTextLayerError
    for a PDF with pages) at the end, so streaming callers get the same check
    as parse_document.
    """
    name = _display_name(path, filename)
    if os.path.getsize(path) == 0:
        raise EmptyDocumentError(f'"{name}" is empty.')
    fmt = detect_format(path, filename)
    if fmt == "pdf":
        pages = _pdf_pages(path, name, password)
    elif fmt == "epub":
        pages = _epub_pages(path, name)
    else:
        pages = _txt_pages(path, name)
    found = False
    for page in pages:
        found = True
        yield page
    if not found:
        raise EmptyDocumentError(f'"{name}" contains no text.')


def detect_format(path: str | os.PathLike, filename: str | None = None) -> str:
    """Return "pdf", "txt" or "epub": by content first, then by extension."""
    name = _display_name(path, filename)
    ext = Path(filename or os.fspath(path)).suffix.lower()
    with open(path, "rb") as f:
        head = f.read(_SNIFF_BYTES)

    # The PDF header may sit anywhere in the first KiB; only trust that
    # looser rule when the name does not say the file is text.
    if head.startswith(b"%PDF-") or (b"%PDF-" in head[:1024] and ext not in _TEXT_EXTENSIONS):
        return "pdf"
    if head.startswith(b"PK\x03\x04"):
        if ext == ".epub" or _zip_is_epub(path):
            return "epub"
        raise UnsupportedFormatError(
            f'"{name}" is a ZIP archive (such as a Word or OpenDocument file), '
            "not a PDF, EPUB or plain-text file."
        )
    if ext == ".pdf":
        return "pdf"
    if ext == ".epub":
        return "epub"
    if ext in _MARKUP_EXTENSIONS or head.startswith(b"{\\rtf"):
        kind = ext.lstrip(".").upper() or "RTF"
        raise UnsupportedFormatError(
            f'"{name}" is a {kind} file, not plain text; only PDF, EPUB and plain-text files can be read.'
        )
    if ext in _TEXT_EXTENSIONS or _looks_like_text(head):
        return "txt"
    raise UnsupportedFormatError(f'"{name}" is not a PDF, EPUB or plain-text file.')


# --------------------------------------------------------------------------- text clean-up

_LIGATURES = str.maketrans({
    "\ufb00": "ff", "\ufb01": "fi", "\ufb02": "fl", "\ufb03": "ffi",
    "\ufb04": "ffl", "\ufb05": "st", "\ufb06": "st",
    "\x00": None, "\u00ad": None,  # NUL and soft hyphen: invisible, break words apart
    "\r": "\n", "\f": "\n", "\v": "\n", "\u2028": "\n", "\u2029": "\n\n",
})
_HSPACE = re.compile(r"[^\S\n]+")
_SPACE_AROUND_NEWLINE = re.compile(r" *\n *")
_MANY_NEWLINES = re.compile(r"\n{3,}")


def _clean(text: str) -> str:
    """One space between words, at most one blank line between paragraphs."""
    # Ligatures come out of PDFs and would otherwise split words for search.
    text = text.replace("\r\n", "\n").translate(_LIGATURES)
    text = _HSPACE.sub(" ", text)
    text = _SPACE_AROUND_NEWLINE.sub("\n", text)
    return _MANY_NEWLINES.sub("\n\n", text).strip()


def _display_name(path: str | os.PathLike, filename: str | None) -> str:
    return filename or Path(path).name


# --------------------------------------------------------------------------- PDF

def _pdf_pages(path, name: str, password: str | None) -> Iterator[Page]:
    from pypdf import PdfReader
    from pypdf.errors import DependencyError

    # An open file, not a path: given a path pypdf reads the whole file into
    # memory, given a stream it seeks and reads only what it needs.
    with open(path, "rb") as f:
        try:
            reader = PdfReader(f)
            if reader.is_encrypted:
                _pdf_decrypt(reader, name, password)
            page_count = len(reader.pages)
        except (DocumentError, MemoryError):
            raise
        except DependencyError:
            raise EncryptedDocumentError(
                f'"{name}" uses AES encryption, which this server cannot open '
                "(the cryptography package is missing)."
            ) from None
        except Exception as exc:  # pypdf raises many types for broken files
            log.info("pypdf cannot open %s: %r", name, exc)
            raise MalformedDocumentError(f'"{name}" is damaged or not a valid PDF.') from exc

        if page_count == 0:
            raise EmptyDocumentError(f'"{name}" has no pages.')
        yielded = failed = 0
        for index in range(page_count):
            try:
                raw = reader.pages[index].extract_text()
            except MemoryError:
                raise
            except Exception as exc:
                # One bad page should not cost the reader the rest of a book.
                log.warning("%s: cannot extract text of page %d: %r", name, index + 1, exc)
                failed += 1
                continue
            text = _clean(raw or "")
            if text:
                yielded += 1
                yield Page(index + 1, text)

    if yielded == 0:
        if failed:
            raise MalformedDocumentError(f'"{name}" is damaged: no page of it could be read.')
        raise NoTextLayerError(
            f'"{name}" has no text layer (a scanned document?); OCR it first.'
        )


def _pdf_decrypt(reader, name: str, password: str | None) -> None:
    from pypdf import PasswordType
    from pypdf.errors import DependencyError

    # Many PDFs are encrypted only against editing and open with "".
    for candidate in ("", password) if password else ("",):
        try:
            if reader.decrypt(candidate) != PasswordType.NOT_DECRYPTED:
                return
        except DependencyError:
            raise
        except Exception as exc:  # e.g. a DRM handler other than the standard one
            log.info("pypdf cannot decrypt %s: %r", name, exc)
            raise EncryptedDocumentError(
                f'"{name}" is protected by an encryption method that cannot be opened here.'
            ) from exc
    if password:
        raise EncryptedDocumentError(f'The password given for "{name}" is wrong.')
    raise EncryptedDocumentError(f'"{name}" is encrypted and needs a password.')


# --------------------------------------------------------------------------- plain text

_CONTROL_BYTES = bytes(b for b in range(32) if b not in b"\t\n\r\f\v") + b"\x7f"
_CP1252_UNDEFINED = re.compile(rb"[\x81\x8d\x8f\x90\x9d]")


def _looks_like_text(sample: bytes) -> bool:
    """Guess from the first bytes whether a file is text rather than binary."""
    if not sample or _bom_encoding(sample) or _bomless_utf16(sample):
        return True
    controls = len(sample) - len(sample.translate(None, _CONTROL_BYTES))
    return controls <= 0.02 * len(sample)


def _bom_encoding(head: bytes) -> str | None:
    # UTF-32 first: its little-endian BOM starts with UTF-16's.
    for bom, encoding in (
        (codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
        (codecs.BOM_UTF8, "utf-8-sig"),
        (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"),
    ):
        if head.startswith(bom):
            return encoding
    return None


def _bomless_utf16(sample: bytes) -> str | None:
    # Mostly-Latin UTF-16 has a zero in every other byte.
    half = len(sample) // 2
    if half < 2:
        return None
    even, odd = sample[0::2].count(0), sample[1::2].count(0)
    if odd > 0.3 * half and even < 0.02 * half:
        return "utf-16-le"
    if even > 0.3 * half and odd < 0.02 * half:
        return "utf-16-be"
    return None


def _detect_encoding(path) -> str:
    """BOM, then UTF-16 by its zero bytes, then strict UTF-8, then cp1252/latin-1."""
    with open(path, "rb") as f:
        head = f.read(_SNIFF_BYTES)
        encoding = _bom_encoding(head) or _bomless_utf16(head)
        if encoding:
            return encoding
        # Validating UTF-8 needs the whole file; read it in bounded chunks.
        f.seek(0)
        decoder = codecs.getincrementaldecoder("utf-8")()
        utf8, cp1252 = True, True
        while chunk := f.read(_READ_BYTES):
            if utf8:
                try:
                    decoder.decode(chunk)
                except UnicodeDecodeError:
                    utf8 = False
            cp1252 = cp1252 and not _CP1252_UNDEFINED.search(chunk)
        if utf8:
            try:
                decoder.decode(b"", final=True)
                return "utf-8"
            except UnicodeDecodeError:
                pass
    # cp1252 is what "ANSI" text from Windows usually is; latin-1 decodes any byte.
    return "cp1252" if cp1252 else "latin-1"


def _txt_pages(path, name: str) -> Iterator[Page]:
    encoding = _detect_encoding(path)
    with open(path, "rb") as f:
        head = f.read(_SNIFF_BYTES)
    if not _looks_like_text(head):
        raise MalformedDocumentError(f'"{name}" does not look like a text file (binary data?).')

    # newline=None turns \r\n and \r into \n while streaming.
    with open(path, encoding=encoding, errors="replace", newline=None) as f:
        number = 0
        for raw in _paginate(_read_chunks(f), PAGE_CHARS):
            text = _clean(raw)
            if text:
                number += 1
                yield Page(number, text)


def _read_chunks(f: IO[str], size: int = 8192) -> Iterator[str]:
    while chunk := f.read(size):
        yield chunk


def _paginate(chunks: Iterable[str], target: int) -> Iterator[str]:
    """Cut a stream of text into pieces of at most `target` characters.

    Cut after the last paragraph break in the second half of the piece, else
    the last line break, else the last space, else mid-word.
    """
    buf = ""
    for chunk in chunks:
        buf += chunk
        while len(buf) > target:
            cut = _cut_point(buf, target)
            yield buf[:cut]
            buf = buf[cut:]
    if buf:
        yield buf


def _cut_point(buf: str, target: int) -> int:
    for sep in ("\n\n", "\n", " "):
        i = buf.rfind(sep, target // 2, target)
        if i != -1:
            return i + len(sep)
    return target


# --------------------------------------------------------------------------- EPUB

_XHTML_TYPES = {"application/xhtml+xml", "text/html", "application/html"}
# What zipfile raises for damaged members: bad CRC, truncated or corrupt data,
# zip-level passwords, unknown compression methods.
_ZIP_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, OSError, RuntimeError, NotImplementedError)


def _zip_is_epub(path) -> bool:
    try:
        with zipfile.ZipFile(path) as zf:
            names = set(zf.namelist())
            if "mimetype" in names and zf.read("mimetype").strip() == b"application/epub+zip":
                return True
            return "META-INF/container.xml" in names
    except (KeyError, *_ZIP_ERRORS):
        return False


def _epub_pages(path, name: str) -> Iterator[Page]:
    try:
        zf = zipfile.ZipFile(path)
    except _ZIP_ERRORS as exc:
        raise MalformedDocumentError(f'"{name}" is damaged or not a valid EPUB.') from exc
    with zf:
        spine = _epub_spine(zf, name)
        if _epub_drm_protected(zf, spine):
            raise EncryptedDocumentError(
                f'"{name}" is DRM-protected; only EPUB files without DRM can be read.'
            )
        number = 0
        for member in spine:
            data = _epub_read(zf, member, name)
            if data is None:
                continue
            text = _clean(_html_to_text(_decode_markup(data)))
            if text:
                number += 1
                yield Page(number, text)


def _epub_spine(zf: zipfile.ZipFile, name: str) -> list[str]:
    """Zip member names of the spine's XHTML documents, in reading order."""
    try:
        container = ElementTree.fromstring(zf.read("META-INF/container.xml"))
        rootfile = container.find(".//{*}rootfile")
        opf_path = rootfile.get("full-path") if rootfile is not None else None
        if not opf_path:
            raise ValueError("container.xml names no package document")
        opf = ElementTree.fromstring(zf.read(opf_path))
    except (KeyError, ValueError, ElementTree.ParseError, *_ZIP_ERRORS) as exc:
        raise MalformedDocumentError(
            f'"{name}" is damaged or not a valid EPUB (its table of contents cannot be read).'
        ) from exc

    base = posixpath.dirname(opf_path)
    manifest = {
        item.get("id"): item
        for item in opf.iterfind(".//{*}manifest/{*}item")
    }
    members = []
    for ref in opf.iterfind(".//{*}spine/{*}itemref"):
        item = manifest.get(ref.get("idref"))
        if item is None or item.get("media-type", "").lower() not in _XHTML_TYPES:
            continue
        href = unquote(item.get("href", "").split("#")[0])
        if href:
            members.append(posixpath.normpath(posixpath.join(base, href)))
    return members


def _epub_drm_protected(zf: zipfile.ZipFile, spine: list[str]) -> bool:
    # encryption.xml also lists obfuscated fonts, which are harmless: only
    # encrypted spine documents make the book unreadable.
    try:
        root = ElementTree.fromstring(zf.read("META-INF/encryption.xml"))
    except (KeyError, ElementTree.ParseError, *_ZIP_ERRORS):
        return False
    encrypted = {
        posixpath.normpath(unquote(ref.get("URI", "")))
        for ref in root.iterfind(".//{*}CipherReference")
    }
    return any(member in encrypted for member in spine)


def _epub_read(zf: zipfile.ZipFile, member: str, name: str) -> bytes | None:
    try:
        info = zf.getinfo(member)
    except KeyError:
        log.warning("%s: spine document %s is missing", name, member)
        return None
    if info.file_size > _MAX_EPUB_MEMBER:
        raise MalformedDocumentError(f'"{name}" has a chapter too large to read.')
    try:
        return zf.read(info)
    except _ZIP_ERRORS as exc:
        raise MalformedDocumentError(f'"{name}" is damaged (a chapter cannot be unpacked).') from exc


_XML_ENCODING = re.compile(rb"""^[^>]*encoding=["']([A-Za-z0-9._-]+)["']""")


def _decode_markup(data: bytes) -> str:
    encoding = _bom_encoding(data) or "utf-8"
    if encoding == "utf-8":
        declared = _XML_ENCODING.search(data[:200])
        if declared:
            encoding = declared.group(1).decode("ascii")
    try:
        return data.decode(encoding, errors="replace")
    except LookupError:  # an encoding name Python does not know
        return data.decode("utf-8", errors="replace")


# Blocks that separate paragraphs, and those that only start a new line.
_PARAGRAPH_TAGS = {
    "p", "div", "section", "article", "aside", "header", "footer", "main", "nav",
    "blockquote", "pre", "table", "ul", "ol", "dl", "figure", "address",
    "h1", "h2", "h3", "h4", "h5", "h6", "hr",
}
_LINE_TAGS = {"br", "li", "tr", "dt", "dd", "caption", "figcaption"}
_CELL_TAGS = {"td", "th"}
_SKIP_TAGS = {"head", "title", "script", "style", "template", "noscript", "svg", "math"}
_VOID_TAGS = {
    "area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta",
    "source", "track", "wbr",
}


class _HTMLText(HTMLParser):
    """Visible text of an (X)HTML document, with its block structure as newlines."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.stack: list[tuple[str, bool]] = []  # (tag, inside hidden content)
        self.pre = 0

    def _hidden(self) -> bool:
        return bool(self.stack) and self.stack[-1][1]

    def handle_starttag(self, tag, attrs):
        self._break(tag, start=True)
        if tag in _VOID_TAGS:
            return
        attrs = dict(attrs)
        # Print page numbers (epub:type="pagebreak") would land mid-sentence.
        kinds = f'{attrs.get("epub:type") or ""} {attrs.get("role") or ""}'.split()
        hidden = (
            self._hidden() or tag in _SKIP_TAGS or "hidden" in attrs
            or "pagebreak" in kinds or "doc-pagebreak" in kinds
        )
        self.stack.append((tag, hidden))
        self.pre += tag == "pre"

    def handle_startendtag(self, tag, attrs):
        # <br/>, <img/>, and also <div/>: nothing to push.
        self._break(tag, start=True)

    def handle_endtag(self, tag):
        if any(t == tag for t, _ in self.stack):
            while self.stack:  # tolerate unclosed children
                popped, _ = self.stack.pop()
                self.pre -= popped == "pre"
                if popped == tag:
                    break
        self._break(tag, start=False)

    def handle_data(self, data):
        if self._hidden():
            return
        self.parts.append(data if self.pre else re.sub(r"\s+", " ", data))

    def _break(self, tag: str, start: bool) -> None:
        if self._hidden():
            return
        if tag in _PARAGRAPH_TAGS:
            self.parts.append("\n\n")
        elif tag in _LINE_TAGS and start:  # on both sides, list items would stand a blank line apart
            self.parts.append("\n")
        elif tag in _CELL_TAGS:
            self.parts.append(" ")


def _html_to_text(markup: str) -> str:
    parser = _HTMLText()
    parser.feed(markup)
    parser.close()
    return "".join(parser.parts)
