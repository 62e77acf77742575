"""Database rows, SQLAlchemy 2.0 typed declarative; portable between PostgreSQL and SQLite.

Portability choices:
- enums are VARCHAR + CHECK (`native_enum=False`): no PostgreSQL ENUM types to
  create, drop or ALTER in migrations, and the same schema on both dialects;
- timestamps go through `UTCDateTime`, which always returns aware UTC datetimes
  (SQLite would otherwise hand back naive ones);
- every constraint has a deterministic name (`NAMING`), which Alembic needs to
  alter or drop it later, and SQLite batch mode needs to find it.

Children of a document (segments, snapshots, jobs, answers, summaries) are
deleted with it by the database (ON DELETE CASCADE); the ORM relationships use
`passive_deletes=True` so they let the database do it.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    DateTime,
    Dialect,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, validates

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware datetimes stored in UTC, on every dialect."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime: pass an aware one (e.g. storage.models.utcnow())")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:  # SQLite drops the offset
            value = value.replace(tzinfo=UTC)
        return value


def _enum(cls: type[enum.Enum], name: str) -> Enum:
    # stores the .value strings ("ready"), not the member names ("READY")
    return Enum(
        cls,
        name=name,
        native_enum=False,
        create_constraint=True,
        length=32,
        values_callable=lambda e: [m.value for m in e],
        validate_strings=True,
    )


class DocumentStatus(enum.StrEnum):
    uploaded = "uploaded"
    queued = "queued"
    reading = "reading"
    ready = "ready"
    failed = "failed"


class SnapshotKind(enum.StrEnum):
    checkpoint = "checkpoint"  # taken while reading, to resume a killed ingest
    final = "final"  # the whole document read; what questions resume from


class JobKind(enum.StrEnum):
    ingest = "ingest"
    answer = "answer"
    summarize = "summarize"
    batch_summarize = "batch_summarize"


class JobState(enum.StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobState.succeeded, JobState.failed, JobState.cancelled)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSON(), list[int]: JSON()}


def _fk(target: str, ondelete: str = "CASCADE") -> ForeignKey:
    return ForeignKey(target, ondelete=ondelete)


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(String(320), unique=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    is_admin: Mapped[bool] = mapped_column(default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    documents: Mapped[list[Document]] = relationship(
        back_populates="owner", cascade="all, delete-orphan", passive_deletes=True
    )
    api_tokens: Mapped[list[ApiToken]] = relationship(
        back_populates="user", cascade="all, delete-orphan", passive_deletes=True
    )

    @validates("email")
    def _normalize_email(self, _key: str, value: str) -> str:
        # one account per address, whatever the case it is typed in
        return value.strip().lower()


class ApiToken(Base):
    """A REST API token; only its SHA-256 is stored, the token is shown once."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(_fk("users.id"), index=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(100), default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_used_at: Mapped[datetime | None]

    user: Mapped[User] = relationship(back_populates="api_tokens")


