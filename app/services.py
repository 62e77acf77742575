"""What a person can do, as plain functions: the REST API and the Gradio UI both call these.

Every function takes the acting user and only ever touches that user's rows: a document
or job of someone else is "not found" (404), never "forbidden", so ids leak nothing.
Failures are `AppError`s whose message is a sentence for the person, with the HTTP
status the API answers with.

Kept light (no torch): the web process never loads a model. Work goes to the workers
through `Services.dispatch` (Celery by default; tests run the worker functions inline).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import IO, Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app import auth
from storage.db import latest_snapshot
from storage.models import (
    Answer,
    ApiToken,
    Document,
    DocumentStatus,
    Job,
    JobKind,
    JobState,
    Segment,
    SnapshotKind,
    Summary,
    User,
    utcnow,
)
from storage.settings import Settings, get_settings
from workers import jobs
from workers.celery_app import create_job
from workers.uploads import add_document

log = logging.getLogger(__name__)

ACCEPTED_SUFFIXES = (".pdf", ".txt", ".epub")
MIN_PASSWORD = 8
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")


class AppError(Exception):
    """A failure to show as is: `message` is a sentence, `status` the HTTP status."""

    status = 400

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status


class NotFound(AppError):
    status = 404


class Unauthorized(AppError):
    status = 401


class Conflict(AppError):
    status = 409


class TooLarge(AppError):
    status = 413


class Unsupported(AppError):
    status = 415


class _LimitedReader:
    """Passes reads through, and stops the upload as soon as it passes the size limit
    (the blob store then removes its partial file): nothing big is buffered first."""

    def __init__(self, f: IO[bytes], limit: int, filename: str, limit_mb: int):
        self._f, self._limit, self._name, self._mb, self.read_bytes = f, limit, filename, limit_mb, 0

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self.read_bytes += len(data)
        if self.read_bytes > self._limit:
            raise too_large(self._name, self._mb)
        return data


def too_large(filename: str, limit_mb: int) -> TooLarge:
    return TooLarge(f'"{filename}" is larger than the {limit_mb} MB upload limit.')


@dataclass
class Services:
    ctx: jobs.Context  # settings, database, blob store and Redis, shared with the workers' code
    dispatch: Callable[[int], object]  # sends a committed, queued job to the workers

    @property
    def settings(self) -> Settings:
        return self.ctx.settings

    def session(self):
        return self.ctx.session()

    # -- accounts ---------------------------------------------------------------------

    def sign_up(self, email: str, password: str) -> User:
        email = (email or "").strip().lower()
        if not _EMAIL.match(email):
            raise AppError("Please enter a valid email address.")
        if len(password or "") < MIN_PASSWORD:
            raise AppError(f"Please choose a password of at least {MIN_PASSWORD} characters.")
        try:
            with self.session() as s:
                user = User(email=email, password_hash=auth.hash_password(password))
                s.add(user)
                s.flush()
        except IntegrityError:
            raise Conflict("An account with this email already exists; log in instead.") from None
        return user

    def log_in(self, email: str, password: str) -> User:
        email = (email or "").strip().lower()
        with self.session() as s:
            user = s.scalars(select(User).where(User.email == email)).first()
            if user is None:
                auth.verify_password(auth.DUMMY_HASH, password or "")  # same time as a real check
                raise Unauthorized("The email or the password is wrong.")
            if not auth.verify_password(user.password_hash, password or ""):
                raise Unauthorized("The email or the password is wrong.")
            if auth.needs_rehash(user.password_hash):
                user.password_hash = auth.hash_password(password)
        return user

    def set_admin(self, email: str, admin: bool = True) -> None:
        with self.session() as s:
            user = s.scalars(select(User).where(User.email == email.strip().lower())).first()
            if user is None:
                raise NotFound(f"There is no account for {email}.")
            user.is_admin = admin

    def session_cookie(self, user: User) -> str:
        return self._signer().dumps(user.id, user.password_hash)

    def user_from_cookie(self, cookie: str | None) -> User | None:
        got = self._signer().loads(cookie)
        if got is None:
            return None
        with self.session() as s:
            user = s.get(User, got[0])
        if user is None or not auth.session_matches(user.password_hash, got[1]):
            return None
        return user

    def _signer(self) -> auth.SessionSigner:
        return auth.SessionSigner(self.settings.secret_key.get_secret_value())

    def create_token(self, user: User, name: str = "") -> str:
        """A new API token for `user`; the only time it is ever shown."""
        token, digest = auth.new_api_token()
        with self.session() as s:
            s.add(ApiToken(user_id=user.id, token_hash=digest, name=(name or "").strip()[:100]))
        return token

    def list_tokens(self, user: User) -> list[dict]:
        with self.session() as s:
            rows = s.scalars(select(ApiToken).where(ApiToken.user_id == user.id).order_by(ApiToken.id))
            return [{"id": t.id, "name": t.name, "created_at": _iso(t.created_at),
                     "last_used_at": _iso(t.last_used_at)} for t in rows]

    def revoke_token(self, user: User, token_id: int) -> None:
        with self.session() as s:
            t = s.get(ApiToken, token_id)
            if t is None or t.user_id != user.id:
                raise NotFound("There is no such API token.")
            s.delete(t)

    def user_from_token(self, token: str | None) -> User | None:
        if not token:
            return None
        with self.session() as s:
            row = s.scalars(select(ApiToken).where(ApiToken.token_hash == auth.token_hash(token))).first()
            if row is None:
                return None
            now = utcnow()
            if row.last_used_at is None or now - row.last_used_at > timedelta(minutes=1):
                row.last_used_at = now  # not a write on every request
            return row.user

    # -- documents --------------------------------------------------------------------

    def upload(self, user: User, filename: str, fileobj: IO[bytes], password: str | None = None) -> dict:
        """Store one uploaded file and queue its reading; the same file twice is one document."""
        filename = Path(filename or "upload").name  # never a path from the client
        if not filename.lower().endswith(ACCEPTED_SUFFIXES) or not _looks_supported(fileobj, filename):
            raise Unsupported(f'"{filename}" is not a PDF, EPUB or plain-text (.txt) file.')
        # refused here, before anything is kept (add_document would keep a failed document)
        size = _size_left(fileobj)
        if size is not None and size > self.settings.max_upload_bytes:
            raise too_large(filename, self.settings.max_upload_mb)
        limited = _LimitedReader(fileobj, self.settings.max_upload_bytes, filename, self.settings.max_upload_mb)
        doc_id, job_id = self._store(user, filename, limited, password or None)
        if job_id is not None:
            self.dispatch(job_id)
        return self.get_document(user, doc_id)

    def _store(self, user: User, filename: str, fileobj: IO[bytes], password: str | None) -> tuple[int, int | None]:
        """Blob, document row and ingest job; returns (document id, id of a new job or None)."""
        with self.session() as s:
            owner = s.get(User, user.id)
            doc, job = add_document(s, owner, filename, fileobj, password, settings=self.settings,
                                    blobs=self.ctx.blobs)
            return doc.id, (job.id if job is not None else None)

    def list_documents(self, user: User) -> list[dict]:
        with self.session() as s:
            docs = s.scalars(select(Document).where(Document.owner_id == user.id).order_by(Document.id.desc()))
            return [self._describe(s, d) for d in docs]

    def get_document(self, user: User, document_id: int) -> dict:
        with self.session() as s:
            return self._describe(s, self._own(s, user, document_id))

    def _own(self, s: Session, user: User, document_id: int) -> Document:
        doc = s.get(Document, document_id)
        if doc is None or doc.owner_id != user.id:
            raise NotFound("There is no such document in your library.")
        return doc

    def _describe(self, s: Session, doc: Document) -> dict:
        snap = latest_snapshot(s, doc.id, kind=SnapshotKind.final)
        job = s.scalars(select(Job).where(Job.document_id == doc.id, Job.kind == JobKind.ingest)
                        .order_by(Job.id.desc()).limit(1)).first()
        return {
            "id": doc.id, "title": doc.title, "filename": doc.filename, "format": doc.format,
            "status": doc.status.value, "error": doc.error, "bytes": doc.bytes, "pages": doc.pages,
            "tokens": doc.tokens, "snapshot_bytes": snap.bytes if snap else None,
            "model": self.model_name if snap else None, "created_at": _iso(doc.created_at),
            "ingest": _job_progress(job, doc.tokens) if job else None,
        }

    @property
    def model_name(self) -> str:
        return Path(self.settings.model).name or self.settings.model

    def delete_document(self, user: User, document_id: int) -> None:
        """The row first (its children go with it), then the blobs: a failure halfway leaves
        an orphan blob, never a row that points at nothing. A reading still running loses
        its job row and stops at its next progress write."""
        with self.session() as s:
            doc = self._own(s, user, document_id)
            keys = {snap.blob_key for snap in doc.snapshots}
            keys |= {k.rsplit("/", 1)[0] + "/retrieval.zip" for k in keys}  # beside the snapshots
            source = doc.blob_key
            s.delete(doc)
            s.flush()
            # uploads may be shared by content: keep one another document still uses
            if source and not s.scalar(select(func.count()).where(Document.blob_key == source)):
                keys.add(source)
        for key in keys:
            try:
                self.ctx.blobs.delete(key)
            except Exception:
                log.warning("could not delete blob %s", key, exc_info=True)

    # -- questions --------------------------------------------------------------------

    def ask(self, user: User, document_id: int, question: str) -> int:
        """Queue a question; returns the job id to follow with `answer_events`."""
        question = (question or "").strip()
        if not question:
            raise AppError("Please type a question.")
        with self.session() as s:
            doc = self._ready(s, user, document_id)
            job_id = create_job(s, JobKind.answer, document_id=doc.id, user_id=user.id,
                                params={"question": question}).id
        self.dispatch(job_id)
        return job_id

    def _ready(self, s: Session, user: User, document_id: int) -> Document:
        doc = self._own(s, user, document_id)
        if doc.status != DocumentStatus.ready:
            raise Conflict(f'"{doc.title}" is not ready yet ({doc.status.value}); try again once it has been read.')
        return doc

    def answer_events(self, user: User, job_id: int, poll_s: float = 0.1) -> Iterator[dict]:
        """The answer as events: {"event": "start"}, {"event": "token", "text"}... then
        {"event": "done", "text", "cited_pages", "passages"} or {"event": "error", "message"}.
        A second "start" means the job was retried: drop what came before it."""
        with self.session() as s:
            job = self._own_job(s, user, job_id)
            if job.kind != JobKind.answer:
                raise NotFound("There is no such answer.")
            question = (job.params or {}).get("question", "")
        deadline = time.monotonic() + self.settings.answer_time_limit_s + 120
        if self.ctx.redis() is not None:
            yield from self._redis_events(job_id, question, deadline)
        else:
            yield from self._polled_events(job_id, question, deadline, poll_s)

    def _redis_events(self, job_id: int, question: str, deadline: float) -> Iterator[dict]:
        seen, passages = 0, []
        while time.monotonic() < deadline:
            try:
                # follow_answer reads the stream from its start: skip what was already sent
                for i, event in enumerate(jobs.follow_answer(job_id, self.ctx, block_ms=5000)):
                    if i < seen:
                        continue
                    seen += 1
                    if event["event"] == "start":
                        passages = event.get("passages", [])
                        yield {"event": "start", "job_id": job_id}
                    elif event["event"] == "token":
                        yield {"event": "token", "text": event["text"]}
                    elif event["event"] == "waiting":  # e.g. a damaged snapshot is being re-read
                        yield {"event": "waiting", "message": event.get("message", "")}
                    elif event["event"] == "done":
                        yield {"event": "done", "job_id": job_id, "text": event.get("text", ""),
                               "cited_pages": event.get("cited_pages", []), "passages": passages}
                        return
                    else:
                        yield {"event": "error", "message": event.get("message") or "The answer failed."}
                        return
            except TimeoutError:  # queued behind other work, or failed before it could stream
                if (ended := self._finished_answer(job_id, question)) is not None:
                    yield ended
                    return
        yield _too_slow()

    def _polled_events(self, job_id: int, question: str, deadline: float, poll_s: float) -> Iterator[dict]:
        """Without Redis the worker writes the growing answer into its row a few times a
        second: send what was added since the last look."""
        yield {"event": "start", "job_id": job_id}
        sent = ""
        while time.monotonic() < deadline:
            with self.session() as s:
                state = s.scalar(select(Job.state).where(Job.id == job_id))
                text = s.scalar(select(Answer.answer).where(Answer.job_id == job_id)) or ""
            if not text.startswith(sent):  # a retry started the answer over
                yield {"event": "start", "job_id": job_id}
                sent = ""
            if len(text) > len(sent):
                yield {"event": "token", "text": text[len(sent):]}
                sent = text
            if state is None or state.finished:
                yield self._finished_answer(job_id, question) or _too_slow()
                return
            time.sleep(poll_s)
        yield _too_slow()

    def _finished_answer(self, job_id: int, question: str) -> dict | None:
        """The final event of a finished answer job from the database; None while it runs."""
        with self.session() as s:
            job = s.get(Job, job_id)
            if job is None:
                return {"event": "error", "message": "The document was deleted while answering."}
            if not job.state.finished:
                return None
            if job.state != JobState.succeeded:
                return {"event": "error", "message": job.error or "The answer failed."}
            row = s.scalars(select(Answer).where(Answer.job_id == job_id)).first()
            pages = list(row.cited_pages or []) if row else []
            return {"event": "done", "job_id": job_id, "text": row.answer if row else "", "cited_pages": pages,
                    "passages": _passages_on(s, job.document_id, pages, question)}

    # -- summaries and jobs -----------------------------------------------------------

    def summarize(self, user: User, document_ids: list[int]) -> int:
        """One document: a summarize job; several: a batch job with one child each."""
        ids = list(dict.fromkeys(int(i) for i in document_ids or []))
        if not ids:
            raise AppError("Please pick at least one document to summarise.")
        with self.session() as s:
            for i in ids:
                self._ready(s, user, i)
            if len(ids) == 1:
                job = create_job(s, JobKind.summarize, document_id=ids[0], user_id=user.id)
            else:
                job = create_job(s, JobKind.batch_summarize, user_id=user.id, params={"document_ids": ids})
            job_id = job.id
        self.dispatch(job_id)
        return job_id

    def _own_job(self, s: Session, user: User, job_id: int) -> Job:
        job = s.get(Job, job_id)
        owner = job.user_id if job is not None and job.user_id is not None else (
            job.document.owner_id if job is not None and job.document is not None else None)
        if job is None or owner != user.id:
            raise NotFound("There is no such job.")
        return job

    def get_job(self, user: User, job_id: int) -> dict:
        with self.session() as s:
            job = self._own_job(s, user, job_id)
            out = _job_progress(job, job.document.tokens if job.document else None)
            out |= {"id": job.id, "kind": job.kind.value, "document_id": job.document_id,
                    "created_at": _iso(job.created_at), "finished_at": _iso(job.finished_at)}
            if job.kind == JobKind.summarize:
                out["summary"] = _summary_text(s, job)
            elif job.kind == JobKind.batch_summarize:
                out["children"] = [
                    {"job_id": c.id, "document_id": c.document_id, "title": c.document.title if c.document else None,
                     "state": c.state.value, "error": c.error, "summary": _summary_text(s, c)}
                    for c in sorted(job.children, key=lambda c: c.id)]
            elif job.kind == JobKind.answer:
                row = s.scalars(select(Answer).where(Answer.job_id == job.id)).first()
                out["answer"] = row.answer if row else None
                out["cited_pages"] = list(row.cited_pages or []) if row else []
            return out

    def summary_markdown(self, user: User, job_id: int) -> str:
        """The summaries of a finished summary job as one Markdown document."""
        info = self.get_job(user, job_id)
        if info["kind"] not in (JobKind.summarize.value, JobKind.batch_summarize.value):
            raise NotFound("This job has no summaries.")
        if info["kind"] == JobKind.summarize.value:
            with self.session() as s:
                title = s.get(Document, info["document_id"]).title if info["document_id"] else "Document"
            parts = [(title, info["summary"], info["error"])]
        else:
            parts = [(c["title"] or f"Document {c['document_id']}", c["summary"], c["error"])
                     for c in info["children"]]
        lines = ["# Summaries", ""]
        for title, text, error in parts:
            lines += [f"## {title}", "", text or f"*No summary: {error or 'not finished yet.'}*", ""]
        return "\n".join(lines)

    # -- administration ---------------------------------------------------------------

    def usage(self, user: User) -> list[dict]:
        """Per account: documents, bytes, tokens read, questions, summaries (admins only)."""
        if not user.is_admin:
            raise NotFound("There is no such page.")  # not even its existence is shown
        with self.session() as s:
            def per_user(q):
                return dict(s.execute(q).all())

            docs = per_user(select(Document.owner_id, func.count()).group_by(Document.owner_id))
            size = per_user(select(Document.owner_id, func.sum(Document.bytes)).group_by(Document.owner_id))
            tokens = per_user(select(Document.owner_id, func.sum(Document.tokens)).group_by(Document.owner_id))
            answers = per_user(select(Answer.user_id, func.count()).group_by(Answer.user_id))
            summaries = per_user(select(Document.owner_id, func.count(Summary.id)).join(Summary)
                                 .group_by(Document.owner_id))
            return [{"user": u.email, "admin": u.is_admin, "documents": docs.get(u.id, 0),
                     "bytes": int(size.get(u.id) or 0), "tokens": int(tokens.get(u.id) or 0),
                     "questions": answers.get(u.id, 0), "summaries": summaries.get(u.id, 0),
                     "since": _iso(u.created_at)}
                    for u in s.scalars(select(User).order_by(User.id))]


# -- helpers ------------------------------------------------------------------------------


def _looks_supported(fileobj: IO[bytes], filename: str) -> bool:
    """A cheap look at the first bytes, so that a renamed image or Word file is refused
    before it is stored (the workers' parser has the last word)."""
    try:
        pos = fileobj.tell()
        head = fileobj.read(4096)
        fileobj.seek(pos)
    except (AttributeError, OSError):
        return True  # not seekable: let the parser decide
    suffix = Path(filename).suffix.lower()
    if suffix == ".pdf":
        return b"%PDF-" in head[:1024]
    if suffix == ".epub":
        return head.startswith(b"PK\x03\x04")
    if b"\x00" in head:  # text has no NUL bytes; binaries nearly always do
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        return e.start >= len(head) - 4  # only a character cut at the end of the sample
    return True


def _size_left(f: IO[bytes]) -> int | None:
    try:
        here = f.tell()
        end = f.seek(0, 2)
        f.seek(here)
        return end - here
    except (AttributeError, OSError, ValueError):
        return None  # a stream: _LimitedReader stops it at the limit


def _job_progress(job: Job, tokens_total: int | None) -> dict:
    return {"job_id": job.id, "state": job.state.value, "progress": round(job.progress or 0.0, 4),
            "tokens_done": job.tokens_done, "tokens_total": tokens_total,
            "tokens_per_s": job.tokens_per_s, "eta_s": job.eta_s, "error": job.error}


def _summary_text(s: Session, job: Job) -> str | None:
    return s.scalar(select(Summary.text).where(Summary.job_id == job.id).order_by(Summary.id.desc()).limit(1))


_WORDS = re.compile(r"\w{3,}")


def _passages_on(s: Session, document_id: int | None, pages: list[int], question: str) -> list[dict]:
    """Where no answer stream carries the retrieved passages (no Redis), show for each cited
    page the stored passage on it that shares the most words with the question: retrieval
    cited that page because of such a passage."""
    if document_id is None or not pages:
        return []
    words = {w.lower() for w in _WORDS.findall(question)}
    segs = s.scalars(select(Segment).where(Segment.document_id == document_id, Segment.page_start <= max(pages),
                                           Segment.page_end >= min(pages)).order_by(Segment.index)).all()
    chosen: dict[int, Segment] = {}
    for page in pages:
        on_page = [g for g in segs if g.page_start <= page <= g.page_end]
        if on_page:
            best = max(on_page, key=lambda g: len(words & {w.lower() for w in _WORDS.findall(g.text)}))
            chosen.setdefault(best.id, best)
    return [{"pages": str(g.page_start) if g.page_start == g.page_end else f"{g.page_start}-{g.page_end}",
             "text": g.text} for g in chosen.values()]


def _too_slow() -> dict:
    return {"event": "error", "message": "The answer is taking too long; is a worker running?"}


def _iso(t: datetime | None) -> str | None:
    return t.isoformat() if t is not None else None


def make_services(settings: Settings | None = None, dispatch: Callable[[int], Any] | None = None) -> Services:
    """Services on the settings' database and blob store, sending work through Celery."""
    from workers.celery_app import enqueue, make_app

    ctx = jobs.Context(settings or get_settings())
    if dispatch is None:
        producer = make_app(ctx.settings)
        dispatch = lambda job_id: enqueue(job_id, sessions=ctx.sessions, producer=producer)  # noqa: E731
    return Services(ctx, dispatch)
