"""The workers' jobs called as plain functions, on the embedded setup (SQLite, local blobs)."""

from __future__ import annotations

from datetime import timedelta

import pytest
import torch
from sqlalchemy import select, update
from sqlalchemy.exc import OperationalError

from infini_core.ingest import ingest
from infini_core.state import CorruptStateError, MemoryState
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
    Summary,
    utcnow,
)
from storage.parsing import parse_document
from tests.workers.helpers import add_document, add_job, book, job
from workers import jobs, service


def read(ctx, text: str, **kw) -> tuple[int, int]:
    doc_id = add_document(ctx, text, **kw)
    job_id = add_job(ctx, JobKind.ingest, doc_id)
    assert service.ingest_document(job_id, ctx) == "done"
    return doc_id, job_id


def uninterrupted_state(ctx, doc_id: int) -> MemoryState:
    """What one pass over the document gives, without the workers."""
    with ctx.session() as s:
        doc = s.get(Document, doc_id)
    with ctx.blobs.get_path(doc.blob_key) as path:
        pages = parse_document(path, filename=doc.filename)
    return ingest(ctx.model(), service.plan_reading(ctx.model(), pages).ids)


def final_state(ctx, doc_id: int) -> MemoryState:
    with ctx.session() as s:
        snap = s.scalars(select(Snapshot).where(Snapshot.document_id == doc_id,
                                                Snapshot.kind == SnapshotKind.final)).one()
    with ctx.blobs.get_path(snap.blob_key) as path:
        return MemoryState.load(path, ctx.model().fingerprint)


def blob_files(ctx) -> list[str]:
    """Every file in the local blob store, temporary ones included."""
    root = ctx.settings.blob_dir
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def damage(ctx, blob_key: str) -> None:
    """Flip bytes inside a snapshot's tensors, as a bad disk or a broken copy would."""
    with ctx.blobs.get_path(blob_key) as path:
        data = bytearray(path.read_bytes())
        data[-64:-32] = bytes(b ^ 0xFF for b in data[-64:-32])
        path.write_bytes(bytes(data))
        with pytest.raises(CorruptStateError, match="checksum"):
            MemoryState.load(path)


def assert_same_state(a: MemoryState, b: MemoryState) -> None:
    assert a.tokens == b.tokens
    ta, tb = a.tensors(), b.tensors()
    assert ta.keys() == tb.keys()
    for key in ta:
        torch.testing.assert_close(ta[key], tb[key], msg=key)


def test_ingest_stores_segments_snapshot_and_progress(embedded):
    ctx = embedded
    doc_id, job_id = read(ctx, book(chars=3200), title="Sea book")
    with ctx.session() as s:
        doc = s.get(Document, doc_id)
        segments = s.scalars(select(Segment).where(Segment.document_id == doc_id).order_by(Segment.index)).all()
        snaps = s.scalars(select(Snapshot).where(Snapshot.document_id == doc_id)).all()
        done = s.get(Job, job_id)
    assert doc.status == DocumentStatus.ready and doc.error is None
    assert doc.pages == 2 and doc.tokens > 3200
    # segments tile the token stream the model read, in page order
    assert segments[0].token_start == 0 and segments[-1].token_end == doc.tokens
    assert all(a.token_end == b.token_start for a, b in zip(segments, segments[1:]))
    assert segments[0].page_start == 1 and segments[-1].page_end == 2
    # checkpoints were taken while reading and dropped at the end: one final snapshot
    assert [(s.kind, s.tokens) for s in snaps] == [(SnapshotKind.final, doc.tokens)]
    assert ctx.blobs.exists(snaps[0].blob_key) and ctx.blobs.exists(service.index_key(snaps[0].blob_key))
    assert (done.state, done.progress, done.tokens_done, done.attempts) == (JobState.succeeded, 1.0, doc.tokens, 1)
    assert done.tokens_per_s > 0 and done.heartbeat_at is not None and done.finished_at is not None


