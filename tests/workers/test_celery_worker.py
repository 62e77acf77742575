"""Real Celery workers in subprocesses: with Redis + PostgreSQL (production), and with the
embedded broker + SQLite (no server). The test process sends work as the web app would."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import uuid
import zipfile
from pathlib import Path

import pytest
from sqlalchemy import select

from storage.models import (
    Answer,
    Document,
    DocumentStatus,
    Job,
    JobKind,
    JobState,
    Segment,
    Snapshot,
    SnapshotKind,
    User,
)
from tests import datasets
from tests.workers.deployment import JOB_TIMEOUT_S, ROOT, deploy
from tests.workers.helpers import add_document, add_job, book, job, settings_fields
from tests.workers.test_service import assert_same_state, damage, final_state, uninterrupted_state
from workers import jobs, service
from workers.celery_app import TASK_NAMES
from workers.uploads import add_document as upload

# kombu's SQLAlchemy transport uses a loader option SQLAlchemy 2.1 deprecates: not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy:DeprecationWarning")


@pytest.fixture(scope="module")
def redis_deployment(tmp_path_factory, tiny_dir, tiny_model, pg_database, redis_url):
    data = tmp_path_factory.mktemp("redis-deployment")
    namespace = f"infini-test-{uuid.uuid4().hex[:8]}"  # its own queue and keys on a shared Redis
    fields = settings_fields(data, tiny_dir, database_url=pg_database, broker_url=redis_url,
                             redis_url=redis_url, namespace=namespace)
    yield from deploy(fields, tiny_model, data)
    import redis

    r = redis.Redis.from_url(redis_url)
    r.delete(*r.scan_iter(f"*{namespace}*"))  # its queues, their kombu bindings, answer streams


def test_the_tasks_module_imports_no_torch(tmp_path):
    """The worker's main process and the web app import it; neither may start CUDA."""
    probe = ("import sys, workers.tasks, workers.jobs, workers.uploads; "
             "print(sorted({'torch', 'transformers'} & set(sys.modules)))")
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFINI_")}
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**env, "INFINI_DATA_DIR": str(tmp_path)})
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr


def test_the_main_process_never_loads_torch(redis_deployment):
    """CUDA started in the process that forks the GPU workers is unusable in them."""
    maps = Path(f"/proc/{redis_deployment.worker.proc.pid}/maps").read_text()
    assert "libtorch" not in maps and "libcuda" not in maps


def read_directly(ctx, text: str, title: str) -> int:
    """A document read in this process (the worker's model is the same)."""
    doc_id = add_document(ctx, text, title=title)
    assert service.ingest_document(add_job(ctx, JobKind.ingest, doc_id), ctx) == "done"
    return doc_id


def test_ingest_through_a_redis_worker_and_a_duplicate_message(redis_deployment):
    d = redis_deployment
    doc_id = add_document(d.ctx, book(seed=1, chars=1500), title="Through Redis")
    job_id = add_job(d.ctx, JobKind.ingest, doc_id)
    d.send(job_id)
    done = d.wait(job_id)
    assert done.state == JobState.succeeded, done.error
    with d.ctx.session() as s:
        doc = s.get(Document, doc_id)
        segments = s.scalars(select(Segment.id).where(Segment.document_id == doc_id)).all()
        snaps = s.scalars(select(Snapshot).where(Snapshot.document_id == doc_id)).all()
    assert doc.status == DocumentStatus.ready and segments
    assert [(x.kind, x.tokens) for x in snaps] == [(SnapshotKind.final, doc.tokens)]

    # the broker delivers the same job again: the worker sees it finished and does nothing
    d.producer.send_task(TASK_NAMES[JobKind.ingest], args=[job_id])
    d.worker.wait_for(rf"job {job_id} is already succeeded: duplicate delivery")
    with d.ctx.session() as s:
        again = s.scalars(select(Snapshot).where(Snapshot.document_id == doc_id)).all()
    assert [(x.id, x.created_at) for x in again] == [(x.id, x.created_at) for x in snaps]
    assert job(d.ctx, job_id).attempts == 1


def test_a_worker_killed_mid_ingest_resumes_from_its_checkpoint(redis_deployment):
    d = redis_deployment
    doc_id = add_document(d.ctx, book(seed=2, chars=1500), title="Killed")
    job_id = add_job(d.ctx, JobKind.ingest, doc_id)
    d.kill_marker.touch()  # the worker process dies right after its first checkpoint
    d.send(job_id)
    done = d.wait(job_id)
    assert not d.kill_marker.exists()
    assert done.state == JobState.succeeded, done.error
    assert done.attempts == 2  # the message came back when its process died
    d.worker.wait_for(r"exited with 'signal 9 \(SIGKILL\)'", timeout=5)
    resumed = int(d.worker.wait_for(rf"job {job_id}: resuming from checkpoint at (\d+) tokens", timeout=5)[1])
    assert 0 < resumed < done.tokens_done
    assert_same_state(final_state(d.ctx, doc_id), uninterrupted_state(d.ctx, doc_id))


