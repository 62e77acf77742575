"""Settings, migrations and models, on SQLite and on a real PostgreSQL."""

from __future__ import annotations

import multiprocessing
import stat
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, func, inspect, select, text
from sqlalchemy.exc import IntegrityError, StatementError
from sqlalchemy.orm import Session, sessionmaker

from storage import db
from storage.models import (
    Answer,
    ApiToken,
    Base,
    Document,
    DocumentStatus,
    Job,
    JobKind,
    JobState,
    Segment,
    Snapshot,
    SnapshotKind,
    Summary,
    User,
)
from storage.settings import Settings, get_settings

SHA_A = "a" * 64
SHA_B = "b" * 64


def count(session: Session, model: type[Base]) -> int:
    return session.scalar(select(func.count()).select_from(model)) or 0


def add_user(session: Session, email: str = "ann@example.com") -> User:
    user = User(email=email, password_hash="x")
    session.add(user)
    session.flush()
    return user


def add_document(session: Session, owner: User, sha: str = SHA_A) -> Document:
    doc = Document(
        owner=owner, title="Moby Dick", filename="moby.pdf", content_sha256=sha, bytes=10
    )
    session.add(doc)
    session.flush()
    return doc


# --- settings ------------------------------------------------------------------


def test_settings_defaults_derive_from_data_dir(settings_env: Path) -> None:
    s = get_settings()
    assert s is get_settings()  # cached
    assert s.data_dir == settings_env
    assert s.database_url == f"sqlite:///{settings_env / 'infini.sqlite'}"
    assert s.blob_backend == "local" and s.blob_dir == settings_env / "blobs"
    assert s.broker_url == f"sqla+sqlite:///{settings_env / 'broker.sqlite'}"
    assert s.result_backend is None  # outcomes are Job rows
    assert s.redis_url is None and s.adapter == "default"
    assert (s.model, s.segment_len, s.max_upload_mb) == ("smollm2-135m-instruct", 512, 200)
    assert s.max_upload_bytes == 200 * 1024 * 1024