def test_duplicate_delivery_of_a_finished_job_does_nothing(embedded):
    ctx = embedded
    doc_id, job_id = read(ctx, book(chars=800))
    with ctx.session() as s:
        before = [(r.id, r.created_at) for r in s.scalars(select(Snapshot))] + \
                 [(r.id, r.text) for r in s.scalars(select(Segment))]
    blobs = blob_files(ctx)
    assert service.ingest_document(job_id, ctx) == "skipped"
    # a second reading job for the same document finds it read
    assert service.ingest_document(add_job(ctx, JobKind.ingest, doc_id), ctx) == "done"
    with ctx.session() as s:
        after = [(r.id, r.created_at) for r in s.scalars(select(Snapshot))] + \
                [(r.id, r.text) for r in s.scalars(select(Segment))]
    assert after == before and blob_files(ctx) == blobs and job(ctx, job_id).attempts == 1


def test_a_job_a_live_worker_holds_is_not_taken(embedded):
    ctx = embedded
    job_id = add_job(ctx, JobKind.ingest, add_document(ctx, book(chars=300)))
    with ctx.session() as s:
        s.execute(update(Job).where(Job.id == job_id).values(
            state=JobState.running, celery_task_id="other", heartbeat_at=utcnow(), attempts=1))
    assert service.ingest_document(job_id, ctx, task_id="mine") == "skipped"
    assert job(ctx, job_id).celery_task_id == "other"


def test_the_same_message_again_takes_over_only_from_a_worker_that_stopped_beating(embedded):
    """A broker that lost its connection to a worker hands the running job's message back;
    a worker killed with its job does too. Only the second may be taken over."""
    ctx = embedded
    job_id = add_job(ctx, JobKind.ingest, add_document(ctx, book(chars=300)))
    first = jobs.claim(ctx, job_id, JobKind.ingest, task_id="message-1")
    with jobs.heartbeat(first):  # its worker reads on
        assert jobs.claim(ctx, job_id, JobKind.ingest, task_id="message-1") is None
    # its worker died: the same message takes over, and the dead worker's lease is void
    second = jobs.claim(ctx, job_id, JobKind.ingest, task_id="message-1")
    assert second is not None and (second.owner, second.attempt) == ("message-1", 2)
    with pytest.raises(jobs.JobLost):
        first.update(progress=0.5)
    second.update(progress=0.5)


class Crash(BaseException):
    """What a dead worker looks like from inside: nothing after it runs."""


def test_checkpoints_wait_for_their_interval_of_reading(embedded, monkeypatch):
    """Where a block of segments reads in milliseconds (a GPU), a checkpoint after each
    would cost more than the reading: none comes before checkpoint_interval_s of reading."""
    ctx = embedded
    saved = []
    monkeypatch.setattr(service, "save_checkpoint", lambda lease, document_id, fp, state: saved.append(state.tokens))
    doc_id = add_document(ctx, book(chars=1200))
    for interval, doc in ((3600.0, doc_id), (0.0, add_document(ctx, book(seed=1, chars=1200)))):
        monkeypatch.setattr(ctx.settings, "checkpoint_interval_s", interval)
        saved.clear()
        assert service.ingest_document(add_job(ctx, JobKind.ingest, doc), ctx, task_id="task-1") == "done"
        assert bool(saved) == (interval == 0)  # (with no interval: one every checkpoint_every segments)
    with ctx.session() as s:
        assert s.get(Document, doc_id).status == DocumentStatus.ready


