"""The life of a Job row, shared by every kind of job: leases, heartbeats, failures,
batches, the reaper, and the answer stream. Light on purpose (SQLAlchemy and Redis, no
torch): the worker's main process, which forks the GPU processes, and the web app import
it, and CUDA must never start in a process that forks.

Every job runs under a lease: `claim` marks the Job row running and records an owner
(the Celery task id, or a local one); every later write is conditional on still owning
it, so a job that the reaper handed to another worker cannot be finished twice. The jobs
table, not the broker, is the truth: the reaper requeues jobs whose worker died and sends
again those whose message the broker lost.

Answers stream to the Redis stream `<namespace>:answer:<job_id>` (read it with
`follow_answer`) and, throttled, into the Answer row, all there is without Redis.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from typing import TYPE_CHECKING

from sqlalchemy import exists, or_, select, update
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session, aliased

from storage.blobs import blob_store_from_settings
from storage.db import make_engine, make_session_factory, session_scope
from storage.models import DocumentStatus, Job, JobKind, JobState, utcnow
from storage.settings import Settings, get_settings

if TYPE_CHECKING:
    from infini_core.loading import InfiniModel

log = logging.getLogger(__name__)

STREAM_TTL_S = 3600  # an answer's Redis stream outlives the answer by this much
STREAM_MAXLEN = 20_000


class JobInputError(Exception):
    """The job cannot succeed as asked (no document, empty question...): never retried."""


class JobLost(Exception):
    """Another worker owns the job now (the reaper requeued it): stop quietly."""


def is_transient(exc: BaseException) -> bool:
    """Errors of the services around the job, which a retry may not meet again."""
    import redis

    if isinstance(exc, DBAPIError):
        return isinstance(exc, OperationalError) or exc.connection_invalidated
    return isinstance(exc, (PoolTimeout, redis.ConnectionError, redis.TimeoutError, ConnectionError, TimeoutError))


# -- the process's resources --------------------------------------------------------------


class Context:
    """Settings, database, blob store, Redis and the warm model of one worker process."""

    def __init__(self, settings: Settings | None = None, *,
                 enqueue: Callable[[int], object] | None = None, model: InfiniModel | None = None,
                 backlog: Callable[[], int] | None = None):
        self.settings = settings or get_settings()
        self.engine = make_engine(self.settings.database_url)
        self.sessions = make_session_factory(self.engine)
        self.blobs = blob_store_from_settings(self.settings)
        # sends a job to the queue; None runs follow-up jobs inline (no broker)
        self.enqueue = enqueue
        # counts the job messages waiting in the broker; None: lost messages are not looked for
        self.backlog = backlog
        self.device = self.settings.device
        self._model = model
        self._redis = None
        self.snapshots: OrderedDict = OrderedDict()  # loaded snapshots, see service.load_snapshot

    def session(self):
        """A session that commits at the end of the block (rolls back if it raises)."""
        return session_scope(self.sessions)

    def model(self) -> InfiniModel:
        """Loaded on first use and kept: one model per worker process (imported here, so
        that a process which never runs a model never imports torch)."""
        if self._model is None:
            from infini_core.attention import InfiniConfig
            from infini_core.loading import load_model

            s = self.settings
            started = time.perf_counter()
            self._model = load_model(s.model, infini=InfiniConfig(segment_len=s.segment_len),
                                     adapter=s.adapter, device=self.device)
            log.info("model %s loaded on %s in %.1f s", s.model, self._model.device, time.perf_counter() - started)
            if self._model.device.type == "cuda":
                from infini_core.ingest import capture_ingest_graphs
                from infini_core.prompt_graph import capture_prompt_graphs

                # (the blocks its readings take: no longer than its checkpoints' interval)
                ingest_graphs = partial(capture_ingest_graphs, checkpoint_every=s.checkpoint_every)
                for what, capture in (("ingest", ingest_graphs), ("answer", capture_prompt_graphs)):
                    started = time.perf_counter()
                    captured = capture(self._model)
                    log.info("%s CUDA graphs %s in %.1f s", what, "captured" if captured else "not used",
                             time.perf_counter() - started)
        return self._model

    def redis(self):
        """The Redis client answers stream to, or None in the embedded setup."""
        if self._redis is None and self.settings.redis_url:
            import redis

            self._redis = redis.Redis.from_url(self.settings.redis_url)
        return self._redis

    def after_fork(self) -> None:
        """In a forked child: never share the parent's database or Redis connections."""
        self.engine.dispose(close=False)
        self._redis = None


_default: Context | None = None


def default_context() -> Context:
    global _default
    if _default is None:
        _default = Context()
    return _default


