"""The product's configuration: one `Settings` class, read from `INFINI_*` env vars.

Every layer (storage, workers, app) reads its configuration from here, so the
README's settings table can be generated from these fields' descriptions.

Defaults give a working single-machine setup with no servers: a SQLite file,
a local blob folder and a SQLite-backed Celery broker, all under `data_dir`.
Celery keeps no results: every job's outcome is its Job row.
Paths derived from `data_dir` are filled in after validation, so setting only
`INFINI_DATA_DIR` moves everything.

`secret_key`: if unset, a random key is generated once into
`<data_dir>/secret_key` (mode 0600) and reused by every process that shares
the folder. Set `INFINI_SECRET_KEY` explicitly when processes on several hosts
must agree on it.
"""

from __future__ import annotations

import os
import secrets
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

SECRET_KEY_FILE = "secret_key"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="INFINI_", env_file=".env", extra="ignore")

    data_dir: Path = Field(
        Path("data"),
        description="Folder for everything the embedded setup keeps on disk "
        "(SQLite database, blobs, broker, generated secret key).",
    )
    database_url: str = Field(
        "",
        description="SQLAlchemy URL of the database. Default: "
        "`sqlite:///<data_dir>/infini.sqlite`; production: `postgresql+psycopg://user:pass@host/db`.",
    )
    blob_backend: Literal["local", "s3"] = Field(
        "local",
        description="Where uploads and memory snapshots are stored: `local` folder or `s3`.",
    )
    blob_dir: Path | None = Field(
        None, description="Folder of the local blob store. Default: `<data_dir>/blobs`."
    )
    s3_endpoint_url: str | None = Field(
        None, description="S3 endpoint for S3-compatible stores (MinIO, R2...); unset for AWS."
    )
    s3_bucket: str | None = Field(
        None, description="S3 bucket name (required when blob_backend=s3)."
    )
    s3_access_key: str | None = Field(
        None, description="S3 access key id; unset to use boto3's own lookup."
    )
    s3_secret_key: SecretStr | None = Field(None, description="S3 secret access key.")
    s3_region: str | None = Field(None, description="S3 region name.")
    broker_url: str = Field(
        "",
        description="Celery broker URL. Default: `sqla+sqlite:///<data_dir>/broker.sqlite` "
        "(no server needed); production: `redis://host:6379/0`.",
    )
    result_backend: str | None = Field(
        None,
        description="Celery result backend; unset: none, since every outcome is a Job row.",
    )
    redis_url: str | None = Field(
        None,
        description="Redis URL for streaming answer tokens to the UI; unset: answers arrive whole.",
    )
    model: str = Field(
        "smollm2-135m-instruct",
        description="Base model: `smollm2-135m-instruct` (shipped) or a Hugging Face Llama-family "
        "checkpoint directory or id.",
    )
    adapter: str = Field(
        "default",
        description="Infini-attention memory adapter: `default` (the one shipped for the default model), "
        "`none` (memory unused: gates closed), or the path of an adapter file.",
    )
    segment_len: int = Field(512, gt=0, description="Tokens per Infini-attention segment (an adapter is "
                             "trained for one: another one needs `adapter=none` or an adapter trained for it).")
    max_upload_mb: int = Field(200, gt=0, description="Largest accepted upload, in MB.")

    # -- workers ---------------------------------------------------------------------------
    namespace: str = Field(
        "infini",
        description="Name of the Celery queues and prefix of the Redis keys, so that several "
        "deployments (or test runs) can share one Redis.",
    )
    concurrency: int | None = Field(
        None, ge=1, description="Tasks at a time per worker. Default: one per GPU (1 without GPU)."
    )
    device: str | None = Field(
        None,
        description="Torch device of the model (`cuda:1`, `cpu`). Default: a GPU per "
        "worker process when there are GPUs, else the CPU.",
    )
    checkpoint_every: int = Field(
        64, ge=1, description="Segments read between two checkpoints of a document's memory (on a GPU, "
        "also the longest block a worker reads through one CUDA graph).",
    )
    checkpoint_interval_s: float = Field(
        30.0, ge=0, description="Least seconds of reading between two checkpoints (a GPU reads "
        "64 segments in tens of milliseconds: a checkpoint after each would cost more than the reading).",
    )
    heartbeat_s: float = Field(
        10.0, gt=0, description="Seconds between two heartbeats of a running job."
    )
    stale_after_s: float = Field(
        120.0,
        gt=0,
        description="A running job whose heartbeat is older than this is requeued; a queued "
        "job sent longer ago than this may be sent again if the broker lost its message.",
    )
    reap_every_s: float = Field(
        60.0, gt=0, description="Seconds between two looks for stalled or lost jobs."
    )
    max_attempts: int = Field(
        5,
        ge=1,
        description="Times a job may start (retries and dead workers included) before it "
        "is given up; keep it above max_retries.",
    )
    max_retries: int = Field(
        4, ge=0, description="Retries of a job after a transient error (database, Redis, network)."
    )
    retry_backoff_s: float = Field(
        2.0, ge=0, description="First retry delay; it doubles each time."
    )
    ingest_time_limit_s: int = Field(
        6 * 3600, gt=0, description="Longest reading of one document, in seconds."
    )
    answer_time_limit_s: int = Field(300, gt=0, description="Longest answer, in seconds.")
    summarize_time_limit_s: int = Field(
        3600, gt=0, description="Longest summary of one document, in seconds."
    )
    answer_passages: int = Field(
        4, ge=0, description="Passages retrieved into a question's window."
    )
    answer_max_tokens: int = Field(256, gt=0, description="Longest answer, in tokens.")
    summary_sections: int = Field(
        16, ge=1, description="At most this many section summaries before the overall summary."
    )
    summary_max_tokens: int = Field(
        160, gt=0, description="Longest summary of one section, in tokens."
    )
    states_cached: int = Field(
        4, ge=1, description="Memory snapshots each worker process keeps loaded for questions (settled: "
        "the unfinished last segment already read, so later questions skip it)."
    )

    # -- secrets ---------------------------------------------------------------------------
    secret_key: SecretStr = Field(
        SecretStr(""),
        description="Key for signing sessions and tokens. Default: random, generated once "
        "into `<data_dir>/secret_key`.",
    )

    @model_validator(mode="after")
    def _fill_derived(self) -> Settings:
        # absolute, so URLs and paths mean the same whatever a process's cwd
        self.data_dir = self.data_dir.expanduser().absolute()
        d = self.data_dir
        if not self.database_url:
            self.database_url = f"sqlite:///{d / 'infini.sqlite'}"
        if self.blob_dir is None:
            self.blob_dir = d / "blobs"
        if not self.broker_url:
            self.broker_url = f"sqla+sqlite:///{d / 'broker.sqlite'}"
        if not self.secret_key.get_secret_value():
            self.secret_key = SecretStr(_load_or_create_secret(d / SECRET_KEY_FILE))
        return self

    @property
    def max_upload_bytes(self) -> int:
        return self.max_upload_mb * 1024 * 1024


def _load_or_create_secret(path: Path) -> str:
    """Read the key file, or create it. The key is written to a temp file and
    hard-linked into place, so concurrent first starts all end up with one key
    and nobody ever reads a half-written file."""
    if path.exists():
        return _read_secret(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".secret-")  # mode 0600
    try:
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(48) + "\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # another process won the race: use its key
    finally:
        os.unlink(tmp)
    return _read_secret(path)


def _read_secret(path: Path) -> str:
    key = path.read_text().strip()
    if not key:
        raise RuntimeError(f"{path} is empty: delete it or set INFINI_SECRET_KEY")
    return key


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings; call `get_settings.cache_clear()` after changing env vars."""
    return Settings()