def test_the_reaper_requeues_a_job_whose_heartbeat_stopped(redis_deployment):
    from datetime import timedelta

    from sqlalchemy import update

    from storage.models import utcnow

    d = redis_deployment
    doc_id = add_document(d.ctx, book(seed=3, chars=300), title="Stalled")
    job_id = add_job(d.ctx, JobKind.ingest, doc_id)
    with d.ctx.session() as s:  # as a worker that vanished with its message would leave it
        s.execute(update(Job).where(Job.id == job_id).values(
            state=JobState.running, attempts=1, celery_task_id="lost-with-its-machine",
            heartbeat_at=utcnow() - timedelta(seconds=d.ctx.settings.stale_after_s + 1)))
    assert jobs.reap_stalled_jobs(d.ctx)["requeued"] == [job_id]
    done = d.wait(job_id)
    assert done.state == JobState.succeeded and done.attempts == 2


def test_answer_streams_tokens_through_redis_and_cites_pages(redis_deployment):
    d = redis_deployment
    doc_id = read_directly(d.ctx, book(seed=4, chars=3300, topic="compass"), "Compass")
    job_id = add_job(d.ctx, JobKind.answer, doc_id, params={"question": "Where was the compass hidden?"})
    d.send(job_id)
    events = list(jobs.follow_answer(job_id, d.ctx, block_ms=JOB_TIMEOUT_S * 1000))
    start, tokens, end = events[0], [e["text"] for e in events if e["event"] == "token"], events[-1]
    assert start["event"] == "start" and end["event"] == "done"
    assert tokens and "".join(tokens) == end["text"]
    assert any("compass" in p["text"] for p in start["passages"])
    with d.ctx.session() as s:
        row = s.scalars(select(Answer).where(Answer.job_id == job_id)).one()
        compass = s.scalars(select(Segment).where(Segment.document_id == doc_id,
                                                  Segment.text.contains("compass"))).one()
    assert row.answer == end["text"] and row.cited_pages == end["cited_pages"] == start["cited_pages"]
    assert compass.page_start in row.cited_pages
    assert d.wait(job_id).state == JobState.succeeded


def test_a_damaged_snapshot_is_read_again_and_the_answer_comes_from_a_good_one(redis_deployment):
    d = redis_deployment
    doc_id = read_directly(d.ctx, book(seed=6, chars=1500, topic="compass"), "Damaged")
    with d.ctx.session() as s:
        bad = s.scalars(select(Snapshot).where(Snapshot.document_id == doc_id)).one()
    damage(d.ctx, bad.blob_key)  # its checksum no longer matches
    job_id = add_job(d.ctx, JobKind.answer, doc_id, params={"question": "Where was the compass hidden?"})
    d.send(job_id)
    events = list(jobs.follow_answer(job_id, d.ctx, block_ms=JOB_TIMEOUT_S * 1000))
    assert [e["event"] for e in events[:2]] == ["waiting", "start"] and events[-1]["event"] == "done"
    assert events[0]["message"] == 'The memory of "Damaged" was damaged; it is being read again'
    d.worker.wait_for(r"is unusable \(final.safetensors is damaged: its checksum does not match", timeout=5)

    answered = d.wait(job_id)
    with d.ctx.session() as s:
        readings = s.scalars(select(Job).where(Job.document_id == doc_id, Job.kind == JobKind.ingest)).all()
        good = s.scalars(select(Snapshot).where(Snapshot.document_id == doc_id)).one()
    assert answered.state == JobState.succeeded and answered.attempts == 2  # once waiting, once answering
    assert [r.state for r in readings] == [JobState.succeeded] * 2 and good.id != bad.id
    assert_same_state(final_state(d.ctx, doc_id), uninterrupted_state(d.ctx, doc_id))


def reader(ctx) -> User:
    with ctx.session() as s:
        user = User(email=f"{uuid.uuid4().hex[:8]}@example.com", password_hash="x")
        s.add(user)
    return user


def docx() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("word/document.xml", "<w:document/>")
    return buf.getvalue()


