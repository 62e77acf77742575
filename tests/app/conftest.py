"""Fixtures for the web app: a real SQLite database and blob folder per test, the tiny
model, and the workers' own functions run in a background thread in place of Celery
(one job at a time, as a worker with one process runs them)."""

from __future__ import annotations

import os
import queue
import random
import tempfile
import threading
import time
from pathlib import Path

import pytest

# importing workers.celery_app reads the settings, which write a secret key under the
# data folder: never the checkout's ./data
os.environ.setdefault("INFINI_DATA_DIR", tempfile.mkdtemp(prefix="infini-app-tests-"))

from storage import db  # noqa: E402
from storage.models import Job, JobKind  # noqa: E402
from storage.settings import Settings  # noqa: E402
from tests.workers.conftest import redis_url, tiny_dir, tiny_model  # noqa: E402,F401  (fixtures)
from tests.workers.helpers import SEGMENT_LEN  # noqa: E402
WORDS = ("lighthouse keeper lamp storm harbour ship sailor rope anchor tide gull cliff "
         "lantern captain voyage island").split()


def settings_for(data_dir: Path, model_dir, **overrides) -> Settings:
    fields = dict(data_dir=data_dir, database_url=f"sqlite:///{data_dir / 'infini.sqlite'}", redis_url=None,
                  model=str(model_dir), segment_len=SEGMENT_LEN, checkpoint_every=8, checkpoint_interval_s=0, device="cpu",
                  heartbeat_s=0.5, answer_max_tokens=12, summary_max_tokens=8, summary_sections=2,
                  secret_key="test-secret", max_upload_mb=1)
    return Settings(**{**fields, **overrides})


def book(seed: int = 0, paragraphs: int = 12, topic: str | None = None) -> str:
    """Sea words in paragraphs; `topic`, a rare word, goes into the last one."""
    rng = random.Random(seed)
    out = [" ".join(rng.choice(WORDS) for _ in range(30)).capitalize() + "." for _ in range(paragraphs)]
    if topic:
        out[-1] += f" The {topic} was hidden here."
    return "\n\n".join(out)


class InlineWorker:
    """Stands in for Celery: runs each dispatched job with `workers.service`, in order."""

    def __init__(self, settings: Settings, model):
        from workers import jobs, service

        self.ctx = jobs.Context(settings, model=model)  # no enqueue: a batch runs its children here
        self.run = {JobKind.ingest: service.ingest_document, JobKind.answer: service.answer_question,
                    JobKind.summarize: service.summarize_document, JobKind.batch_summarize: service.batch_summarize}
        self.jobs: queue.Queue[int | None] = queue.Queue()
        self.thread = threading.Thread(target=self._loop, name="inline-worker", daemon=True)
        self.thread.start()

    def __call__(self, job_id: int) -> None:
        self.jobs.put(job_id)

    def _loop(self) -> None:
        while (job_id := self.jobs.get()) is not None:
            with self.ctx.session() as s:
                kind = s.get(Job, job_id).kind
            self.run[kind](job_id, self.ctx)

    def stop(self) -> None:
        self.jobs.put(None)
        self.thread.join(60)
        self.ctx.engine.dispose()


@pytest.fixture
def make_client(tmp_path, tiny_dir, tiny_model):
    """make_client(**settings) -> a TestClient of the whole app on a fresh database."""
    from fastapi.testclient import TestClient

    from app.main import create_app
    from app.services import Services

    made = []

    def make(**overrides):
        settings = settings_for(tmp_path / f"data{len(made)}", tiny_dir, **overrides)
        db.migrate(settings.database_url)
        worker = InlineWorker(settings, tiny_model)
        from workers import jobs

        svc = Services(jobs.Context(settings), worker)
        client = TestClient(create_app(svc))
        made.append((client, worker, svc))
        return client

    yield make
    for client, worker, svc in made:
        client.close()
        worker.stop()
        svc.ctx.engine.dispose()


def wait_for(check, timeout: float = 60, every: float = 0.1):
    """Poll `check()` until it returns something truthy; that value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if got := check():
            return got
        time.sleep(every)
    raise AssertionError(f"not true within {timeout} s: {check}")