def set_default_context(ctx: Context | None) -> None:
    global _default
    _default = ctx


def stream_key(namespace: str, job_id: int) -> str:
    return f"{namespace}:answer:{job_id}"


# -- leases: claim, heartbeat, finish -----------------------------------------------------


@dataclass
class Lease:
    ctx: Context
    job_id: int
    owner: str
    attempt: int  # a message taken over keeps its owner: the attempt tells the two holders apart
    lost: threading.Event

    def _mine(self):
        return (Job.id == self.job_id, Job.celery_task_id == self.owner, Job.attempts == self.attempt,
                Job.state == JobState.running)

    def update(self, **values) -> None:
        """Write to the job row if it is still ours; else raise JobLost."""
        if self.lost.is_set():
            raise JobLost(self.job_id)
        with self.ctx.session() as s:
            done = s.execute(update(Job).where(*self._mine()).values(heartbeat_at=utcnow(), **values))
        if done.rowcount == 0:
            self.lost.set()
            raise JobLost(self.job_id)

    def job(self, s: Session) -> Job:
        """The job row inside a transaction that will finish it (locked where the database can)."""
        job = s.get(Job, self.job_id, with_for_update=True, populate_existing=True)
        if (job is None or job.celery_task_id != self.owner or job.attempts != self.attempt
                or job.state != JobState.running):
            self.lost.set()
            raise JobLost(self.job_id)
        return job


def claim(ctx: Context, job_id: int, kind: JobKind, task_id: str | None = None) -> Lease | None:
    """Mark the job running for this worker, or say why not (None: nothing to do)."""
    owner = task_id or f"local-{uuid.uuid4().hex}"
    stale = utcnow() - timedelta(seconds=ctx.settings.stale_after_s)
    with ctx.session() as s:
        job = s.get(Job, job_id)
        if job is None:
            log.warning("job %s does not exist (deleted?): skipping", job_id)
            return None
        if job.kind != kind:
            log.error("job %s is a %s job, not %s: skipping", job_id, job.kind, kind)
            return None
        seen = job.heartbeat_at
        again = (job.state == JobState.running and job.celery_task_id == owner
                 and seen is not None and seen >= stale)
    # The same message again while its job runs: its worker died holding it (kill -9, out
    # of memory), or the broker lost the worker's connection and handed the message back
    # while the worker reads on. A live worker beats: see whether it does before taking over.
    if again and _beats(ctx, job_id, seen):
        log.info("job %s: its message came again while its worker still runs it: skipping", job_id)
        return None
    takeable = or_(
        Job.state == JobState.queued,
        (Job.state == JobState.running) & (Job.heartbeat_at < stale),  # its worker stopped beating
        (Job.state == JobState.running) & (Job.celery_task_id == owner) & (Job.heartbeat_at == seen),
    )
    with ctx.session() as s:
        attempt = s.scalar(
            update(Job).where(Job.id == job_id, Job.attempts < ctx.settings.max_attempts, takeable)
            .values(state=JobState.running, attempts=Job.attempts + 1, celery_task_id=owner,
                    heartbeat_at=utcnow(), started_at=utcnow(), error=None, finished_at=None)
            .returning(Job.attempts)
        )
        if attempt is not None:
            return Lease(ctx, job_id, owner, attempt, threading.Event())
        job = s.get(Job, job_id)
        if job.state.finished:
            log.info("job %s is already %s: duplicate delivery, nothing to do", job_id, job.state)
        elif job.state == JobState.running and job.heartbeat_at and job.heartbeat_at >= stale:
            log.info("job %s is running on another worker (owner %s): skipping", job_id, job.celery_task_id)
        else:  # out of attempts: whatever stopped it each time would again
            mark_failed(s, job, f"This job was started {job.attempts} times without finishing; it was given up")
            log.error("job %s: given up after %d attempts", job_id, job.attempts)
    return None


def _beats(ctx: Context, job_id: int, seen) -> bool:
    """Whether the job's heartbeat moves on from `seen` within two and a half beats."""
    deadline = time.monotonic() + 2.5 * ctx.settings.heartbeat_s
    while time.monotonic() < deadline:
        time.sleep(min(0.2, ctx.settings.heartbeat_s / 4))
        with ctx.session() as s:
            if s.scalar(select(Job.heartbeat_at).where(Job.id == job_id)) != seen:
                return True
    return False


