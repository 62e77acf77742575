"""Fixtures for the workers: a tiny model, the embedded setup (SQLite, local blobs, no
broker server), and this machine's PostgreSQL and Redis (required when CI=true)."""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import text

# importing workers.celery_app reads the settings, which write a secret key under the
# data folder: never the checkout's ./data
os.environ.setdefault("INFINI_DATA_DIR", tempfile.mkdtemp(prefix="infini-workers-tests-"))

from storage import db  # noqa: E402
from tests.storage.conftest import pg_admin_url, service_unavailable  # noqa: E402,F401  (fixtures)
from tests.tiny_models import save_tiny_checkpoint  # noqa: E402
from tests.workers.helpers import SEGMENT_LEN, make_context, settings_fields  # noqa: E402

REDIS_URL = os.environ.get("INFINI_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny_model(tiny_dir):
    from infini_core.attention import InfiniConfig
    from infini_core.loading import load_model

    return load_model(tiny_dir, infini=InfiniConfig(segment_len=SEGMENT_LEN), device="cpu")


@pytest.fixture(scope="session")
def redis_url() -> str:
    import redis

    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3).ping()
    except Exception as e:
        service_unavailable(f"Redis unreachable at {REDIS_URL}: {type(e).__name__}: {e}")
    return REDIS_URL


@pytest.fixture(scope="module")
def pg_database(pg_admin_url) -> Iterator[str]:  # noqa: F811
    """A fresh, migrated PostgreSQL database of its own for a module."""
    name = f"infini_test_workers_{uuid.uuid4().hex[:10]}"
    admin = db.make_engine(pg_admin_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        url = admin.url.set(database=name).render_as_string(hide_password=False)
        db.migrate(url)
        yield url
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


@pytest.fixture
def embedded(tmp_path, tiny_dir, tiny_model):
    """A context of the embedded default: SQLite file, local blobs, no Redis."""
    fields = settings_fields(tmp_path / "data", tiny_dir)
    db.migrate(fields["database_url"])
    ctx = make_context(fields, model=tiny_model)
    yield ctx
    ctx.engine.dispose()