def test_redelivered_ingest_resumes_from_the_last_checkpoint(embedded, monkeypatch):
    ctx = embedded
    doc_id = add_document(ctx, book(chars=1200))
    job_id = add_job(ctx, JobKind.ingest, doc_id)
    saved = []
    real_save = service.save_checkpoint

    def save_then_crash(lease, document_id, fp, state):
        real_save(lease, document_id, fp, state)
        saved.append(state.tokens)
        if len(saved) == 3:
            raise Crash

    monkeypatch.setattr(service, "save_checkpoint", save_then_crash)
    with pytest.raises(Crash):
        service.ingest_document(job_id, ctx, task_id="task-1")
    resume_at = saved[-1]
    with ctx.session() as s:  # only the latest checkpoint is kept
        assert [x.tokens for x in s.scalars(select(Snapshot))] == [resume_at]

    fed = []
    real_ingest = service.ingest
    monkeypatch.setattr(service, "ingest", lambda model, ids, state, **kw: fed.append(len(ids)) or
                        real_ingest(model, ids, state, **kw))
    assert service.ingest_document(job_id, ctx, task_id="task-1") == "done"  # the same message again
    total = job(ctx, job_id).tokens_done
    assert fed == [total - resume_at]  # only what the checkpoint had not read
    assert job(ctx, job_id).attempts == 2
    assert_same_state(final_state(ctx, doc_id), uninterrupted_state(ctx, doc_id))


def test_a_bad_document_fails_at_once_with_a_sentence(embedded):
    ctx = embedded
    doc_id = add_document(ctx, b"PK\x03\x04 not really a zip", filename="report.docx")
    job_id = add_job(ctx, JobKind.ingest, doc_id)
    assert service.ingest_document(job_id, ctx) == "failed"
    j = job(ctx, job_id)
    with ctx.session() as s:
        doc = s.get(Document, doc_id)
    assert j.state == JobState.failed and j.attempts == 1
    assert doc.status == DocumentStatus.failed
    assert doc.error == j.error and "report.docx" in doc.error and doc.error.endswith(".")


def test_transient_errors_are_retried_with_a_bound(embedded, monkeypatch):
    from workers import tasks

    ctx = embedded
    doc_id = add_document(ctx, book(chars=300))
    job_id = add_job(ctx, JobKind.ingest, doc_id)
    calls = []

    def database_away(*a, **k):
        calls.append(1)
        raise OperationalError("SELECT 1", {}, Exception("server closed the connection"))

    monkeypatch.setattr(service, "parse_document", database_away)
    monkeypatch.setattr(tasks, "_context", ctx)
    monkeypatch.setattr(tasks.ingest_document, "max_retries", 2)
    result = tasks.ingest_document.apply(args=[job_id])  # eager: retries run in place
    assert isinstance(result.result, OperationalError)
    assert len(calls) == 3  # the first try and two retries
    j = job(ctx, job_id)
    assert j.state == JobState.failed and "temporary error" in j.error and j.attempts == 3


def test_the_reaper_requeues_stalled_jobs_within_their_attempts(embedded):
    ctx = embedded
    sent = []
    ctx.enqueue = sent.append
    doc_id = add_document(ctx, book(chars=300))
    old = utcnow() - timedelta(seconds=ctx.settings.stale_after_s + 5)
    stalled, alive, spent = (add_job(ctx, JobKind.ingest, doc_id) for _ in range(3))
    batch = add_job(ctx, JobKind.batch_summarize, params={"document_ids": [doc_id]})
    with ctx.session() as s:
        running = dict(state=JobState.running, celery_task_id="gone")
        s.execute(update(Job).where(Job.id == stalled).values(heartbeat_at=old, attempts=1, **running))
        s.execute(update(Job).where(Job.id == alive).values(heartbeat_at=utcnow(), attempts=1, **running))
        s.execute(update(Job).where(Job.id == spent).values(heartbeat_at=old, attempts=5, **running))
        s.execute(update(Job).where(Job.id == batch).values(heartbeat_at=old, attempts=1, **running))
        s.add(Job(kind=JobKind.summarize, document_id=doc_id, parent_id=batch))  # still to do

    assert jobs.reap_stalled_jobs(ctx) == {"requeued": [stalled], "failed": [spent], "resent": []}
    assert sent == [stalled]
    assert job(ctx, stalled).state == JobState.queued
    assert job(ctx, alive).state == JobState.running
    assert job(ctx, batch).state == JobState.running  # waits for its child
    assert "stopped responding 5 times" in job(ctx, spent).error
    # the requeued job runs to the end
    assert service.ingest_document(stalled, ctx) == "done"
    assert job(ctx, stalled).attempts == 2


