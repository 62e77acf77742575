"""The web app: FastAPI (REST API, OpenAPI at /docs) with the Gradio page mounted at /.

    python -m app                       the whole product on one machine: web app + a worker
    python -m app --no-worker           the web app only (workers run elsewhere, Redis broker)
    python -m app make-admin EMAIL      let an account see the usage page

Configuration is the `INFINI_*` settings (storage.settings). With the embedded default
(SQLite, local blobs, the broker that needs no server), `python -m app` also starts a
Celery worker in a subprocess, so one command runs everything.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # the page phones nowhere

from fastapi import FastAPI, Request  # noqa: E402
from fastapi.responses import JSONResponse, RedirectResponse  # noqa: E402

from app.services import AppError, Services, make_services  # noqa: E402

log = logging.getLogger(__name__)

MAX_FILES_PER_UPLOAD = 20
ROOT = Path(__file__).resolve().parents[1]


class UploadSizeGuard:
    """Refuses an upload request larger than MAX_FILES_PER_UPLOAD files at the size limit
    from its Content-Length, before the multipart parser spools it to disk. Each file's
    own limit is checked while it is stored (services)."""

    def __init__(self, app, max_upload_bytes: int, max_upload_mb: int):
        self.app, self.limit, self.mb = app, max_upload_bytes * MAX_FILES_PER_UPLOAD + (1 << 20), max_upload_mb

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] == "/api/documents":
            length = dict(scope["headers"]).get(b"content-length", b"0")
            if length.isdigit() and int(length) > self.limit:
                message = (f"This upload is too large: at most {MAX_FILES_PER_UPLOAD} files of "
                           f"{self.mb} MB each can be sent at once.")
                await JSONResponse({"detail": message}, status_code=413)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(services: Services | None = None) -> FastAPI:
    import gradio as gr

    from app.api import router
    from app.ui import CSS, THEME, build_ui

    svc = services or make_services()
    app = FastAPI(title="Infini DocQA", version="0.1.0",
                  description="Read a document once into an Infini-attention memory; ask it anything, "
                              "with page citations.")
    app.state.services = svc

    @app.exception_handler(AppError)
    async def _app_error(_request: Request, e: AppError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
        return JSONResponse({"detail": e.message}, status_code=e.status, headers=headers)

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict:
        return {"ok": True}

    app.include_router(router)
    app.add_middleware(UploadSizeGuard, max_upload_bytes=svc.settings.max_upload_bytes,
                       max_upload_mb=svc.settings.max_upload_mb)

    @app.get("/ui", include_in_schema=False)
    def _ui() -> RedirectResponse:
        return RedirectResponse("/")

    return gr.mount_gradio_app(app, build_ui(svc).queue(default_concurrency_limit=8), path="/",
                               max_file_size=svc.settings.max_upload_bytes, footer_links=[], css=CSS, theme=THEME,
                               ssr_mode=False, run_history=False)


def embedded_broker(broker_url: str) -> bool:
    return broker_url.startswith("sqla+")


def start_worker(log_path: Path | None = None) -> subprocess.Popen:
    """A Celery worker (with the reaper's clock, -B) in its own process group, so that
    stopping it also stops the children it forked."""
    cmd = [sys.executable, "-m", "celery", "-A", "workers.celery_app", "worker", "-B", "--loglevel=INFO",
           # the embedded broker has no broadcast channel: these would only poll it
           "--without-gossip", "--without-mingle", "--without-heartbeat"]
    out = open(log_path, "ab") if log_path else None
    return subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT if out else None,
                            start_new_session=True, preexec_fn=_die_with_parent)


def _die_with_parent() -> None:
    """In the worker, before exec: Linux sends it SIGTERM if the app dies without stopping it."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def stop_worker(proc: subprocess.Popen, timeout: float = 20) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)  # warm shutdown: the running task may finish its write
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # its own group: only what it started
        proc.wait()


def run(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m app", description="Run the Infini DocQA web app.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--worker", action=argparse.BooleanOptionalAction, default=None,
                        help="start a Celery worker beside the app (default: with the embedded broker only)")
    sub = parser.add_subparsers(dest="command")
    admin = sub.add_parser("make-admin", help="let an account see the usage page")
    admin.add_argument("email")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from storage.db import migrate

    svc = make_services()
    migrate(svc.settings.database_url)  # the worker migrates too; migrate() takes a lock
    if args.command == "make-admin":
        try:
            svc.set_admin(args.email)
        except AppError as e:
            sys.exit(e.message)
        print(f"{args.email} is now an administrator.")
        return

    import uvicorn

    worker = None
    if args.worker or (args.worker is None and embedded_broker(svc.settings.broker_url)):
        worker = start_worker()
        log.info("started a Celery worker (pid %d)", worker.pid)
    try:
        uvicorn.run(create_app(svc), host=args.host, port=args.port)
    finally:
        if worker is not None:
            stop_worker(worker)
