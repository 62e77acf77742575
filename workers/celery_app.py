"""The Celery app, configured from the settings, and how to send it work.

    celery -A workers.celery_app worker -B          one machine (embedded broker, reaper in it)
    celery -A workers.celery_app worker             each GPU host (Redis broker)
    celery -A workers.celery_app beat               once per deployment: the reaper's clock

Kept light (no torch): the web app imports `create_job` / `enqueue` / `submit` from here.
The tasks and the per-process model live in `workers.tasks`; docs/jobs.md tells the whole
life of a job.
"""

from __future__ import annotations

import logging
import subprocess
import sys

from celery import Celery, signals
from celery.utils import uuid
from kombu import Queue
from kombu.exceptions import OperationalError as BrokerUnreachable
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from storage.db import session_scope
from storage.models import Document, DocumentStatus, Job, JobKind, JobState, utcnow
from storage.settings import Settings, get_settings

log = logging.getLogger(__name__)

TASK_NAMES = {
    JobKind.ingest: "infini.ingest_document",
    JobKind.answer: "infini.answer_question",
    JobKind.summarize: "infini.summarize_document",
    JobKind.batch_summarize: "infini.batch_summarize",
}
REAP_TASK = "infini.reap_stalled_jobs"


def make_app(settings: Settings | None = None) -> Celery:
    s = settings or get_settings()
    longest = max(s.ingest_time_limit_s, s.answer_time_limit_s, s.summarize_time_limit_s) + 60
    transport = {}
    if s.broker_url.startswith(("redis://", "rediss://")):
        # Redis hands an unacked message to another worker after this long: it must
        # outlast the longest task, or a long reading would run twice at once
        transport["visibility_timeout"] = longest + 600
    elif s.broker_url.startswith("sqla+sqlite"):
        transport["connect_args"] = {"timeout": 30}  # wait for SQLite's write lock, don't fail
    app = Celery("infini", broker=s.broker_url, backend=s.result_backend, include=["workers.tasks"])
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_ignore_result=True,  # outcomes are Job rows
        task_default_queue=s.namespace,
        # the reaper's ticks have a queue of their own: behind a backlog of jobs they would
        # wait for all of it, and they would blur the count of job messages (`backlog`)
        task_queues=[Queue(s.namespace), Queue(reaper_queue(s))],
        task_routes={REAP_TASK: {"queue": reaper_queue(s)}},
        # a message is acked when its task ends; a worker that dies gives it back
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,  # a long reading never holds a second message hostage
        # a broker that restarts must not stop hours of reading: the job's lease in the
        # database, not the message, says who runs it (Celery 6 will default to True)
        worker_cancel_long_running_tasks_on_connection_loss=False,
        worker_concurrency=s.concurrency,  # None: one per GPU, decided at worker start
        worker_proc_alive_timeout=300,  # a child loads the model before it says it is up
        broker_transport_options=transport,
        broker_connection_retry_on_startup=True,
        beat_schedule_filename=str(s.data_dir / "celerybeat-schedule"),
        beat_schedule={
            "reap-stalled-jobs": {
                "task": REAP_TASK,
                "schedule": s.reap_every_s,
                # behind a long reading, an old tick is worthless: drop it
                "options": {"expires": s.reap_every_s},
            }
        },
    )
    return app


def reaper_queue(s: Settings) -> str:
    return f"{s.namespace}.reaper"


app = make_app()


def gpu_count() -> int:
    """The GPUs torch sees, counted in a separate process: asking CUDA in the worker's main
    process would initialise it there, and the children it forks could not use it (seen)."""
    probe = "import torch; print(torch.cuda.device_count())"
    try:
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
        return int(out.stdout.split()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return 0


@signals.celeryd_init.connect
def _one_process_per_gpu(conf=None, **_) -> None:
    """Runs in the worker's main process before the pool forks."""
    if conf is not None and conf.worker_concurrency is None:
        conf.worker_concurrency = max(1, gpu_count())


# -- sending work ---------------------------------------------------------------------------


def create_job(s: Session, kind: JobKind, *, document_id: int | None = None, user_id: int | None = None,
               params: dict | None = None) -> Job:
    """A queued job row; `enqueue` it once the session has committed."""
    job = Job(kind=kind, document_id=document_id, user_id=user_id, params=params)
    s.add(job)
    if kind == JobKind.ingest and document_id is not None:
        doc = s.get(Document, document_id)
        if doc is not None:
            doc.status, doc.error = DocumentStatus.queued, None
    s.flush()
    return job


def enqueue(job_id: int, *, sessions: sessionmaker[Session] | None = None, producer: Celery | None = None) -> str | None:
    """Send a queued job to the workers under a new task id (written first, so the worker
    that claims it knows the message). Returns the task id, or None when the job is not
    queued or the broker cannot be reached: the job stays queued, and the reaper sends it
    once the broker is back (the jobs table is the truth, not the queue)."""
    task_id = uuid()
    with session_scope(sessions) as s:
        # a queued job's heartbeat is when it was last sent (see jobs.resend_lost_jobs)
        sent = s.execute(update(Job).where(Job.id == job_id, Job.state == JobState.queued)
                         .values(celery_task_id=task_id, heartbeat_at=utcnow()).returning(Job.kind)).first()
    if sent is None:
        return None
    try:
        (producer or app).send_task(TASK_NAMES[sent.kind], args=[job_id], task_id=task_id)
    except BrokerUnreachable as e:
        log.warning("job %s: not sent, the broker is unreachable (%r); the reaper will send it", job_id, e)
        with session_scope(sessions) as s:  # never sent: first in line when the reaper looks
            s.execute(update(Job).where(Job.id == job_id, Job.celery_task_id == task_id)
                      .values(celery_task_id=None))
        return None
    return task_id


def backlog(producer: Celery | None = None) -> int:
    """Job messages waiting in the broker (the reaper compares it with the queued jobs)."""
    celery = producer or app
    with celery.connection_for_read() as conn:
        return conn.default_channel.queue_declare(queue=celery.conf.task_default_queue).message_count


def submit(kind: JobKind, *, document_id: int | None = None, user_id: int | None = None,
           params: dict | None = None, sessions: sessionmaker[Session] | None = None,
           producer: Celery | None = None) -> int:
    """Create a job and send it: what the web app calls. Returns the job id."""
    with session_scope(sessions) as s:
        job_id = create_job(s, kind, document_id=document_id, user_id=user_id, params=params).id
    enqueue(job_id, sessions=sessions, producer=producer)
    return job_id
