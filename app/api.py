"""The REST API (OpenAPI at /docs): the same `Services` calls as the UI.

Authentication: `Authorization: Bearer <token>` (tokens from POST /api/tokens), or the
session cookie that /api/auth/login sets (what the web page uses). The cookie is
SameSite=Lax, so another site cannot make a browser POST with it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Request, Response, UploadFile
from fastapi.responses import PlainTextResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field

from app.auth import SESSION_COOKIE, SESSION_MAX_AGE_S
from app.services import AppError, Services, Unauthorized
from storage.models import User

router = APIRouter(prefix="/api")
bearer = HTTPBearer(auto_error=False, description="An API token from POST /api/tokens.")


def services(request: Request) -> Services:
    return request.app.state.services


Svc = Annotated[Services, Depends(services)]


def current_user(request: Request, svc: Svc,
                 creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> User:
    if creds is not None:
        user = svc.user_from_token(creds.credentials)
        if user is None:
            raise Unauthorized("This API token is not valid; create a new one.")
        return user
    user = svc.user_from_cookie(request.cookies.get(SESSION_COOKIE))
    if user is None:
        raise Unauthorized("Please log in, or send an API token as 'Authorization: Bearer <token>'.")
    return user


Me = Annotated[User, Depends(current_user)]


# -- accounts -------------------------------------------------------------------------


class Credentials(BaseModel):
    email: str = Field(examples=["ada@example.com"])
    password: str = Field(examples=["correct horse battery"])


def _user_out(user: User) -> dict:
    return {"id": user.id, "email": user.email, "is_admin": user.is_admin}


def _set_session(request: Request, response: Response, svc: Services, user: User) -> None:
    response.set_cookie(SESSION_COOKIE, svc.session_cookie(user), max_age=SESSION_MAX_AGE_S, httponly=True,
                        samesite="lax", secure=request.url.scheme == "https", path="/")


@router.post("/auth/signup", status_code=201, tags=["accounts"])
def sign_up(body: Credentials, request: Request, response: Response, svc: Svc) -> dict:
    """Create an account and log in (sets the session cookie)."""
    user = svc.sign_up(body.email, body.password)
    _set_session(request, response, svc, user)
    return _user_out(user)


@router.post("/auth/login", tags=["accounts"])
def log_in(body: Credentials, request: Request, response: Response, svc: Svc) -> dict:
    """Log in (sets the session cookie)."""
    user = svc.log_in(body.email, body.password)
    _set_session(request, response, svc, user)
    return _user_out(user)


@router.post("/auth/logout", status_code=204, tags=["accounts"])
def log_out(response: Response) -> None:
    response.delete_cookie(SESSION_COOKIE, path="/")


@router.get("/me", tags=["accounts"])
def me(user: Me) -> dict:
    return _user_out(user)


class TokenRequest(BaseModel):
    name: str = Field("", max_length=100, examples=["my script"])


@router.post("/tokens", status_code=201, tags=["accounts"])
def create_token(body: TokenRequest, user: Me, svc: Svc) -> dict:
    """A new API token. It is shown only in this response: keep it."""
    return {"token": svc.create_token(user, body.name)}


@router.get("/tokens", tags=["accounts"])
def list_tokens(user: Me, svc: Svc) -> list[dict]:
    return svc.list_tokens(user)


@router.delete("/tokens/{token_id}", status_code=204, tags=["accounts"])
def revoke_token(token_id: int, user: Me, svc: Svc) -> None:
    svc.revoke_token(user, token_id)


@router.get("/admin/usage", tags=["accounts"])
def usage(user: Me, svc: Svc) -> list[dict]:
    """Per account usage; administrators only (404 for everyone else)."""
    return svc.usage(user)


# -- documents --------------------------------------------------------------------------


@router.post("/documents", status_code=201, tags=["documents"])
def upload(user: Me, svc: Svc, files: Annotated[list[UploadFile], File(description="PDF, TXT or EPUB files")],
           password: Annotated[str | None, Form(description="Password of encrypted PDFs")] = None) -> list[dict]:
    """Upload one or more documents; each is read in the background (follow its `ingest`).
    Uploading a file you already have returns that document."""
    out = []
    for f in files:
        try:
            out.append(svc.upload(user, f.filename or "upload", f.file, password))
        except AppError as e:
            if out:  # say which files did get in
                e.message += f" ({len(out)} file(s) before it were uploaded: ids {[d['id'] for d in out]}.)"
            raise
    return out


@router.get("/documents", tags=["documents"])
def list_documents(user: Me, svc: Svc) -> list[dict]:
    return svc.list_documents(user)


@router.get("/documents/{document_id}", tags=["documents"])
def get_document(document_id: int, user: Me, svc: Svc) -> dict:
    """Status, pages, tokens, snapshot size, model, and the reading's progress, tokens/s and ETA."""
    return svc.get_document(user, document_id)


@router.delete("/documents/{document_id}", status_code=204, tags=["documents"])
def delete_document(document_id: int, user: Me, svc: Svc) -> None:
    svc.delete_document(user, document_id)


class Question(BaseModel):
    question: str = Field(examples=["Who proposed the system?"])


def sse(events: Iterator[dict]) -> Iterator[str]:
    for event in events:
        name = event.pop("event")
        yield f"event: {name}\ndata: {json.dumps(event)}\n\n"


@router.post("/documents/{document_id}/ask", tags=["questions"],
             responses={200: {"content": {"text/event-stream": {}},
                              "description": "Server-sent events: `start`, `token` (data: {text}) ..., then "
                                             "`done` (data: {text, cited_pages, passages}) or `error` "
                                             "(data: {message})."}})
def ask(document_id: int, body: Question, user: Me, svc: Svc) -> StreamingResponse:
    """Ask a question about a read document; the answer streams token by token."""
    job_id = svc.ask(user, document_id, body.question)  # errors here are plain HTTP errors
    events = svc.answer_events(user, job_id)
    return StreamingResponse(sse(events), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


# -- summaries and jobs -------------------------------------------------------------------


class SummaryRequest(BaseModel):
    document_ids: list[int] = Field(min_length=1, examples=[[1, 2]])


@router.post("/summaries", status_code=202, tags=["summaries"])
def summarize(body: SummaryRequest, user: Me, svc: Svc) -> dict:
    """Summarise one document, or several as one batch job; follow it at /api/jobs/{id}."""
    return {"job_id": svc.summarize(user, body.document_ids)}


@router.get("/jobs/{job_id}", tags=["summaries"])
def get_job(job_id: int, user: Me, svc: Svc) -> dict:
    """State, progress and results (summaries, answer) of one of your jobs."""
    return svc.get_job(user, job_id)


@router.get("/jobs/{job_id}/summary.md", response_class=PlainTextResponse, tags=["summaries"])
def summary_markdown(job_id: int, user: Me, svc: Svc) -> PlainTextResponse:
    return PlainTextResponse(svc.summary_markdown(user, job_id), media_type="text/markdown",
                             headers={"Content-Disposition": f'attachment; filename="summaries-{job_id}.md"'})