def test_settings_from_env(settings_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFINI_DATABASE_URL", "postgresql+psycopg://u@h/db")
    monkeypatch.setenv("INFINI_BLOB_BACKEND", "s3")
    monkeypatch.setenv("INFINI_S3_BUCKET", "docs")
    monkeypatch.setenv("INFINI_SEGMENT_LEN", "2048")
    monkeypatch.setenv("INFINI_SECRET_KEY", "from-env")
    s = Settings()
    assert s.database_url == "postgresql+psycopg://u@h/db"
    assert (s.blob_backend, s.s3_bucket, s.segment_len) == ("s3", "docs", 2048)
    assert s.secret_key.get_secret_value() == "from-env"
    assert not (settings_env / "secret_key").exists()
    monkeypatch.setenv("INFINI_BLOB_BACKEND", "ftp")
    with pytest.raises(ValueError):
        Settings()


def test_secret_key_generated_once_and_private(settings_env: Path) -> None:
    key = Settings().secret_key.get_secret_value()
    assert len(key) >= 32
    path = settings_env / "secret_key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert Settings().secret_key.get_secret_value() == key  # every process agrees
    assert key not in repr(Settings())  # SecretStr: never printed
    assert [p.name for p in settings_env.iterdir()] == ["secret_key"]  # no temp file left


def test_every_setting_is_documented() -> None:
    # the README's settings table is generated from these
    for name, field in Settings.model_fields.items():
        assert field.description, f"Settings.{name} has no description"


# --- migrations ----------------------------------------------------------------


def schema_diff(engine: Engine) -> list[object]:
    with engine.connect() as conn:
        mc = MigrationContext.configure(conn, opts={"compare_type": True})
        return compare_metadata(mc, Base.metadata)


def test_migrations_up_and_down(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # no alembic.ini here: the config is built in code
    ours = set(Base.metadata.tables)
    assert db.current_revision(db_url) is None

    db.migrate(db_url)
    engine = db.make_engine(db_url)
    try:
        assert ours <= set(inspect(engine).get_table_names())
        assert db.current_revision(db_url) == db.head_revision()
        assert schema_diff(engine) == []  # the migrations build exactly the models' schema
        db.migrate(db_url)  # already at head: a no-op

        db.downgrade(db_url, "base")
        assert not ours & set(inspect(engine).get_table_names())
        assert db.current_revision(db_url) is None

        db.migrate(db_url)  # and back up again
        assert ours <= set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_concurrent_migrations(db_url: str) -> None:
    # app and workers all call migrate() at start-up, in separate processes
    # (processes, not threads: Alembic's `context` is process-global)
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        list(pool.map(db.migrate, [db_url] * 2))
    assert db.current_revision(db_url) == db.head_revision()


def test_sqlite_connection_settings(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'sub' / 'dir' / 'x.sqlite'}"  # parent folders are created
    engine = db.make_engine(url)
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == db.SQLITE_BUSY_TIMEOUT_MS
    engine.dispose()


# --- models --------------------------------------------------------------------


def test_round_trip(session_factory: sessionmaker[Session]) -> None:
    with db.session_scope(session_factory) as s:
        user = add_user(s, "  Ann@Example.COM ")
        s.add(ApiToken(user=user, token_hash="f" * 64, name="cli"))
        doc = add_document(s, user)
        doc.segments.append(
            Segment(
                index=0,
                text="Call me Ishmael.",
                page_start=1,
                page_end=1,
                token_start=0,
                token_end=5,
            )
        )
        s.add(
            Snapshot(
                document=doc,
                blob_key="snapshots/1/final.infini",
                bytes=3,
                sha256=SHA_B,
                model_fingerprint="fp",
                tokens=5,
                kind=SnapshotKind.final,
            )
        )
        job = Job(kind=JobKind.ingest, document=doc, params={"segment_len": 512})
        s.add(job)
        s.flush()
        s.add(
            Answer(
                document=doc,
                user_id=user.id,
                job_id=job.id,
                question="Who?",
                answer="Ishmael",
                cited_pages=[1, 2],
            )
        )
        s.add(Summary(document=doc, job_id=job.id, text="A whale."))
        doc_id = doc.id

    with db.session_scope(session_factory) as s:
        doc = s.get_one(Document, doc_id)
        assert doc.owner.email == "ann@example.com"  # normalized
        assert doc.status is DocumentStatus.uploaded
        assert doc.created_at.tzinfo is not None and doc.created_at.utcoffset().total_seconds() == 0
        assert [seg.text for seg in doc.segments] == ["Call me Ishmael."]
        assert doc.snapshots[0].kind is SnapshotKind.final
        job = doc.jobs[0]
        assert (job.state, job.progress, job.attempts, job.params) == (
            JobState.queued,
            0.0,
            0,
            {"segment_len": 512},
        )
        assert not job.state.finished
        assert doc.answers[0].cited_pages == [1, 2]
        assert doc.summaries[0].text == "A whale."
        assert doc.owner.api_tokens[0].name == "cli"
        # enums are stored as their values, readable from plain SQL
        assert s.execute(text("SELECT status FROM documents")).scalar() == "uploaded"


def test_updated_at_moves(session_factory: sessionmaker[Session]) -> None:
    with db.session_scope(session_factory) as s:
        doc = add_document(s, add_user(s))
        before = doc.updated_at
        doc.status = DocumentStatus.ready
    assert doc.updated_at > before
    with pytest.raises(StatementError, match="naive datetime"):
        with db.session_scope(session_factory) as s:
            s.add(User(email="b@x", password_hash="x", created_at=datetime(2024, 1, 1)))


def test_same_file_twice_is_one_row(session_factory: sessionmaker[Session]) -> None:
    with db.session_scope(session_factory) as s:
        ann, bob = add_user(s, "ann@x"), add_user(s, "bob@x")
        d1, created1 = db.get_or_create_document(
            s, ann.id, SHA_A, title="t", filename="f.pdf", bytes=3
        )
        d2, created2 = db.get_or_create_document(
            s, ann.id, SHA_A, title="other", filename="g.pdf", bytes=3
        )
        d3, created3 = db.get_or_create_document(
            s, bob.id, SHA_A, title="t", filename="f.pdf", bytes=3
        )
        assert (created1, created2, created3) == (True, False, True)
        assert d1.id == d2.id != d3.id
        assert (
            d2.title == "t" and d1.status is DocumentStatus.uploaded and d1.created_at is not None
        )
        assert count(s, Document) == 2
    # the database itself refuses a second row
    with pytest.raises(IntegrityError):
        with db.session_scope(session_factory) as s:
            add_document(s, s.get_one(User, ann.id), SHA_A)
    with db.session_scope(session_factory) as s:
        assert count(s, Document) == 2


def test_email_unique(session_factory: sessionmaker[Session]) -> None:
    with db.session_scope(session_factory) as s:
        add_user(s, "ann@x")
    with pytest.raises(IntegrityError):
        with db.session_scope(session_factory) as s:
            add_user(s, "ANN@x")


def _populate(s: Session) -> tuple[int, int]:
    user = add_user(s)
    doc = add_document(s, user)
    s.add(
        Segment(
            document=doc, index=0, text="t", page_start=1, page_end=1, token_start=0, token_end=1
        )
    )
    s.add(
        Snapshot(
            document=doc,
            blob_key="k",
            bytes=1,
            sha256=SHA_B,
            model_fingerprint="fp",
            tokens=1,
            kind=SnapshotKind.checkpoint,
        )
    )
    job = Job(kind=JobKind.ingest, document=doc)
    s.add(job)
    s.flush()
    s.add(Answer(document=doc, user_id=user.id, question="q"))
    s.add(Summary(document=doc, job_id=job.id, text="s"))
    s.flush()
    return user.id, doc.id


CHILDREN = (Segment, Snapshot, Job, Answer, Summary)


@pytest.mark.parametrize("how", ["orm", "sql"])
def test_deleting_a_document_deletes_its_children(
    session_factory: sessionmaker[Session], how: str
) -> None:
    with db.session_scope(session_factory) as s:
        _, doc_id = _populate(s)
    with db.session_scope(session_factory) as s:
        assert all(count(s, m) == 1 for m in CHILDREN)
        if how == "orm":
            s.delete(s.get_one(Document, doc_id))
        else:  # the database does it, not only the ORM
            s.execute(text("DELETE FROM documents WHERE id = :id"), {"id": doc_id})
    with db.session_scope(session_factory) as s:
        assert [count(s, m) for m in CHILDREN] == [0] * len(CHILDREN)
        assert count(s, User) == 1


def test_deleting_a_user_deletes_everything_of_theirs(
    session_factory: sessionmaker[Session],
) -> None:
    with db.session_scope(session_factory) as s:
        user_id, _ = _populate(s)
    with db.session_scope(session_factory) as s:
        s.execute(text("DELETE FROM users WHERE id = :id"), {"id": user_id})
    with db.session_scope(session_factory) as s:
        assert [count(s, m) for m in (Document, *CHILDREN)] == [0] * (len(CHILDREN) + 1)


def test_deleting_a_job_keeps_its_results(session_factory: sessionmaker[Session]) -> None:
    with db.session_scope(session_factory) as s:
        _populate(s)
    with db.session_scope(session_factory) as s:
        s.execute(text("DELETE FROM jobs"))
    with db.session_scope(session_factory) as s:
        assert s.scalars(select(Summary.job_id)).one() is None
        assert count(s, Summary) == 1


def test_batch_job_children(session_factory: sessionmaker[Session]) -> None:
    with db.session_scope(session_factory) as s:
        parent = Job(kind=JobKind.batch_summarize, params={"document_ids": [1, 2]})
        parent.children = [Job(kind=JobKind.summarize), Job(kind=JobKind.summarize)]
        s.add(parent)
    with db.session_scope(session_factory) as s:
        assert count(s, Job) == 3
        s.delete(s.get_one(Job, parent.id))
    with db.session_scope(session_factory) as s:
        assert count(s, Job) == 0


def test_constraints_are_enforced_by_the_database(session_factory: sessionmaker[Session]) -> None:
    with pytest.raises(IntegrityError):  # progress is a fraction
        with db.session_scope(session_factory) as s:
            s.add(Job(kind=JobKind.ingest, progress=1.5))
    with pytest.raises(IntegrityError):  # enum values are CHECKed, also for raw SQL
        with db.session_scope(session_factory) as s:
            s.execute(
                text(
                    "INSERT INTO jobs (kind, state, progress, tokens_done, attempts, created_at) "
                    "VALUES ('dance', 'queued', 0, 0, 0, CURRENT_TIMESTAMP)"
                )
            )
    with pytest.raises(IntegrityError):  # foreign keys (SQLite too)
        with db.session_scope(session_factory) as s:
            s.add(
                Segment(
                    document_id=999,
                    index=0,
                    text="",
                    page_start=1,
                    page_end=1,
                    token_start=0,
                    token_end=0,
                )
            )


def test_session_scope_rolls_back_on_error(session_factory: sessionmaker[Session]) -> None:
    with pytest.raises(RuntimeError):
        with db.session_scope(session_factory) as s:
            add_document(s, add_user(s))  # flushed: the rows are in the database's transaction
            raise RuntimeError("worker crashed")
    with db.session_scope(session_factory) as s:
        assert count(s, User) == count(s, Document) == 0
        add_user(s)
    with db.session_scope(session_factory) as s:
        assert count(s, User) == 1


def test_latest_snapshot(session_factory: sessionmaker[Session]) -> None:
    with db.session_scope(session_factory) as s:
        doc = add_document(s, add_user(s))
        for i, (tokens, kind, fp) in enumerate(
            [
                (100, SnapshotKind.checkpoint, "m1"),
                (200, SnapshotKind.checkpoint, "m1"),
                (200, SnapshotKind.final, "m1"),
                (300, SnapshotKind.checkpoint, "m2"),
            ]
        ):
            s.add(
                Snapshot(
                    document=doc,
                    blob_key=f"s/{i}",
                    bytes=1,
                    sha256=SHA_B,
                    model_fingerprint=fp,
                    tokens=tokens,
                    kind=kind,
                )
            )
        s.flush()
        assert db.latest_snapshot(s, doc.id).blob_key == "s/3"
        assert db.latest_snapshot(s, doc.id, "m1").blob_key == "s/2"
        assert db.latest_snapshot(s, doc.id, "m1", SnapshotKind.checkpoint).blob_key == "s/1"
        assert db.latest_snapshot(s, doc.id, "m3") is None


def test_default_engine_uses_settings(settings_env: Path) -> None:
    db.get_engine.cache_clear()
    db.get_session_factory.cache_clear()
    try:
        db.migrate()  # no URL: the settings' SQLite file under data_dir
        with db.session_scope() as s:
            add_user(s)
        with db.session_scope() as s:
            assert count(s, User) == 1
        assert (settings_env / "infini.sqlite").exists()
    finally:
        db.get_engine().dispose()
        db.get_engine.cache_clear()
        db.get_session_factory.cache_clear()
