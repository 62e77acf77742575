"""What the workers do, as plain functions: the Celery tasks, tests and scripts call them
alike, with or without a broker. Job-row bookkeeping (leases, failures, the reaper, the
answer stream) is in `workers.jobs`; this module runs the model.

Errors are sorted three ways: what running again cannot fix (bad input, a model that
does not load) fails the job at once, with a sentence for the person who asked;
transient errors (database, Redis, network) put the job back in the queue and are
raised for Celery to retry; anything else fails the job, details in the log.

A question or summary never runs on a damaged snapshot: the checksum that every load
verifies catches it, the document is read again, and the job waits in the queue until
the reading ends (as it does when asked while the document is still being read).
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import delete, insert, select, update
from sqlalchemy.orm import Session

from infini_core.answer import Passage, answer
from infini_core.ingest import Progress, document_tokens, ingest, page_texts
from infini_core.loading import InfiniModel, ModelLoadError, fingerprint_id
from infini_core.retrieval import (
    Chunk,
    RetrievalIndex,
    RetrievalIndexError,
    chunk_pages,
    page_label,
    passages_for,
)
from infini_core.state import CorruptStateError, MemoryState, StateError, StateFormatError
from infini_core.stream import settle
from storage.db import latest_snapshot
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
from storage.parsing import DocumentError, Page, parse_document
from workers.celery_app import create_job
from workers.jobs import (
    Context,
    JobInputError,
    JobLost,
    Lease,
    active_ingest,
    claim,
    default_context,
    fail_job,
    heartbeat,
    is_transient,
    mark_succeeded,
    publish,
    release,
    settle_parent,
    settle_parent_of,
)

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 1.0  # job rows are written at most this often while reading
ANSWER_ROW_EVERY_S = 0.25  # the Answer row follows a streaming answer at most this often


# bad input (or a misconfigured model): running the job again would fail the same way
PERMANENT = (JobInputError, DocumentError, StateError, RetrievalIndexError, ModelLoadError,
             ValueError, FileNotFoundError)
# what a damaged (or vanished) snapshot or retrieval index raises when loaded
DAMAGED = (CorruptStateError, StateFormatError, RetrievalIndexError, FileNotFoundError)


class WaitForReading(Exception):
    """The job needs its document's memory, which is being read (again): the job goes back
    to the queue, and the reading sends it again when it ends."""

    def __init__(self, message: str, reading: int | None = None):
        super().__init__(message)
        self.reading = reading  # a reading this job queued, for run_job to send


# -- keys ---------------------------------------------------------------------------------


def memory_prefix(document_id: int, fp: str) -> str:
    return f"documents/{document_id}/memory/{fp[:16]}"


def index_key(snapshot_key: str) -> str:
    """The retrieval index sits beside the snapshots it was read with."""
    return snapshot_key.rsplit("/", 1)[0] + "/retrieval.zip"


_WHAT = {JobKind.ingest: "Reading the document", JobKind.answer: "Answering",
         JobKind.summarize: "Summarising", JobKind.batch_summarize: "The batch of summaries"}


def run_job(ctx: Context | None, job_id: int, kind: JobKind, work: Callable[[Lease], None],
            task_id: str | None = None) -> str:
    """Claim, run `work`, and record how it ended. Returns "done", "failed", "skipped" or
    "waiting" (queued again until its document is read); raises transient errors (the job
    is queued again) for the caller to retry."""
    ctx = ctx or default_context()
    lease = claim(ctx, job_id, kind, task_id)
    if lease is None:
        return "skipped"
    try:
        with heartbeat(lease):
            work(lease)
    except JobLost:
        log.warning("job %s: another worker owns it now; stopping", job_id)
        return "skipped"
    except WaitForReading as w:
        log.info("job %s: %s", job_id, w)
        release(lease, str(w))
        if kind == JobKind.answer:
            publish(ctx, job_id, {"event": "waiting", "message": str(w)}, quiet=True)
        if w.reading is not None:  # sent once this job is queued, so the reading can wake it
            send(ctx, w.reading)
        return "waiting"
    except SoftTimeLimitExceeded:
        failure = f"{_WHAT[kind]} took longer than its time limit and was stopped"
    except PERMANENT as e:
        failure = str(e)
        log.info("job %s failed: %s", job_id, failure)
    except Exception as e:
        if is_transient(e):
            log.warning("job %s: transient error, back to the queue: %r", job_id, e)
            release(lease, f"Waiting to retry after a temporary error ({type(e).__name__})")
            raise
        log.exception("job %s failed", job_id)
        failure = (f"{_WHAT[kind]} failed because of an internal error ({type(e).__name__}); "
                   "the worker log has the details")
    else:
        _ended(ctx, job_id, kind)
        return "done"
    fail_job(ctx, job_id, failure, lease)
    _ended(ctx, job_id, kind)
    return "failed"


def _ended(ctx: Context, job_id: int, kind: JobKind) -> None:
    settle_parent_of(ctx, job_id)
    if kind == JobKind.ingest:
        wake_waiting(ctx, job_id)


def send(ctx: Context, job_id: int) -> None:
    """To the workers through the broker; without one, run it here and now."""
    if ctx.enqueue is not None:
        ctx.enqueue(job_id)
        return
    with ctx.session() as s:
        kind = s.scalar(select(Job.kind).where(Job.id == job_id))
    RUNNERS[kind](job_id, ctx)


def wake_waiting(ctx: Context, ingest_job_id: int) -> None:
    """After a reading ended, well or not: send the questions and summaries of its document
    that wait in the queue (one already in the broker gets a harmless second message)."""
    try:
        with ctx.session() as s:
            doc_id = s.scalar(select(Job.document_id).where(Job.id == ingest_job_id))
            waiting = s.scalars(select(Job.id).where(
                Job.document_id == doc_id, Job.state == JobState.queued,
                Job.kind.in_((JobKind.answer, JobKind.summarize))).order_by(Job.id)).all()
        for job_id in waiting:
            send(ctx, job_id)
    except Exception:  # the reaper sends them later
        log.warning("job %s: could not send the jobs waiting for it", ingest_job_id, exc_info=True)


# -- reading a document -------------------------------------------------------------------


@dataclass
class Reading:
    """What the model reads of a document, and where each passage of it lies."""

    pages: list[tuple[int, str]]
    chunks: list[Chunk]
    ids: list[int]


def plan_reading(model: InfiniModel, pages: Sequence[Page]) -> Reading:
    """The token stream of the pages (infini_core's `page_texts`), BOS first where the model
    uses one; chunks' token ranges are ranges of exactly this stream."""
    paged = page_texts(pages)
    ids = [t for piece in document_tokens(model, [text for _, text in paged], at_start=True) for t in piece]
    chunks = chunk_pages(paged, tokenizer=model.tokenizer)
    return Reading(paged, chunks, ids)


def save_state(ctx: Context, key: str, state: MemoryState) -> tuple[int, str]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "state.safetensors"
        state.save(path)
        return ctx.blobs.put(key, path)


def _put_snapshot(s: Session, document_id: int, key: str, size: int, sha: str, fp: str,
                  tokens: int, kind: SnapshotKind) -> None:
    snap = s.scalars(select(Snapshot).where(Snapshot.blob_key == key)).first()
    if snap is None:  # a redelivered job may write a key again
        snap = Snapshot(document_id=document_id, blob_key=key)
        s.add(snap)
    snap.bytes, snap.sha256, snap.model_fingerprint, snap.tokens, snap.kind = size, sha, fp, tokens, kind
    snap.created_at = utcnow()


def _drop_checkpoints(s: Session, document_id: int, fp: str, below: int | None = None) -> list[str]:
    """Delete checkpoint rows (those before `below` tokens, else all); returns their blob keys."""
    q = select(Snapshot).where(Snapshot.document_id == document_id, Snapshot.model_fingerprint == fp,
                               Snapshot.kind == SnapshotKind.checkpoint)
    if below is not None:
        q = q.where(Snapshot.tokens < below)
    old = list(s.scalars(q))
    for snap in old:
        s.delete(snap)
    return [snap.blob_key for snap in old]


def save_checkpoint(lease: Lease, document_id: int, fp: str, state: MemoryState) -> None:
    """A resumable point of a reading: blob first, then its row (a row never points at
    nothing); the previous checkpoint goes once this one is committed."""
    ctx = lease.ctx
    key = f"{memory_prefix(document_id, fp)}/checkpoint-{state.tokens:012d}.safetensors"
    size, sha = save_state(ctx, key, state)
    with ctx.session() as s:
        lease.job(s)
        _put_snapshot(s, document_id, key, size, sha, fp, state.tokens, SnapshotKind.checkpoint)
        old = _drop_checkpoints(s, document_id, fp, below=state.tokens)
    for key in old:
        ctx.blobs.delete(key)
    log.info("job %s: checkpoint at %d tokens", lease.job_id, state.tokens)


def _resume_point(ctx: Context, lease: Lease, document_id: int, fp: str, total: int) -> MemoryState | None:
    """The latest checkpoint of this document read by this model, if it can be used."""
    with ctx.session() as s:
        snap = latest_snapshot(s, document_id, fp, SnapshotKind.checkpoint)
    if snap is None:
        return None
    model = ctx.model()
    try:
        with ctx.blobs.get_path(snap.blob_key) as path:
            state = MemoryState.load(path, model.fingerprint, device=model.device, dtype=model.lm.dtype)
    except (StateError, FileNotFoundError) as e:
        log.warning("job %s: checkpoint %s unusable (%s); reading from the start", lease.job_id, snap.blob_key, e)
        return None
    if state.tokens > total:  # the document changed under the same row: cannot happen, but never resume past the end
        return None
    log.info("job %s: resuming from checkpoint at %d tokens of %d", lease.job_id, state.tokens, total)
    return state


class ProgressWriter:
    """on_progress for ingest: the job row's progress, rate and ETA, at most once a second."""

    def __init__(self, lease: Lease, total: int, before: int):
        self.lease, self.total, self.before, self.last = lease, total, before, -math.inf

    def __call__(self, p: Progress) -> None:
        now = time.monotonic()
        finished = p.tokens_total is not None and p.tokens_done >= p.tokens_total
        if now - self.last < PROGRESS_EVERY_S and not finished:
            return
        self.last = now
        done = self.before + p.tokens_done
        self.lease.update(progress=min(1.0, done / max(self.total, 1)), tokens_done=done,
                          tokens_per_s=p.tokens_per_s, eta_s=p.eta_s)


class CheckpointWriter:
    """on_checkpoint for ingest: save_checkpoint, at most once every `checkpoint_interval_s`
    of reading. A GPU reads `checkpoint_every` segments in milliseconds; a snapshot written
    after each would cost more than the reading."""

    def __init__(self, lease: Lease, document_id: int, fp: str):
        self.lease, self.document_id, self.fp, self.last = lease, document_id, fp, time.monotonic()

    def __call__(self, state: MemoryState) -> None:
        if time.monotonic() - self.last >= self.lease.ctx.settings.checkpoint_interval_s:
            save_checkpoint(self.lease, self.document_id, self.fp, state)
            self.last = time.monotonic()


def ingest_document(job_id: int, ctx: Context | None = None, task_id: str | None = None) -> str:
    """Read a document into its memory snapshot: parse, store segments and the retrieval
    index, stream through the model with checkpoints, resume from the latest one."""
    return run_job(ctx, job_id, JobKind.ingest, _ingest, task_id)


def _ingest(lease: Lease) -> None:
    ctx = lease.ctx
    model = ctx.model()
    fp = fingerprint_id(model.fingerprint)
    with ctx.session() as s:
        job = lease.job(s)
        doc = job.document
        if doc is None:
            raise JobInputError("The document of this job no longer exists")
        if latest_snapshot(s, doc.id, fp, SnapshotKind.final) is not None:
            log.info("job %s: document %s is already read by this model", lease.job_id, doc.id)
            doc.status, doc.error = DocumentStatus.ready, None  # create_job marked it queued
            mark_succeeded(job)
            return
        if not doc.blob_key:
            raise JobInputError(f'"{doc.title}" has no uploaded file to read')
        doc.status, doc.error = DocumentStatus.reading, None
        doc_id, blob_key, filename, title = doc.id, doc.blob_key, doc.filename, doc.title
        password = (job.params or {}).get("password")

    try:
        with ctx.blobs.get_path(blob_key) as path:
            pages = parse_document(path, filename=filename, password=password)
    except FileNotFoundError:
        raise JobInputError(f'The uploaded file of "{title}" is missing; upload it again') from None
    reading = plan_reading(model, pages)
    total = len(reading.ids)
    prefix = memory_prefix(doc_id, fp)

    with ctx.session() as s:  # segments: replaced whole, so a second delivery writes the same rows
        lease.job(s)
        s.execute(delete(Segment).where(Segment.document_id == doc_id))
        s.execute(insert(Segment), [
            dict(document_id=doc_id, index=i, text=c.text, page_start=c.page_start, page_end=c.page_end,
                 token_start=c.token_start, token_end=c.token_end) for i, c in enumerate(reading.chunks)])
        doc = s.get(Document, doc_id)
        doc.pages, doc.tokens = max(n for n, _ in reading.pages), total
    with tempfile.TemporaryDirectory() as tmp:
        RetrievalIndex(reading.chunks).save(Path(tmp) / "retrieval.zip")
        ctx.blobs.put(f"{prefix}/retrieval.zip", Path(tmp) / "retrieval.zip")

    state = _resume_point(ctx, lease, doc_id, fp, total)
    start = state.tokens if state is not None else 0
    lease.update(progress=start / total, tokens_done=start)
    if start < total:
        state = ingest(model, reading.ids[start:], state, checkpoint_every=ctx.settings.checkpoint_every,
                       on_checkpoint=CheckpointWriter(lease, doc_id, fp),
                       on_progress=ProgressWriter(lease, total, start))

    size, sha = save_state(ctx, f"{prefix}/final.safetensors", state)
    with ctx.session() as s:  # one commit: the final snapshot, the ready document, the finished job
        job = lease.job(s)
        _put_snapshot(s, doc_id, f"{prefix}/final.safetensors", size, sha, fp, state.tokens, SnapshotKind.final)
        old = _drop_checkpoints(s, doc_id, fp)
        job.document.status, job.document.error = DocumentStatus.ready, None
        job.tokens_done = state.tokens
        mark_succeeded(job)
    for key in old:
        ctx.blobs.delete(key)
    log.info("job %s: document %s read, %d tokens", lease.job_id, doc_id, state.tokens)


# -- questions ----------------------------------------------------------------------------


def load_snapshot(ctx: Context, snapshot: Snapshot) -> tuple[MemoryState, RetrievalIndex]:
    """A snapshot's state and retrieval index; the process keeps the last few loaded
    (answer() forks the state, so one copy serves every question), settled: the
    document's unfinished last segment is read once here, not again for every question."""
    cache = ctx.snapshots
    if snapshot.id in cache:
        cache.move_to_end(snapshot.id)
        return cache[snapshot.id]
    model = ctx.model()
    with ctx.blobs.get_path(snapshot.blob_key) as path:
        state = MemoryState.load(path, model.fingerprint, device=model.device, dtype=model.lm.dtype)
    settle(model, state)
    with ctx.blobs.open(index_key(snapshot.blob_key)) as f:
        index = RetrievalIndex.load(f)
    cache[snapshot.id] = state, index
    while len(cache) > ctx.settings.states_cached:
        cache.popitem(last=False)
    return state, index


def _final_snapshot(ctx: Context, s: Session, doc: Document | None) -> Snapshot:
    if doc is None:
        raise JobInputError("The document of this job no longer exists")
    snap = latest_snapshot(s, doc.id, fingerprint_id(ctx.model().fingerprint), SnapshotKind.final)
    if snap is not None:
        return snap
    if active_ingest(s, doc.id) is not None:
        raise WaitForReading(f'Waiting for "{doc.title}" to be read')
    if doc.status == DocumentStatus.failed:
        raise JobInputError(f'"{doc.title}" could not be read: {doc.error}')
    if doc.status == DocumentStatus.ready:
        # read by another model or adapter (an upgrade since): read it again with this one
        s.refresh(doc, with_for_update=True)  # one reading, however many notice
        title, reading = doc.title, read_again(s, doc)
        s.commit()  # the reading must outlive this job's rollback
        raise WaitForReading(f'"{title}" is being read again for this model', reading)
    raise JobInputError(f'"{doc.title}" has not been read yet (by this model); try again once it is ready')


def memory_of(ctx: Context, snap: Snapshot, title: str) -> tuple[MemoryState, RetrievalIndex]:
    """The snapshot's state and index, verified; a damaged one is never used: the document
    is read again and the job waits for it."""
    try:
        return load_snapshot(ctx, snap)
    except DAMAGED as e:
        log.warning("snapshot %s of document %s is unusable (%s): reading the document again",
                    snap.blob_key, snap.document_id, e)
        raise WaitForReading(f'The memory of "{title}" was damaged; it is being read again',
                             reread(ctx, snap)) from e


def reread(ctx: Context, snap: Snapshot) -> int | None:
    """Forget a damaged final snapshot and queue a new reading of its document, unless one
    is queued or running already. Returns the new reading's job id (not sent yet)."""
    with ctx.session() as s:
        doc = s.get(Document, snap.document_id, with_for_update=True)  # one reading, however many notice
        s.execute(delete(Snapshot).where(Snapshot.id == snap.id))
        reading = read_again(s, doc) if doc is not None else None
    ctx.snapshots.pop(snap.id, None)
    ctx.blobs.delete(snap.blob_key)  # nobody writes it until the new reading is sent
    return reading


def read_again(s: Session, doc: Document) -> int | None:
    """Queue a new reading of `doc` with its last reading's params (an encrypted PDF's
    password is needed again), unless one is queued or running. Returns its job id (not
    sent yet)."""
    if active_ingest(s, doc.id) is not None:
        return None
    last = s.scalars(select(Job.params).where(Job.document_id == doc.id, Job.kind == JobKind.ingest)
                     .order_by(Job.id.desc()).limit(1)).first()
    return create_job(s, JobKind.ingest, document_id=doc.id, user_id=doc.owner_id, params=last).id


def pages_of(chunks: Sequence[Chunk]) -> list[int]:
    return sorted({n for c in chunks for n in range(c.page_start, c.page_end + 1)})


def answer_question(job_id: int, ctx: Context | None = None, task_id: str | None = None) -> str:
    """Answer job.params["question"] from the document's final snapshot, streaming."""
    return run_job(ctx, job_id, JobKind.answer, _answer, task_id)


def _answer(lease: Lease) -> None:
    ctx = lease.ctx
    model = ctx.model()
    with ctx.session() as s:
        job = lease.job(s)
        question = (job.params or {}).get("question")
        if not isinstance(question, str) or not question.strip():
            raise JobInputError("The question is empty")
        snap = _final_snapshot(ctx, s, job.document)
        title = job.document.title
        row = s.scalars(select(Answer).where(Answer.job_id == job.id)).first()
        if row is None:  # a redelivered job reuses its row
            row = Answer(document_id=job.document_id, job_id=job.id, question=question,
                         user_id=job.user_id or job.document.owner_id)
            s.add(row)
        row.answer, row.cited_pages = "", []
        s.flush()
        answer_id = row.id
        k = int((job.params or {}).get("k", ctx.settings.answer_passages))
    state, index = memory_of(ctx, snap, title)
    hits = index.search(question, k)
    passages, pages = passages_for(hits), pages_of([h.chunk for h in hits])

    # "start" on every attempt: a reader drops what an earlier attempt streamed
    publish(ctx, lease.job_id, {"event": "start", "answer_id": str(answer_id), "cited_pages": pages,
                                 "passages": [{"pages": p.pages, "text": p.text} for p in passages]})
    text, last = "", float("-inf")  # the first piece at once: a reader sees the answer begin
    for piece in answer(model, state, question, passages, max_new_tokens=ctx.settings.answer_max_tokens):
        text += piece
        publish(ctx, lease.job_id, {"event": "token", "text": piece})
        if time.monotonic() - last >= ANSWER_ROW_EVERY_S:  # the embedded setup's only stream
            last = time.monotonic()
            with ctx.session() as s:
                s.execute(update(Answer).where(Answer.id == answer_id).values(answer=text))
    with ctx.session() as s:
        job = lease.job(s)
        s.execute(update(Answer).where(Answer.id == answer_id).values(answer=text, cited_pages=pages))
        mark_succeeded(job)
    publish(ctx, lease.job_id, {"event": "done", "answer_id": str(answer_id), "text": text, "cited_pages": pages})


# -- summaries ----------------------------------------------------------------------------

SECTION_PROMPT = "Summarise the passages above in two or three sentences."
OVERALL_PROMPT = ("The passages above summarise the document's sections in order. "
                  "Write a summary of the whole document in one paragraph.")


def section_runs(chunks: Sequence[Chunk], segment_len: int, sections: int) -> list[list[Chunk]]:
    """Consecutive chunks in runs of about a segment each, or longer so that there are at
    most `sections` runs: every part of the document is summarised, in bounded time."""
    if not chunks:
        return []
    total = chunks[-1].token_end - chunks[0].token_start
    budget = max(segment_len, math.ceil(total / sections))
    runs, run = [], []
    for c in chunks:
        if run and c.token_end - run[0].token_start > budget:
            runs.append(run)
            run = []
        run.append(c)
    runs.append(run)
    return runs


def _generate(model, state, prompt: str, passages: Sequence[Passage], max_tokens: int) -> str:
    return "".join(answer(model, state, prompt, passages, max_new_tokens=max_tokens)).strip()


def summarize_document(job_id: int, ctx: Context | None = None, task_id: str | None = None) -> str:
    """Summarise a read document section by section (each with the memory of the whole),
    then as a whole; one Summary row per job."""
    return run_job(ctx, job_id, JobKind.summarize, _summarize, task_id)


def _summarize(lease: Lease) -> None:
    ctx = lease.ctx
    model = ctx.model()
    with ctx.session() as s:
        job = lease.job(s)
        snap = _final_snapshot(ctx, s, job.document)
        params, title = job.params or {}, job.document.title
    state, index = memory_of(ctx, snap, title)
    runs = section_runs(index.chunks, model.config.segment_len,
                        int(params.get("sections", ctx.settings.summary_sections)))
    max_tokens = int(params.get("max_tokens", ctx.settings.summary_max_tokens))
    parts = []
    for i, run in enumerate(runs):
        label = page_label(run[0].page_start, run[-1].page_end)
        text = _generate(model, state, SECTION_PROMPT, [Passage(c.text, c.pages) for c in run], max_tokens)
        parts.append(Passage(text, label))
        lease.update(progress=(i + 1) / (len(runs) + 1))
    overall = _generate(model, state, OVERALL_PROMPT, parts, 2 * max_tokens)
    text = "\n\n".join([overall, *(f"Pages {p.pages}: {p.text}" for p in parts)])
    with ctx.session() as s:
        job = lease.job(s)
        s.execute(delete(Summary).where(Summary.job_id == job.id))
        s.add(Summary(document_id=job.document_id, job_id=job.id, text=text))
        mark_succeeded(job)


def batch_summarize(job_id: int, ctx: Context | None = None, task_id: str | None = None) -> str:
    """One summarize child job per document of job.params["document_ids"]; queued when
    there is a broker (the parent finishes with its last child), else run here."""
    return run_job(ctx, job_id, JobKind.batch_summarize, _batch, task_id)


def _batch(lease: Lease) -> None:
    ctx = lease.ctx
    with ctx.session() as s:
        job = lease.job(s)
        params = job.params or {}
        ids = params.get("document_ids")
        if not isinstance(ids, list) or not ids or not all(isinstance(i, int) for i in ids):
            raise JobInputError("The batch names no documents")
        have = {c.document_id for c in job.children}
        for doc_id in dict.fromkeys(ids):  # a redelivered batch keeps its children
            if doc_id not in have:
                job.children.append(Job(kind=JobKind.summarize, document_id=doc_id, user_id=job.user_id,
                                        params=params.get("summary")))
        s.flush()
        pending = [c.id for c in job.children if c.state == JobState.queued]
    for child in pending:
        send(ctx, child)
    settle_parent(ctx, lease.job_id)


RUNNERS = {JobKind.ingest: ingest_document, JobKind.answer: answer_question,
           JobKind.summarize: summarize_document, JobKind.batch_summarize: batch_summarize}
