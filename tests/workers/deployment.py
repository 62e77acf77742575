"""A real Celery worker in a subprocess, and the test process as the web app beside it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from storage.models import Job
from tests.workers.helpers import job, make_context, settings_env
from workers import jobs
from workers.celery_app import backlog, enqueue, make_app

ROOT = Path(__file__).resolve().parents[2]
JOB_TIMEOUT_S = 120  # this machine's two cores may be shared


class Worker:
    """`celery worker` in its own process group, logging to a file."""

    def __init__(self, fields: dict, log: Path, extra_env: dict | None = None, args: tuple[str, ...] = ()):
        env = {k: v for k, v in os.environ.items() if not k.startswith("INFINI_")}
        env.update(settings_env(fields), INFINI_CACHE_DIR=str(log.parent / "cache"), **(extra_env or {}))
        self.log_path = log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.workers.worker_main", "worker", "--pool=prefork", "--concurrency=1",
             "--loglevel=INFO", "--without-gossip", "--without-mingle", "--without-heartbeat",
             "-n", f"test-{uuid.uuid4().hex[:6]}@%h", *args],
            cwd=ROOT, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout: float = 60) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if found := re.search(pattern, self.log()):
                return found
            if self.proc.poll() is not None:
                pytest.fail(f"the worker exited ({self.proc.returncode}):\n{self.log()[-3000:]}")
            time.sleep(0.2)
        pytest.fail(f"no {pattern!r} in the worker log within {timeout} s:\n{self.log()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # warm shutdown; the main process ends its children
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)  # its own process group: only what it started
                self.proc.wait()


@dataclass
class Deployment:
    ctx: jobs.Context
    worker: Worker
    kill_marker: Path
    producer: object  # a Celery app, as the web app would hold

    def send(self, job_id: int) -> None:
        assert self.ctx.enqueue(job_id)

    def wait(self, job_id: int, timeout: float = JOB_TIMEOUT_S) -> Job:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            j = job(self.ctx, job_id)
            if j.state.finished:
                return j
            time.sleep(0.2)
        pytest.fail(f"job {job_id} still {j.state} after {timeout} s:\n{self.worker.log()[-3000:]}")


def deploy(fields: dict, tiny_model, data: Path, args: tuple[str, ...] = ()):
    marker = data / "kill-after-checkpoint"
    worker = Worker(fields, data / "worker.log", {"INFINI_TEST_KILL_MARKER": str(marker)}, args)
    ctx = make_context(fields, model=tiny_model)
    producer = make_app(ctx.settings)  # what the web app sends with
    ctx.enqueue = lambda job_id: enqueue(job_id, sessions=ctx.sessions, producer=producer)
    ctx.backlog = lambda: backlog(producer)
    try:
        worker.wait_for(r"@\S+ ready\.", timeout=90)
        yield Deployment(ctx, worker, marker, producer)
    finally:
        worker.stop()
        producer.close()
        ctx.engine.dispose()
