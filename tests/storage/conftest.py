"""Fixtures for storage tests: databases on SQLite and on a real PostgreSQL.

PostgreSQL availability rule (`service_unavailable`): when a service a test
needs is unreachable, the test FAILS if CI=true (CI must not go green by
skipping) and is skipped with the reason otherwise.

PostgreSQL: `INFINI_TEST_PG_URL` is an admin URL (default
postgresql+psycopg://postgres@127.0.0.1:5432/postgres); a fresh database
`infini_test_<random>` is created from it once per test session and dropped
at the end.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from storage import db
from storage.settings import get_settings

PG_ADMIN_URL = os.environ.get(
    "INFINI_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)


def service_unavailable(reason: str) -> NoReturn:
    """Fail under CI=true, skip elsewhere."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason} (CI=true: required services must be up)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def pg_admin_url() -> str:
    """The admin URL, checked to be reachable."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        service_unavailable("PostgreSQL tests need psycopg: pip install 'psycopg[binary]'")
    engine = db.make_engine(PG_ADMIN_URL, connect_args={"connect_timeout": 5})
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as e:
        service_unavailable(
            f"PostgreSQL unreachable at {_safe(PG_ADMIN_URL)}: {type(e).__name__}: {e}"
        )
    finally:
        engine.dispose()
    return PG_ADMIN_URL


@pytest.fixture(scope="session")
def pg_url(pg_admin_url: str) -> Iterator[str]:
    """URL of a fresh, empty PostgreSQL database for this test session."""
    name = f"infini_test_{uuid.uuid4().hex[:12]}"
    admin = db.make_engine(
        pg_admin_url, isolation_level="AUTOCOMMIT"
    )  # CREATE DATABASE can't run in a transaction
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        yield make_url(pg_admin_url).set(database=name).render_as_string(hide_password=False)
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


def _safe(url: str) -> str:
    return make_url(url).render_as_string(hide_password=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty, unmigrated database of each dialect."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'test.sqlite'}"
    url = request.getfixturevalue("pg_url")
    db.downgrade(url, "base")  # the session database is shared: start from nothing
    return url


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    """A freshly migrated database of each dialect."""
    db.migrate(db_url)
    eng = db.make_engine(db_url)
    yield eng
    eng.dispose()


@pytest.fixture
def session_factory(engine: Engine) -> sessionmaker[Session]:
    return db.make_session_factory(engine)


@pytest.fixture
def settings_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """No INFINI_* variables but INFINI_DATA_DIR=<tmp>/data; the settings cache cleared."""
    for var in list(os.environ):
        if var.startswith("INFINI_"):
            monkeypatch.delenv(var)
    monkeypatch.chdir(tmp_path)  # no stray .env file is read
    data = tmp_path / "data"
    monkeypatch.setenv("INFINI_DATA_DIR", str(data))
    get_settings.cache_clear()
    yield data
    get_settings.cache_clear()
