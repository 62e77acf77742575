"""Taking an upload in: what the web app calls when a file arrives. Light (no torch).

    with session_scope() as s:
        doc, job = add_document(s, user, "Moby Dick.pdf", request.file)
    if job is not None:
        enqueue(job.id)  # after the commit, so that the worker finds the rows

Whatever is wrong with the file itself (empty, encrypted, not a PDF, EPUB or text) is
found by the worker that reads it, and its job fails with a sentence saying so; only the
size is checked here, before anything is kept.
"""

from __future__ import annotations

import re
import uuid
from pathlib import PurePath
from typing import IO

from sqlalchemy.orm import Session

from storage.blobs import BlobStore, blob_store_from_settings
from storage.db import get_or_create_document
from storage.models import Document, DocumentStatus, Job, JobKind, User
from storage.settings import Settings, get_settings
from workers.celery_app import create_job
from workers.jobs import mark_failed

_SUFFIX = re.compile(r"\.[a-z0-9]{1,10}")  # what may follow a blob key's name


class UploadTooLarge(Exception):
    pass


class _Limited:
    """Reads through to `f`, raising UploadTooLarge once more than `limit` bytes came: a
    stream of unknown length (a chunked upload) stops at the limit, not at its end."""

    def __init__(self, f: IO[bytes], limit: int):
        self.f, self.limit, self.seen = f, limit, 0

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.seen += len(data)
        if self.seen > self.limit:
            raise UploadTooLarge
        return data


def _size_left(f: IO[bytes]) -> int | None:
    """Bytes from the current position to the end, where the file can tell without reading."""
    try:
        if not f.seekable():
            return None
        here = f.tell()
        end = f.seek(0, 2)
        f.seek(here)
        return end - here
    except (AttributeError, OSError, ValueError):
        return None


def add_document(s: Session, user: User, filename: str, fileobj: IO[bytes], password: str | None = None, *,
                 settings: Settings | None = None, blobs: BlobStore | None = None) -> tuple[Document, Job | None]:
    """Store an upload and create the job that reads it. Returns (document, job): job is
    None when there is nothing to send (the same file of this user was read or is being
    read; or the upload was refused). Enqueue the job once `s` has committed.

    The file streams into the blob store, hashed on the way, never whole in memory. The
    same content from the same user is one document; one whose reading failed is read
    again (with this password). An upload over `max_upload_mb` is refused before anything
    is stored: it ends as a failed document and job that say why."""
    settings = settings or get_settings()
    blobs = blobs or blob_store_from_settings(settings)
    name = (PurePath(filename.replace("\\", "/")).name or "upload")[:500]
    suffix = PurePath(name).suffix.lower()
    key = f"uploads/{user.id}/{uuid.uuid4().hex}{suffix if _SUFFIX.fullmatch(suffix) else ''}"
    limit = settings.max_upload_bytes
    try:
        size = _size_left(fileobj)
        if size is not None and size > limit:
            raise UploadTooLarge  # known at once: not one byte is read
        nbytes, sha = blobs.put(key, _Limited(fileobj, limit))  # a refused put leaves no blob
    except UploadTooLarge:
        return _refused(s, user, name, f'"{name}" is larger than the upload limit of {settings.max_upload_mb} MB'), None

    title = PurePath(name).stem or name
    doc, created = get_or_create_document(s, user.id, sha, title=title, filename=name, blob_key=key, bytes=nbytes)
    if not created:
        if doc.blob_key and blobs.exists(doc.blob_key):
            blobs.delete(key)  # stored already
        else:
            doc.blob_key, doc.bytes = key, nbytes
        if doc.status != DocumentStatus.failed and doc.status != DocumentStatus.uploaded:
            return doc, None  # read, or being read
    params = {"password": password} if password else None
    return doc, create_job(s, JobKind.ingest, document_id=doc.id, user_id=user.id, params=params)


def _refused(s: Session, user: User, name: str, message: str) -> Document:
    # nothing was kept to hash: a unique marker stands in for the content hash
    doc = Document(owner_id=user.id, title=PurePath(name).stem or name, filename=name,
                   content_sha256=f"refused-{uuid.uuid4().hex}", blob_key=None)
    s.add(doc)
    s.flush()
    mark_failed(s, create_job(s, JobKind.ingest, document_id=doc.id, user_id=user.id), message)
    return doc