def test_bad_uploads_end_as_failed_jobs_with_a_sentence_and_nothing_half_written(redis_deployment, tmp_path):
    d = redis_deployment
    locked = datasets.fetch("pypdf==7.1.0", "pypdf-7.1.0/resources/encryption/r4-user-password.pdf", sdist=True)
    big = tmp_path / "big.pdf"
    with open(big, "wb") as f:
        f.truncate(2 * 1024**3)  # sparse: 2 GB long, no disk used
    cases = {  # filename: (file, password, what the person who uploaded it reads)
        "empty.txt": (io.BytesIO(b""), None, '"empty.txt" is empty.'),
        "empty.pdf": (io.BytesIO(b""), None, '"empty.pdf" is empty.'),
        "locked.pdf": (open(locked, "rb"), "wrong", 'The password given for "locked.pdf" is wrong.'),
        "big.pdf": (open(big, "rb"), None, '"big.pdf" is larger than the upload limit of 200 MB.'),
        "report.docx": (io.BytesIO(docx()), None, '"report.docx" is a ZIP archive (such as a Word or '
                        'OpenDocument file), not a PDF, EPUB or plain-text file.'),
        "photo.png": (io.BytesIO(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8), None,
                      '"photo.png" is not a PDF, EPUB or plain-text file.'),
    }
    docs = {}
    for name, (f, password, _) in cases.items():
        with f, d.ctx.session() as s:  # each its own reader: both empty files are the same content
            doc, ingest = upload(s, reader(d.ctx), name, f, password, settings=d.ctx.settings, blobs=d.ctx.blobs)
            docs[name], sent = doc.id, ingest.id if ingest else None
        if sent:
            d.send(sent)

    blob_dir = d.ctx.settings.blob_dir
    for name, (_, _, sentence) in cases.items():
        with d.ctx.session() as s:
            reading = s.scalars(select(Job).where(Job.document_id == docs[name])).one()
        done = d.wait(reading.id)
        with d.ctx.session() as s:
            doc = s.get(Document, docs[name])
            written = s.scalars(select(Segment.id).where(Segment.document_id == doc.id)).all() + \
                s.scalars(select(Snapshot.id).where(Snapshot.document_id == doc.id)).all()
        assert (done.state, done.error, done.attempts <= 1) == (JobState.failed, sentence, True), name
        assert (doc.status, doc.error) == (DocumentStatus.failed, sentence), name
        assert written == [] and not (blob_dir / "documents" / str(doc.id)).exists(), name
        assert (doc.blob_key is None) == (name == "big.pdf")  # only the upload itself is kept, to retry

    # the right password this time: the same file is read
    with open(locked, "rb") as f, d.ctx.session() as s:
        owner = s.get(User, s.get(Document, docs["locked.pdf"]).owner_id)
        doc, again = upload(s, owner, "locked.pdf", f, "asdfzxcv", settings=d.ctx.settings, blobs=d.ctx.blobs)
        doc_id, job_id = doc.id, again.id
    d.send(job_id)
    assert doc_id == docs["locked.pdf"] and d.wait(job_id).state == JobState.succeeded
    with d.ctx.session() as s:
        assert s.get(Document, doc_id).status == DocumentStatus.ready
        assert "pdf encryption test" in s.scalars(select(Segment.text).where(Segment.document_id == doc_id)).first()


def test_batch_summaries_through_the_worker_survive_a_broken_document(redis_deployment):
    d = redis_deployment
    good = [read_directly(d.ctx, book(seed=10 + i, chars=500), f"Fine {i}") for i in range(2)]
    broken = add_document(d.ctx, book(seed=12, chars=300), title="Never read")
    batch = add_job(d.ctx, JobKind.batch_summarize, params={"document_ids": [good[0], broken, good[1]]})
    d.send(batch)
    parent = d.wait(batch)
    with d.ctx.session() as s:
        children = {c.document_id: c for c in s.scalars(select(Job).where(Job.parent_id == batch))}
    assert parent.state == JobState.succeeded and parent.progress == 1.0
    assert '"Never read"' in parent.error
    assert children[broken].state == JobState.failed and "has not been read yet" in children[broken].error
    assert [children[g].state for g in good] == [JobState.succeeded] * 2


@pytest.fixture(scope="module")
def embedded_deployment(tmp_path_factory, tiny_dir, tiny_model):
    from storage import db

    data = tmp_path_factory.mktemp("embedded-deployment")
    fields = settings_fields(data, tiny_dir)  # broker: the settings' sqla+sqlite default
    db.migrate(fields["database_url"])
    yield from deploy(fields, tiny_model, data)


def test_ingest_and_answer_through_an_embedded_worker(embedded_deployment):
    d = embedded_deployment
    assert d.ctx.settings.broker_url.startswith("sqla+sqlite:///") and d.ctx.settings.redis_url is None
    doc_id = add_document(d.ctx, book(seed=5, chars=800, topic="compass"), title="Embedded")
    ingest_job = add_job(d.ctx, JobKind.ingest, doc_id)
    d.send(ingest_job)
    assert d.wait(ingest_job).state == JobState.succeeded
    question = add_job(d.ctx, JobKind.answer, doc_id, params={"question": "Where was the compass?"})
    d.send(question)
    assert d.wait(question).state == JobState.succeeded
    with d.ctx.session() as s:
        row = s.scalars(select(Answer).where(Answer.job_id == question)).one()
    assert row.answer and row.cited_pages == [1]