def test_answer_without_redis_fills_the_answer_row(embedded):
    ctx = embedded
    doc_id, _ = read(ctx, book(chars=1500, topic="compass"))
    job_id = add_job(ctx, JobKind.answer, doc_id, params={"question": "Where was the compass?"})
    assert service.answer_question(job_id, ctx) == "done"
    with ctx.session() as s:
        row = s.scalars(select(Answer).where(Answer.job_id == job_id)).one()
        compass = s.scalars(select(Segment).where(Segment.document_id == doc_id,
                                                  Segment.text.contains("compass"))).one()
    assert row.answer  # whatever a random model says, it was stored
    assert row.cited_pages and set(range(compass.page_start, compass.page_end + 1)) <= set(row.cited_pages)
    assert job(ctx, job_id).state == JobState.succeeded


def test_the_answer_row_shows_the_first_piece_at_once(embedded, monkeypatch):
    """Without Redis the app polls the Answer row: it must hold the answer's beginning
    while the rest is generated, however fast the model."""
    ctx = embedded
    doc_id, _ = read(ctx, book(chars=800, topic="compass"))
    seen = []

    def two_pieces(*args, **kwargs):
        yield "The compass"
        with ctx.session() as s:  # what a reader polling the row sees meanwhile
            seen.append(s.scalar(select(Answer.answer)))
        yield " was in the drawer."

    monkeypatch.setattr(service, "answer", two_pieces)
    job_id = add_job(ctx, JobKind.answer, doc_id, params={"question": "Where was the compass?"})
    assert service.answer_question(job_id, ctx) == "done"
    assert seen == ["The compass"]
    with ctx.session() as s:
        assert s.scalar(select(Answer.answer)) == "The compass was in the drawer."


def test_a_question_on_an_unread_document_fails_with_a_sentence(embedded):
    ctx = embedded
    doc_id = add_document(ctx, book(chars=300), title="Unread")
    job_id = add_job(ctx, JobKind.answer, doc_id, params={"question": "Anything?"})
    assert service.answer_question(job_id, ctx) == "failed"
    assert '"Unread" has not been read yet' in job(ctx, job_id).error


def test_batch_without_broker_summarises_each_document_and_survives_a_broken_one(embedded):
    ctx = embedded
    good = read(ctx, book(seed=1, chars=600), title="Good")[0]
    damaged = read(ctx, book(seed=2, chars=500), title="Damaged")[0]
    with ctx.session() as s:
        damage(ctx, s.scalars(select(Snapshot.blob_key).where(Snapshot.document_id == damaged)).one())
    unread = add_document(ctx, book(seed=3, chars=300), title="Unread")

    batch = add_job(ctx, JobKind.batch_summarize, params={"document_ids": [good, damaged, unread]})
    assert service.batch_summarize(batch, ctx) == "done"
    parent = job(ctx, batch)
    with ctx.session() as s:
        children = {c.document_id: c for c in s.scalars(select(Job).where(Job.parent_id == batch))}
        summaries = {x.document_id: x.text for x in s.scalars(select(Summary))}
        rereads = s.scalars(select(Job).where(Job.document_id == damaged, Job.kind == JobKind.ingest)).all()
    assert parent.state == JobState.succeeded and parent.progress == 1.0
    assert parent.error.startswith("1 of 3 documents failed") and '"Unread" has not been read yet' in parent.error
    assert children[unread].state == JobState.failed
    # the damaged snapshot was never used: the document was read again, then summarised
    assert [r.state for r in rereads] == [JobState.succeeded] * 2
    assert children[damaged].state == JobState.succeeded and children[damaged].attempts == 2
    assert set(summaries) == {good, damaged} and all("Pages " in t for t in summaries.values())


