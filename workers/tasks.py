"""The Celery tasks: thin wrappers around `workers.service`, plus the worker process's life.

Every task takes one argument, the id of a Job row that says what to do; the row also
carries progress and the outcome. Transient errors (database, Redis, network) are
retried with exponential backoff, up to `max_retries`; a job's own bad input never is.

The worker's main process imports this module but never torch: `workers.service` (the
model) is imported inside the tasks, which run in the forked children. CUDA started
in a parent is unusable in the children it forks (seen on H200s: "CUDA error:
initialization error").
"""

from __future__ import annotations

import logging

from celery import Task, signals
from celery.exceptions import TimeLimitExceeded
from celery.utils.time import get_exponential_backoff_interval

from storage.models import JobKind
from workers import jobs
from workers.celery_app import REAP_TASK, TASK_NAMES, app, backlog, enqueue
from storage.settings import get_settings

log = logging.getLogger(__name__)

_context: jobs.Context | None = None


def context() -> jobs.Context:
    """This process's settings, connections and warm model."""
    global _context
    if _context is None:
        ctx = jobs.Context(get_settings(), backlog=backlog)
        ctx.enqueue = lambda job_id: enqueue(job_id, sessions=ctx.sessions)
        jobs.set_default_context(ctx)
        _context = ctx
    return _context


def _run(task: Task, work: str, job_id: int) -> str:
    from workers import service  # in the child only (see above)

    try:
        return getattr(service, work)(job_id, context(), task_id=task.request.id)
    except Exception as e:
        if not jobs.is_transient(e):
            raise
        retries = task.request.retries
        if retries >= task.max_retries:
            jobs.fail_job(context(), job_id, f"It kept failing with a temporary error ({type(e).__name__}), "
                                                f"{retries + 1} times; try again later")
            raise
        s = context().settings
        countdown = get_exponential_backoff_interval(int(s.retry_backoff_s), retries, 300, full_jitter=True)
        raise task.retry(exc=e, countdown=countdown)


def _options(time_limit_setting: str) -> dict:
    s = get_settings()
    limit = getattr(s, time_limit_setting)
    # the soft limit raises inside the task (the job fails with a sentence); the hard
    # one kills the process a minute later, if the task ignored the first
    return dict(bind=True, max_retries=s.max_retries, soft_time_limit=limit, time_limit=limit + 60)


@app.task(name=TASK_NAMES[JobKind.ingest], **_options("ingest_time_limit_s"))
def ingest_document(self: Task, job_id: int) -> str:
    return _run(self, "ingest_document", job_id)


@app.task(name=TASK_NAMES[JobKind.answer], **_options("answer_time_limit_s"))
def answer_question(self: Task, job_id: int) -> str:
    return _run(self, "answer_question", job_id)


@app.task(name=TASK_NAMES[JobKind.summarize], **_options("summarize_time_limit_s"))
def summarize_document(self: Task, job_id: int) -> str:
    return _run(self, "summarize_document", job_id)


@app.task(name=TASK_NAMES[JobKind.batch_summarize], **_options("summarize_time_limit_s"))
def batch_summarize(self: Task, job_id: int) -> str:
    return _run(self, "batch_summarize", job_id)


@app.task(name=REAP_TASK, time_limit=300)
def reap_stalled_jobs() -> dict:
    return jobs.reap_stalled_jobs(context())


# -- the worker process's life --------------------------------------------------------------


@signals.worker_init.connect
def _migrate(**_) -> None:
    """Bring the database to the code's schema before any task runs (safe from every
    process at once: storage.db.migrate takes a lock)."""
    from storage.db import migrate

    migrate(context().settings.database_url)


@signals.worker_process_init.connect
def _init_process(**_) -> None:
    """In each forked child: fresh connections, its own GPU, the model loaded once."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a worker log is no terminal
    ctx = context()
    ctx.after_fork()
    if ctx.device is None:
        import torch
        from billiard.process import current_process

        gpus = torch.cuda.device_count()
        if gpus > 1:  # one child per GPU (concurrency = GPU count)
            ctx.device = f"cuda:{current_process().index % gpus}"
            torch.cuda.set_device(ctx.device)  # (CUDA graphs capture on the current device)
    try:
        ctx.model()
    except Exception:  # the tasks will report it on their jobs; a crash here would respawn forever
        log.exception("the model could not be loaded")


@signals.worker_ready.connect
def _reap_at_start(**_) -> None:
    """Jobs left running by a worker that died while none was watching."""
    try:
        jobs.reap_stalled_jobs(context())
    except Exception:
        log.exception("could not look for stalled jobs")


@signals.task_failure.connect
def _hard_time_limit(sender=None, exception=None, args=None, **_) -> None:
    """A hard time limit kills the child before it can fail its job: fail it here."""
    if isinstance(exception, TimeLimitExceeded) and getattr(sender, "name", None) in TASK_NAMES.values() and args:
        jobs.fail_job(context(), args[0], "The job took longer than its time limit and was stopped")