class Document(Base):
    __tablename__ = "documents"
    # the same file uploaded twice by one user is one row (and one reading)
    __table_args__ = (
        UniqueConstraint("owner_id", "content_sha256"),
        Index("ix_documents_status", "status"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    owner_id: Mapped[int] = mapped_column(_fk("users.id"))
    title: Mapped[str] = mapped_column(String(500))
    filename: Mapped[str] = mapped_column(String(500))
    content_sha256: Mapped[str] = mapped_column(String(64))
    blob_key: Mapped[str | None] = mapped_column(String(1024))  # the uploaded file
    mime: Mapped[str | None] = mapped_column(String(127))
    format: Mapped[str | None] = mapped_column(String(16))  # "pdf", "txt", "epub"
    bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    pages: Mapped[int | None]
    tokens: Mapped[int | None] = mapped_column(BigInteger)
    status: Mapped[DocumentStatus] = mapped_column(
        _enum(DocumentStatus, "document_status"), default=DocumentStatus.uploaded
    )
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    owner: Mapped[User] = relationship(back_populates="documents")
    segments: Mapped[list[Segment]] = relationship(
        back_populates="document",
        cascade="all, delete-orphan",
        passive_deletes=True,
        order_by="Segment.index",
    )
    snapshots: Mapped[list[Snapshot]] = relationship(
        back_populates="document", cascade="all, delete-orphan", passive_deletes=True
    )
    jobs: Mapped[list[Job]] = relationship(
        back_populates="document", cascade="all, delete-orphan", passive_deletes=True
    )
    answers: Mapped[list[Answer]] = relationship(
        back_populates="document", cascade="all, delete-orphan", passive_deletes=True
    )
    summaries: Mapped[list[Summary]] = relationship(
        back_populates="document", cascade="all, delete-orphan", passive_deletes=True
    )


class Segment(Base):
    """One Infini-attention segment's text, with the pages and tokens it covers (for retrieval)."""

    __tablename__ = "segments"
    # the unique constraint's index also serves "segments of a document in order"
    __table_args__ = (UniqueConstraint("document_id", "index"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    document_id: Mapped[int] = mapped_column(_fk("documents.id"))
    index: Mapped[int] = mapped_column(Integer)
    text: Mapped[str] = mapped_column(Text)
    page_start: Mapped[int]
    page_end: Mapped[int]
    token_start: Mapped[int] = mapped_column(BigInteger)
    token_end: Mapped[int] = mapped_column(BigInteger)

    document: Mapped[Document] = relationship(back_populates="segments")


class Snapshot(Base):
    """A saved memory state in the blob store."""

    __tablename__ = "snapshots"
    # latest snapshot of a document for a model
    __table_args__ = (
        Index("ix_snapshots_document_model", "document_id", "model_fingerprint", "tokens"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    document_id: Mapped[int] = mapped_column(_fk("documents.id"))
    blob_key: Mapped[str] = mapped_column(String(1024), unique=True)
    bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    model_fingerprint: Mapped[str] = mapped_column(String(128))
    tokens: Mapped[int] = mapped_column(BigInteger)  # tokens consumed into the state
    kind: Mapped[SnapshotKind] = mapped_column(_enum(SnapshotKind, "snapshot_kind"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    document: Mapped[Document] = relationship(back_populates="snapshots")


class Job(Base):
    """A unit of background work, its progress as the UI shows it."""

    __tablename__ = "jobs"
    __table_args__ = (
        CheckConstraint("progress >= 0 AND progress <= 1", name="progress_range"),
        # "is there an active ingest for this document?"
        Index("ix_jobs_document_kind_state", "document_id", "kind", "state"),
        # the reaper looks for running jobs whose heartbeat stopped
        Index("ix_jobs_state_heartbeat", "state", "heartbeat_at"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[JobKind] = mapped_column(_enum(JobKind, "job_kind"))
    document_id: Mapped[int | None] = mapped_column(_fk("documents.id"))
    user_id: Mapped[int | None] = mapped_column(_fk("users.id"), index=True)  # who asked
    parent_id: Mapped[int | None] = mapped_column(_fk("jobs.id"), index=True)  # batch job
    params: Mapped[dict[str, Any] | None]  # e.g. the question, the batch's document ids
    state: Mapped[JobState] = mapped_column(_enum(JobState, "job_state"), default=JobState.queued)
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    tokens_done: Mapped[int] = mapped_column(BigInteger, default=0)
    tokens_per_s: Mapped[float | None] = mapped_column(Float)
    eta_s: Mapped[float | None] = mapped_column(Float)
    error: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(default=0)
    heartbeat_at: Mapped[datetime | None]
    celery_task_id: Mapped[str | None] = mapped_column(String(255), index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]

    document: Mapped[Document | None] = relationship(back_populates="jobs")
    parent: Mapped[Job | None] = relationship(back_populates="children", remote_side=[id])
    children: Mapped[list[Job]] = relationship(
        back_populates="parent", cascade="all, delete-orphan", passive_deletes=True
    )


class Answer(Base):
    __tablename__ = "answers"
    __table_args__ = (Index("ix_answers_document_created", "document_id", "created_at"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    document_id: Mapped[int] = mapped_column(_fk("documents.id"))
    user_id: Mapped[int] = mapped_column(_fk("users.id"), index=True)
    job_id: Mapped[int | None] = mapped_column(_fk("jobs.id", "SET NULL"), index=True)
    question: Mapped[str] = mapped_column(Text)
    answer: Mapped[str] = mapped_column(Text, default="")
    cited_pages: Mapped[list[int]] = mapped_column(default=list)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    document: Mapped[Document] = relationship(back_populates="answers")


class Summary(Base):
    __tablename__ = "summaries"

    id: Mapped[int] = mapped_column(primary_key=True)
    document_id: Mapped[int] = mapped_column(_fk("documents.id"), index=True)
    job_id: Mapped[int | None] = mapped_column(_fk("jobs.id", "SET NULL"), index=True)
    text: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    document: Mapped[Document] = relationship(back_populates="summaries")