def test_a_question_waits_for_the_reading_of_its_document(embedded):
    ctx = embedded
    doc_id = add_document(ctx, book(chars=800, topic="compass"))
    reading = add_job(ctx, JobKind.ingest, doc_id)  # queued, not read yet
    question = add_job(ctx, JobKind.answer, doc_id, params={"question": "Where was the compass?"})
    assert service.answer_question(question, ctx) == "waiting"
    assert job(ctx, question).state == JobState.queued and "Waiting for" in job(ctx, question).error
    # no broker: the reading runs the questions that waited for it when it ends
    assert service.ingest_document(reading, ctx) == "done"
    answered = job(ctx, question)
    assert answered.state == JobState.succeeded and answered.error is None


def test_a_document_read_by_an_earlier_model_is_read_again_for_the_new_one(embedded, monkeypatch):
    """After an upgrade (another model or adapter), a question on a document read before
    queues a new reading with the same params and waits for it, instead of failing."""
    ctx = embedded
    doc_id, first = read(ctx, book(chars=800, topic="compass"))
    monkeypatch.setitem(ctx.model().fingerprint, "adapter", "an adapter shipped since")
    question = add_job(ctx, JobKind.answer, doc_id, params={"question": "Where was the compass?"})
    assert service.answer_question(question, ctx) == "waiting"
    with ctx.session() as s:
        readings = s.scalars(select(Job).where(Job.document_id == doc_id, Job.kind == JobKind.ingest)
                             .order_by(Job.id)).all()
        snapshots = s.scalars(select(Snapshot.model_fingerprint).where(Snapshot.document_id == doc_id,
                                                                       Snapshot.kind == SnapshotKind.final)).all()
    assert readings[0].id == first and len(readings) == 2 and readings[1].params == readings[0].params
    # no broker: the reading ran at once, then the question that waited for it
    assert readings[1].state == JobState.succeeded and len(set(snapshots)) == 2
    answered = job(ctx, question)
    assert answered.state == JobState.succeeded and answered.attempts == 2


def test_the_reaper_sends_again_queued_jobs_the_broker_lost(embedded):
    ctx = embedded
    sent, in_broker = [], [0]
    ctx.enqueue, ctx.backlog = sent.append, lambda: in_broker[0]
    doc_id = add_document(ctx, book(chars=300))
    other = add_document(ctx, book(seed=5, chars=300))
    never_sent, sent_long_ago, sent_now = (add_job(ctx, JobKind.ingest, doc_id) for _ in range(3))
    reading = add_job(ctx, JobKind.ingest, other)  # queued, and so is a question waiting for it,
    add_job(ctx, JobKind.answer, other, params={"question": "?"})  # which has no message on purpose
    old = utcnow() - timedelta(seconds=ctx.settings.stale_after_s + 5)
    with ctx.session() as s:
        s.execute(update(Job).values(created_at=old, heartbeat_at=old, celery_task_id="sent"))
        s.execute(update(Job).where(Job.id == never_sent).values(celery_task_id=None, heartbeat_at=None))
        s.execute(update(Job).where(Job.id == sent_now).values(heartbeat_at=utcnow()))

    in_broker[0] = 3  # of the four queued jobs' messages one is missing: the one never sent
    assert jobs.resend_lost_jobs(ctx) == [never_sent]
    in_broker[0] = 0  # the broker restarted empty: all that are old enough go again
    resent = jobs.resend_lost_jobs(ctx)
    assert resent[0] == never_sent and sorted(resent[1:]) == [sent_long_ago, reading]
    in_broker[0] = 10
    assert jobs.resend_lost_jobs(ctx) == []