@contextmanager
def heartbeat(lease: Lease) -> Iterator[None]:
    """Beat in a thread while the job runs: parsing a big PDF or generating an answer
    writes no progress for a while, and the reaper must not take a live job."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(lease.ctx.settings.heartbeat_s):
            try:
                lease.update()
            except JobLost:  # finished meanwhile (a batch by its children) or taken over
                return
            except Exception:  # the database may be back at the next beat
                log.warning("job %s: heartbeat failed", lease.job_id, exc_info=True)

    thread = threading.Thread(target=beat, name=f"heartbeat-{lease.job_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _sentence(text: str) -> str:
    text = " ".join(str(text).split()) or "Unknown error"
    text = text[0].upper() + text[1:]
    return text if text.endswith((".", "!", "?")) else text + "."


def mark_failed(s: Session, job: Job, message: str) -> None:
    job.state, job.error, job.finished_at, job.eta_s = JobState.failed, _sentence(message), utcnow(), None
    if job.kind == JobKind.ingest and job.document is not None:
        job.document.status, job.document.error = DocumentStatus.failed, job.error


def mark_succeeded(job: Job) -> None:
    job.state, job.progress, job.eta_s, job.error, job.finished_at = JobState.succeeded, 1.0, 0.0, None, utcnow()


def fail_job(ctx: Context, job_id: int, message: str, lease: Lease | None = None) -> None:
    """Record a failure, with a sentence fit to show, unless the job has finished (or,
    with `lease`, belongs to someone else by now)."""
    with ctx.session() as s:
        job = s.get(Job, job_id)
        if job is None or job.state.finished:
            return
        if lease is not None and (job.celery_task_id, job.attempts) != (lease.owner, lease.attempt):
            return
        mark_failed(s, job, message)
        kind, error = job.kind, job.error
    if kind == JobKind.answer:
        publish(ctx, job_id, {"event": "error", "message": error}, quiet=True)


def release(lease: Lease, note: str) -> None:
    """Back to queued, so that the retry (same task) can claim it."""
    try:
        with lease.ctx.session() as s:
            s.execute(update(Job).where(*lease._mine()).values(state=JobState.queued, error=note))
    except Exception:  # the database may be what failed: the reaper will find the job
        log.warning("job %s: could not put it back in the queue", lease.job_id, exc_info=True)


# -- batches and the reaper ---------------------------------------------------------------


def settle_parent_of(ctx: Context, job_id: int) -> None:
    """After a job ended: bring its batch, if it has one, up to date (never raises)."""
    try:
        with ctx.session() as s:
            parent_id = s.scalar(select(Job.parent_id).where(Job.id == job_id))
        if parent_id is not None:
            settle_parent(ctx, parent_id)
    except Exception:
        log.warning("job %s: could not update its batch", job_id, exc_info=True)


def settle_parent(ctx: Context, parent_id: int) -> None:
    """A batch's progress from its children; finished once they all are (called after each
    child's own commit, so the last child to finish sees every sibling finished)."""
    with ctx.session() as s:
        parent = s.get(Job, parent_id, with_for_update=True)
        if parent is None or parent.state.finished or not parent.children:
            return
        done = [c for c in parent.children if c.state.finished]
        parent.progress = len(done) / len(parent.children)
        parent.heartbeat_at = utcnow()
        if len(done) < len(parent.children):
            return
        failed = [c for c in parent.children if c.state != JobState.succeeded]
        if len(failed) == len(parent.children):
            mark_failed(s, parent, "No document of the batch could be summarised")
        else:
            mark_succeeded(parent)
        if failed:
            titles = [f'"{c.document.title}": {c.error}' if c.document else f"job {c.id}: {c.error}" for c in failed]
            parent.error = f"{len(failed)} of {len(parent.children)} documents failed. " + " ".join(titles)


def active_ingest(s: Session, document_id: int) -> Job | None:
    """The document's reading that is queued or running, if any."""
    return s.scalars(select(Job).where(Job.document_id == document_id, Job.kind == JobKind.ingest,
                                       Job.state.in_((JobState.queued, JobState.running)))
                     .order_by(Job.id).limit(1)).first()


