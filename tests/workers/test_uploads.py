"""Taking uploads in (`workers.uploads.add_document`), on SQLite and on PostgreSQL."""

from __future__ import annotations

import hashlib
import io
import uuid

import pytest
from sqlalchemy import select

from storage import db
from storage.models import Document, DocumentStatus, Job, JobKind, JobState, User
from tests.workers.helpers import make_context, settings_fields
from tests.workers.test_service import blob_files
from workers.uploads import add_document


@pytest.fixture(params=["sqlite", "postgresql"])
def ctx(request, tmp_path, tiny_dir):
    overrides = {"max_upload_mb": 1}
    if request.param == "postgresql":
        overrides["database_url"] = request.getfixturevalue("pg_database")
    fields = settings_fields(tmp_path / "data", tiny_dir, **overrides)
    db.migrate(fields["database_url"])
    ctx = make_context(fields)
    yield ctx
    ctx.engine.dispose()


def new_user(ctx) -> User:
    with ctx.session() as s:
        user = User(email=f"{uuid.uuid4().hex[:8]}@example.com", password_hash="x")
        s.add(user)
    return user


def upload(ctx, user, filename: str, f, password: str | None = None):
    with ctx.session() as s:
        doc, job = add_document(s, user, filename, f, password, settings=ctx.settings, blobs=ctx.blobs)
        return doc, job.id if job is not None else None


class Stream:
    """An upload whose length nobody knows in advance (chunked HTTP)."""

    def __init__(self, size: int):
        self.left = size

    def seekable(self) -> bool:
        return False

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        self.left -= n
        return b"a" * n


def test_an_upload_is_stored_and_queued_once_per_user(ctx):
    alice, bob = new_user(ctx), new_user(ctx)
    data = b"The keeper lit the lamp.\n" * 100
    doc, job_id = upload(ctx, alice, "C:\\books\\Lamp.txt", io.BytesIO(data), password="secret")
    assert (doc.title, doc.filename, doc.bytes) == ("Lamp", "Lamp.txt", len(data))
    assert doc.content_sha256 == hashlib.sha256(data).hexdigest() and doc.status == DocumentStatus.queued
    with ctx.blobs.open(doc.blob_key) as f:
        assert f.read() == data
    with ctx.session() as s:
        job = s.get(Job, job_id)
        assert (job.kind, job.state, job.document_id, job.params) == (
            JobKind.ingest, JobState.queued, doc.id, {"password": "secret"})
    stored = blob_files(ctx)

    again, no_job = upload(ctx, alice, "copy.txt", io.BytesIO(data))
    assert again.id == doc.id and no_job is None and blob_files(ctx) == stored  # nothing new kept
    theirs, their_job = upload(ctx, bob, "Lamp.txt", io.BytesIO(data))
    assert theirs.id != doc.id and their_job is not None


def test_a_failed_document_uploaded_again_is_read_again(ctx):
    user = new_user(ctx)
    doc, first = upload(ctx, user, "locked.pdf", io.BytesIO(b"%PDF-1.7 ..."))
    with ctx.session() as s:
        s.get(Document, doc.id).status = DocumentStatus.failed
    again, second = upload(ctx, user, "locked.pdf", io.BytesIO(b"%PDF-1.7 ..."), password="right")
    assert again.id == doc.id and second not in (None, first)
    with ctx.session() as s:
        assert s.get(Job, second).params == {"password": "right"}
        assert s.get(Document, doc.id).status == DocumentStatus.queued


def test_an_upload_at_the_limit_is_taken(ctx):
    doc, job_id = upload(ctx, new_user(ctx), "full.txt", Stream(ctx.settings.max_upload_bytes))
    assert doc.bytes == ctx.settings.max_upload_bytes and job_id is not None


def assert_refused(ctx, doc, name: str) -> None:
    message = f'"{name}" is larger than the upload limit of {ctx.settings.max_upload_mb} MB.'
    with ctx.session() as s:
        job = s.scalars(select(Job).where(Job.document_id == doc.id)).one()
        doc = s.get(Document, doc.id)
    assert (job.kind, job.state, job.error) == (JobKind.ingest, JobState.failed, message)
    assert (doc.status, doc.error, doc.blob_key) == (DocumentStatus.failed, message, None)
    assert blob_files(ctx) == []  # not even a temporary file


def test_a_2_gb_file_over_the_limit_is_refused_without_reading_it(ctx, tmp_path):
    big = tmp_path / "big.pdf"
    with open(big, "wb") as f:
        f.truncate(2 * 1024**3)  # sparse: 2 GB long, no disk used
    with open(big, "rb") as f:
        doc, job_id = upload(ctx, new_user(ctx), "big.pdf", f)
        assert f.tell() == 0
    assert job_id is None
    assert_refused(ctx, doc, "big.pdf")


def test_a_stream_over_the_limit_is_cut_off_at_the_limit(ctx):
    limit = ctx.settings.max_upload_bytes
    stream = Stream(10 * limit)
    doc, job_id = upload(ctx, new_user(ctx), "endless.txt", stream)
    assert job_id is None and stream.left >= 8 * limit  # it stopped reading soon after the limit
    assert_refused(ctx, doc, "endless.txt")
