"""Building documents and jobs for the workers' tests."""

from __future__ import annotations

import hashlib
import io
import random
from pathlib import Path

from sqlalchemy import select

from storage.db import get_or_create_document
from storage.models import Job, JobKind, User
from storage.settings import Settings
from workers.jobs import Context

SEGMENT_LEN = 16
CHECKPOINT_EVERY = 8  # segments: a checkpoint every 128 tokens
WORDS = ("lighthouse keeper lamp storm harbour ship sailor rope anchor tide gull cliff "
         "lantern captain voyage island").split()


def settings_fields(data_dir: Path, model_dir, **overrides) -> dict:
    """Settings fields of a test deployment (embedded unless overridden)."""
    return {
        "data_dir": str(data_dir),
        "database_url": f"sqlite:///{data_dir / 'infini.sqlite'}",
        "redis_url": None,
        "model": str(model_dir),
        "segment_len": SEGMENT_LEN,
        "checkpoint_every": CHECKPOINT_EVERY,
        "checkpoint_interval_s": 0,
        "device": "cpu",
        "heartbeat_s": 0.5,
        "stale_after_s": 30,
        "answer_max_tokens": 12,
        "summary_max_tokens": 8,
        "summary_sections": 3,
        "retry_backoff_s": 0,
        "max_retries": 2,
        "secret_key": "test",
        **overrides,
    }


def settings_env(fields: dict) -> dict[str, str]:
    return {f"INFINI_{k.upper()}": str(v) for k, v in fields.items() if v is not None}


def make_context(fields: dict, model=None, enqueue=None) -> Context:
    return Context(Settings(**fields), model=model, enqueue=enqueue)


def book(seed: int = 0, chars: int = 1500, topic: str | None = None) -> str:
    """Paragraphs of sea words; `topic` is one rare word placed in one paragraph."""
    rng = random.Random(seed)
    paragraphs, size = [], 0
    while size < chars:
        p = " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 40))).capitalize() + "."
        paragraphs.append(p)
        size += len(p) + 2
    if topic:
        paragraphs[len(paragraphs) // 2] += f" The {topic} was hidden here."
    return "\n\n".join(paragraphs)


def add_document(ctx: Context, content: str | bytes, filename: str = "book.txt", title: str | None = None) -> int:
    data = content.encode() if isinstance(content, str) else content
    sha = hashlib.sha256(data).hexdigest()
    key = f"uploads/{sha[:16]}/{filename}"
    ctx.blobs.put(key, io.BytesIO(data))
    with ctx.session() as s:
        user = s.scalars(select(User).where(User.email == "reader@example.com")).first()
        if user is None:
            user = User(email="reader@example.com", password_hash="x")
            s.add(user)
            s.flush()
        doc, _ = get_or_create_document(s, user.id, sha, title=title or filename, filename=filename,
                                        blob_key=key, bytes=len(data))
        return doc.id


def add_job(ctx: Context, kind: JobKind, document_id: int | None = None, params: dict | None = None) -> int:
    from workers.celery_app import create_job

    with ctx.session() as s:
        return create_job(s, kind, document_id=document_id, params=params).id


def job(ctx: Context, job_id: int) -> Job:
    with ctx.session() as s:
        return s.get(Job, job_id)