def reap_stalled_jobs(ctx: Context | None = None) -> dict[str, list[int]]:
    """Requeue running jobs whose heartbeat stopped (their worker died without the broker
    noticing), or fail those out of attempts; then send again queued jobs whose message
    was lost. A batch waiting for its children is not stalled. Returns the ids
    {"requeued": [...], "failed": [...], "resent": [...]}."""
    ctx = ctx or default_context()
    cutoff = utcnow() - timedelta(seconds=ctx.settings.stale_after_s)
    requeued, failed = [], []
    with ctx.session() as s:
        stalled = s.scalars(select(Job).where(Job.state == JobState.running, or_(
            Job.heartbeat_at < cutoff, Job.heartbeat_at.is_(None) & (Job.created_at < cutoff)))).all()
        for job in stalled:
            if job.kind == JobKind.batch_summarize and any(not c.state.finished for c in job.children):
                continue
            if job.attempts >= ctx.settings.max_attempts:
                mark_failed(s, job, f"The worker stopped responding {job.attempts} times; the job was given up")
                failed.append(job.id)
                continue
            # conditional: a job that beat meanwhile is alive after all
            took = s.execute(update(Job).where(Job.id == job.id, Job.state == JobState.running,
                                               Job.heartbeat_at == job.heartbeat_at)
                             .values(state=JobState.queued,
                                     error="The worker stopped responding; the job is queued again."))
            if took.rowcount:
                requeued.append(job.id)
    for job_id in requeued:
        if ctx.enqueue is not None:
            ctx.enqueue(job_id)
    if requeued or failed:
        log.warning("reaper: requeued %s, failed %s", requeued, failed)
    return {"requeued": requeued, "failed": failed, "resent": resend_lost_jobs(ctx)}


def resend_lost_jobs(ctx: Context) -> list[int]:
    """Send again the queued jobs whose message the broker lost (it restarted without its
    data, or was down when they were sent). The broker holds `backlog()` job messages; when
    more jobs than that are queued, the difference is lost: as many jobs go again, those
    never sent first, then those sent longest ago (a queued job's heartbeat is when it was
    sent). A message too many costs nothing: `claim` lets only one run the job. Questions
    waiting for their document's reading have no message on purpose (the reading sends
    them when it ends) and are left out."""
    if ctx.enqueue is None or ctx.backlog is None:
        return []
    reading = aliased(Job)
    waits = Job.kind.in_((JobKind.answer, JobKind.summarize)) & exists().where(
        reading.document_id == Job.document_id, reading.kind == JobKind.ingest,
        reading.state.in_((JobState.queued, JobState.running)))
    with ctx.session() as s:
        queued = s.execute(select(Job.id, Job.celery_task_id, Job.heartbeat_at, Job.created_at)
                           .where(Job.state == JobState.queued, ~waits)).all()
    if not queued:
        return []
    try:
        missing = len(queued) - ctx.backlog()
    except Exception:  # the broker is still away: the next look will do
        log.warning("reaper: could not count the broker's messages", exc_info=True)
        return []
    # recently sent: its message may still be on its way (or the job's row committed just now)
    cutoff = utcnow() - timedelta(seconds=ctx.settings.stale_after_s)
    old = sorted((j for j in queued if (j.heartbeat_at or j.created_at) < cutoff),
                 key=lambda j: (j.celery_task_id is not None, j.heartbeat_at or j.created_at))
    resent = [j.id for j in old[:max(missing, 0)]]
    for job_id in resent:
        ctx.enqueue(job_id)
    if resent:
        log.warning("reaper: %d queued jobs had no message in the broker; sent again: %s", len(resent), resent)
    return resent


# -- the answer stream --------------------------------------------------------------------


def publish(ctx: Context, job_id: int, fields: dict, quiet: bool = False) -> None:
    r = ctx.redis()
    if r is None:
        return
    try:
        key = stream_key(ctx.settings.namespace, job_id)
        with r.pipeline(transaction=False) as p:  # one round trip a token
            p.xadd(key, {k: v if isinstance(v, str) else json.dumps(v) for k, v in fields.items()},
                   maxlen=STREAM_MAXLEN, approximate=True)
            p.expire(key, STREAM_TTL_S)
            p.execute()
    except Exception:
        if not quiet:
            raise
        log.warning("job %s: could not publish %s", job_id, fields.get("event"), exc_info=True)


def follow_answer(job_id: int, ctx: Context | None = None, *, block_ms: int = 30_000) -> Iterator[dict]:
    """Read an answer's stream as events (dicts) until "done" or "error"; how the app
    reads it. Raises TimeoutError when nothing comes for `block_ms`."""
    ctx = ctx or default_context()
    r = ctx.redis()
    if r is None:
        raise RuntimeError("answers stream through Redis: set INFINI_REDIS_URL")
    key, last = stream_key(ctx.settings.namespace, job_id), "0"
    while True:
        got = r.xread({key: last}, block=block_ms, count=100)
        if not got:
            raise TimeoutError(f"no answer event for job {job_id} within {block_ms} ms")
        for entry_id, fields in got[0][1]:
            last = entry_id
            event = {k.decode(): v.decode() for k, v in fields.items()}
            for name in ("cited_pages", "passages"):
                if name in event:
                    event[name] = json.loads(event[name])
            yield event
            if event["event"] in ("done", "error"):
                return
