"""Redis, the broker, restarted while a job runs and others wait in its queue: no job is
lost, because the jobs table, not the queue, is the truth. The test runs a Redis server
of its own (never the machine's), kills it as a crash would and starts it again empty."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from storage.models import JobKind, JobState
from tests.storage.conftest import service_unavailable
from tests.workers.deployment import deploy
from tests.workers.helpers import add_document, add_job, book, job, settings_fields

pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy:DeprecationWarning")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """redis-server on a port of its own, keeping nothing on disk: a restart starts empty."""

    def __init__(self, exe: str, folder: Path):
        self.exe, self.folder, self.port = exe, folder, free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.start()

    def start(self) -> None:
        import redis

        self.proc = subprocess.Popen(
            [self.exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.folder)],
            stdout=open(self.folder / "redis.log", "ab"), stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                redis.Redis.from_url(self.url, socket_connect_timeout=1).ping()
                return
            except redis.ConnectionError:
                time.sleep(0.05)
        pytest.fail(f"redis-server did not start:\n{(self.folder / 'redis.log').read_text()}")

    def kill(self) -> None:
        """As a crash would: whatever it held in memory is gone."""
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def redis_server(tmp_path):
    exe = shutil.which("redis-server")
    if exe is None:
        service_unavailable("redis-server is not installed")
    folder = tmp_path / "redis"
    folder.mkdir()
    server = RedisServer(exe, folder)
    yield server
    server.kill()


@pytest.fixture
def deployment(tmp_path, tiny_dir, tiny_model, pg_database, redis_server):
    data = tmp_path / "data"
    data.mkdir()
    # the reaper's clock (beat) runs in the worker, ticking every second; a queued job
    # counts as lost once its message is 5 s old and the broker does not hold it
    fields = settings_fields(data, tiny_dir, database_url=pg_database, broker_url=redis_server.url,
                             redis_url=redis_server.url, reap_every_s=1, stale_after_s=5)
    yield from deploy(fields, tiny_model, data, args=("--beat",))


def test_no_job_is_lost_when_redis_restarts_mid_run(deployment, redis_server):
    d = deployment
    running = add_job(d.ctx, JobKind.ingest, add_document(d.ctx, book(seed=20, chars=8000), title="Long"))
    queued = add_job(d.ctx, JobKind.ingest, add_document(d.ctx, book(seed=21, chars=400), title="Queued"))
    d.send(running)
    d.send(queued)  # one worker process: this one waits in Redis
    deadline = time.monotonic() + 60
    while job(d.ctx, running).state != JobState.running and time.monotonic() < deadline:
        time.sleep(0.05)
    assert job(d.ctx, running).state == JobState.running and job(d.ctx, queued).state == JobState.queued

    redis_server.kill()
    during = add_job(d.ctx, JobKind.ingest, add_document(d.ctx, book(seed=22, chars=400), title="During"))
    assert d.ctx.enqueue(during) is None  # the broker is away: the job waits in the table, unsent
    redis_server.start()  # empty: the queued job's message is gone too

    for job_id in (running, queued, during):
        done = d.wait(job_id)
        assert done.state == JobState.succeeded, (job_id, done.error)
    assert job(d.ctx, running).attempts == 1  # read on through the outage, never started again
    d.worker.wait_for(r"Connection to broker lost", timeout=1)
    d.worker.wait_for(rf"queued jobs had no message in the broker; sent again: .*{during}", timeout=1)
