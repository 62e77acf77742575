"""Engines, sessions, migrations, and the few queries every layer needs.

SQLite (the embedded default) gets, on every connection: foreign keys ON (it
ignores ON DELETE CASCADE otherwise), WAL (readers don't block the writer, so
the UI can read while a worker writes progress) and a busy timeout (processes
wait for the write lock instead of failing at once).

Note for SQLite: the sqlite3 driver starts its transaction at the first write,
not at `BEGIN`; rollback of everything since then works, but SAVEPOINTs
(`session.begin_nested()`) don't nest properly. The helpers here avoid them.

After a fork (Celery prefork, gunicorn) call `get_engine().dispose(close=False)`
in the child so it doesn't share its parent's connections.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any, cast

from sqlalchemy import Engine, Table, create_engine, event, inspect, select, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

from storage.models import Document, Snapshot, SnapshotKind

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
SQLITE_BUSY_TIMEOUT_MS = 30_000
MIGRATION_LOCK_ID = 0x1F1A1  # any constant; names the advisory lock on PostgreSQL


def make_engine(
    url: str | None = None, *, sqlite_foreign_keys: bool = True, **kwargs: Any
) -> Engine:
    """An engine for `url` (default: the settings' database_url).

    `sqlite_foreign_keys=False` is for migrations only: SQLite batch mode
    recreates tables, and dropping the old table would cascade-delete children.
    """
    if url is None:
        from storage.settings import get_settings

        url = get_settings().database_url
    u = make_url(url)
    if u.get_backend_name() != "sqlite":
        kwargs.setdefault("pool_pre_ping", True)  # survive database restarts
        return create_engine(u, **kwargs)

    db = u.database or ""
    if db and db != ":memory:" and not db.startswith("file:"):
        Path(db).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(u, **kwargs)

    @event.listens_for(engine, "connect")
    def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")  # durable enough with WAL, much faster
        cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cur.execute(f"PRAGMA foreign_keys={'ON' if sqlite_foreign_keys else 'OFF'}")
        cur.close()

    return engine


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    # expire_on_commit=False: rows stay readable after the scope ends (workers
    # pass them to the model code, the app serializes them)
    return sessionmaker(engine, expire_on_commit=False)


@lru_cache(maxsize=1)
def get_engine() -> Engine:
    """The process-wide engine for the settings' database."""
    return make_engine()


@lru_cache(maxsize=1)
def get_session_factory() -> sessionmaker[Session]:
    return make_session_factory(get_engine())


@contextmanager
def session_scope(bind: Engine | sessionmaker[Session] | None = None) -> Iterator[Session]:
    """A session that commits at the end of the block, or rolls back if it raises."""
    if bind is None:
        factory = get_session_factory()
    elif isinstance(bind, Engine):
        factory = make_session_factory(bind)
    else:
        factory = bind
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


# --- migrations ------------------------------------------------------------


def alembic_config(url: str | None = None) -> Any:
    """An Alembic Config that needs no alembic.ini and works from any cwd."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    if url is not None:
        # configparser treats % as interpolation (URL-encoded passwords have it)
        cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def _run_alembic(action: str, url: str | None, revision: str) -> None:
    from alembic import command

    engine = make_engine(url, sqlite_foreign_keys=False, poolclass=NullPool)
    try:
        # one transaction: on PostgreSQL a failed migration leaves nothing behind
        with _sqlite_file_lock(engine), engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                # processes starting together (app + workers) migrate one at a time
                conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": MIGRATION_LOCK_ID})
            cfg = alembic_config()
            cfg.attributes["connection"] = conn
            getattr(command, action)(cfg, revision)
    finally:
        engine.dispose()


@contextmanager
def _sqlite_file_lock(engine: Engine) -> Iterator[None]:
    """The SQLite counterpart of the advisory lock: a lock file beside the database."""
    db = engine.url.database or ""
    if engine.dialect.name != "sqlite" or not db or db == ":memory:" or db.startswith("file:"):
        yield
        return
    import fcntl  # POSIX only, like the workers

    with open(f"{db}.migrate-lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released when the file is closed
        yield


def migrate(url: str | None = None, revision: str = "head") -> None:
    """Upgrade the database at `url` (default: settings) to `revision`.

    Safe to call from every process at start-up. An in-memory SQLite database
    can't be migrated this way (each connection is a new one): use
    `Base.metadata.create_all(engine)` for those."""
    _run_alembic("upgrade", url, revision)


def downgrade(url: str | None = None, revision: str = "base") -> None:
    """Downgrade the database at `url` to `revision` ("base": drop every table)."""
    _run_alembic("downgrade", url, revision)


def current_revision(url: str | None = None) -> str | None:
    """The database's Alembic revision, None if it was never migrated."""
    from alembic.runtime.migration import MigrationContext

    engine = make_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            if not inspect(conn).has_table("alembic_version"):
                return None
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()


def head_revision() -> str | None:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config()).get_current_head()


# --- queries -----------------------------------------------------------------


def get_or_create_document(
    session: Session, owner_id: int, content_sha256: str, **fields: Any
) -> tuple[Document, bool]:
    """The owner's document with this content hash, inserted with `fields` if new.

    Returns (document, created). Safe against a concurrent upload of the same
    file: INSERT ... ON CONFLICT DO NOTHING, then read whichever row won.
    """
    where = (Document.owner_id == owner_id, Document.content_sha256 == content_sha256)
    doc = session.scalars(select(Document).where(*where)).one_or_none()
    if doc is not None:
        return doc, False
    # a Core insert: column defaults (status, timestamps) still apply
    table = cast(Table, Document.__table__)
    values = dict(fields, owner_id=owner_id, content_sha256=content_sha256)
    conflict = ["owner_id", "content_sha256"]
    if session.get_bind().dialect.name == "postgresql":
        pg = postgresql.insert(table).values(values).on_conflict_do_nothing(index_elements=conflict)
        inserted = session.execute(pg.returning(table.c.id)).first()
    else:
        lite = sqlite.insert(table).values(values).on_conflict_do_nothing(index_elements=conflict)
        inserted = session.execute(lite.returning(table.c.id)).first()
    # RETURNING gives a row only if this call inserted
    doc = session.scalars(select(Document).where(*where)).one()
    return doc, inserted is not None


def latest_snapshot(
    session: Session,
    document_id: int,
    model_fingerprint: str | None = None,
    kind: SnapshotKind | None = None,
) -> Snapshot | None:
    """The snapshot with the most tokens read (the newest wins a tie), optionally
    only for one model and/or one kind. What an answer or a resumed ingest loads."""
    q = select(Snapshot).where(Snapshot.document_id == document_id)
    if model_fingerprint is not None:
        q = q.where(Snapshot.model_fingerprint == model_fingerprint)
    if kind is not None:
        q = q.where(Snapshot.kind == kind)
    q = q.order_by(Snapshot.tokens.desc(), Snapshot.id.desc())
    return session.scalars(q.limit(1)).first()
