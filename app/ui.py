"""The web page: Gradio Blocks over the same `Services` as the REST API.

Who is asking comes from the signed session cookie on every event (never from page
state the browser could edit). Logging in and signing up post to the REST API from the
browser, so that its response can set that cookie as HttpOnly, and then reload the page.
"""

from __future__ import annotations

import functools
import html
import logging
import tempfile
from pathlib import Path

import gradio as gr

from app.auth import SESSION_COOKIE
from app.services import AppError, Services
from storage.models import User

log = logging.getLogger(__name__)

# system fonts: the default theme would fetch its fonts from Google on every page load
THEME = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                          font_mono=["ui-monospace", "Consolas", "monospace"])

CSS = """
.idq-table { width: 100%; border-collapse: collapse; font-size: 0.95em; }
.idq-table th, .idq-table td { text-align: left; padding: 6px 8px; border-bottom: 1px solid #e5e7eb; }
.idq-table progress { width: 150px; height: 12px; vertical-align: middle; }
.idq-status { font-weight: 600; }
.idq-error { color: #b91c1c; }
.idq-muted { color: #6b7280; }
"""

# fetch() from the page, so the API's Set-Cookie reaches the browser; then reload as that user
_AUTH_JS = """
async (email, password) => {
  const r = await fetch("/api/auth/%s", {method: "POST", credentials: "same-origin",
    headers: {"Content-Type": "application/json"}, body: JSON.stringify({email, password})});
  if (r.ok) { window.location.reload(); return "Welcome! Loading your library…"; }
  let detail = null;
  try { detail = (await r.json()).detail; } catch (e) {}
  return typeof detail === "string" ? detail : "Please enter an email address and a password.";
}
"""
_LOGOUT_JS = """
async () => { await fetch("/api/auth/logout", {method: "POST", credentials: "same-origin"});
              window.location.reload(); }
"""


class NotLoggedIn(AppError):
    status = 401


def build_ui(svc: Services) -> gr.Blocks:
    def user_of(request: gr.Request) -> User:
        user = svc.user_from_cookie(request.cookies.get(SESSION_COOKIE)) if request else None
        if user is None:
            raise NotLoggedIn("Your session has ended; please reload the page and log in again.")
        return user

    def friendly(fn):
        """Errors as a sentence in a pop-up, never a traceback."""
        def report(e: Exception):
            if isinstance(e, AppError):
                return gr.Error(e.message, print_exception=False)
            log.exception("UI handler %s failed", fn.__name__)
            return gr.Error("Something went wrong on the server; please try again.", print_exception=False)

        if _is_generator(fn):
            @functools.wraps(fn)
            def gen(*args, **kwargs):
                try:
                    yield from fn(*args, **kwargs)
                except gr.Error:
                    raise
                except Exception as e:
                    raise report(e) from None
            return gen

        @functools.wraps(fn)
        def call(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except gr.Error:
                raise
            except Exception as e:
                raise report(e) from None
        return call

    # Gradio keeps uploads and downloads in its cache folder: drop them after an hour
    with gr.Blocks(title="Infini DocQA", delete_cache=(3600, 3600)) as demo:
        gr.HTML("<h1 style='margin:0'>Infini DocQA</h1><p class='idq-muted' style='margin:0'>Upload books and "
                "PDFs once; ask them anything, with the pages the answer came from. REST API: "
                "<a href='/docs'>/docs</a></p>")

        with gr.Column(visible=True, elem_id="login-panel") as login_col:
            gr.Markdown("### Log in or create an account")
            email = gr.Textbox(label="Email", elem_id="email", max_lines=1)
            password = gr.Textbox(label="Password", type="password", elem_id="password", max_lines=1)
            with gr.Row():
                login_btn = gr.Button("Log in", variant="primary", elem_id="login")
                signup_btn = gr.Button("Create account", elem_id="signup")
            login_msg = gr.Markdown(elem_id="login-msg")

        with gr.Column(visible=False, elem_id="app-panel") as main_col:
            with gr.Row():
                who = gr.HTML(elem_id="who")
                logout_btn = gr.Button("Log out", size="sm", scale=0, elem_id="logout")
            with gr.Tabs():
                with gr.Tab("Library", id="library"):
                    with gr.Row():
                        files = gr.File(label=f"Documents: PDF, TXT or EPUB, up to {svc.settings.max_upload_mb} MB "
                                              "each", file_count="multiple", file_types=[".pdf", ".txt", ".epub"],
                                        elem_id="files", scale=3)
                        with gr.Column(scale=2):
                            pdf_password = gr.Textbox(label="Password (only for encrypted PDFs)", type="password",
                                                      elem_id="pdf-password", max_lines=1)
                            upload_btn = gr.Button("Upload", variant="primary", elem_id="upload")
                    upload_msg = gr.Markdown(elem_id="upload-msg")
                    library = gr.HTML(elem_id="library")
                    with gr.Row():
                        delete_pick = gr.Dropdown(label="Document to delete", choices=[], elem_id="delete-pick",
                                                  scale=3)
                        delete_btn = gr.Button("Delete", variant="stop", elem_id="delete", scale=1)

                with gr.Tab("Chat", id="chat"):
                    chat_doc = gr.Dropdown(label="Document (read ones only)", choices=[], elem_id="chat-doc")
                    with gr.Row():
                        question = gr.Textbox(label="Question", elem_id="question", max_lines=3, scale=5)
                        ask_btn = gr.Button("Ask", variant="primary", elem_id="ask", scale=1)
                    answer = gr.Markdown(elem_id="answer", min_height=80)
                    citations = gr.Radio(label="Cited pages: pick one to see its passage", choices=[],
                                         elem_id="citations")
                    passage = gr.Textbox(label="Cited passage", lines=6, interactive=False, elem_id="passage")
                    passages = gr.State([])

                with gr.Tab("Summaries", id="summaries"):
                    sum_docs = gr.CheckboxGroup(label="Documents to summarise (one, or several as a batch)",
                                                choices=[], elem_id="sum-docs")
                    sum_btn = gr.Button("Summarise", variant="primary", elem_id="summarise")
                    sum_status = gr.HTML(elem_id="sum-status")
                    sum_result = gr.Markdown(elem_id="sum-result")
                    sum_file = gr.DownloadButton("Download as Markdown", visible=False, elem_id="sum-download")
                    sum_job = gr.State(None)

                with gr.Tab("API tokens", id="tokens"):
                    gr.Markdown("Tokens let scripts use the REST API (`Authorization: Bearer <token>`); see "
                                "[/docs](/docs). A token is shown once: copy it now.")
                    with gr.Row():
                        token_name = gr.Textbox(label="Name", placeholder="my script", max_lines=1, scale=3,
                                                elem_id="token-name")
                        token_btn = gr.Button("Create token", scale=1, elem_id="token-create")
                    token_out = gr.Textbox(label="Your new token", interactive=False, buttons=["copy"], elem_id="token")

                with gr.Tab("Usage", id="usage", visible=False) as usage_tab:
                    usage_btn = gr.Button("Refresh", size="sm")
                    usage = gr.Dataframe(interactive=False, elem_id="usage")

        timer = gr.Timer(1.0)
        seen = gr.State(None)  # the document list last sent, so unchanged pickers are left alone

        # -- handlers --------------------------------------------------------------------

        @friendly
        def on_load(request: gr.Request):
            user = svc.user_from_cookie(request.cookies.get(SESSION_COOKIE))
            if user is None:
                return gr.Column(visible=True), gr.Column(visible=False), "", gr.Tab(visible=False)
            role = " (administrator)" if user.is_admin else ""
            return (gr.Column(visible=False), gr.Column(visible=True),
                    f"Signed in as <b>{html.escape(user.email)}</b>{role}",
                    gr.Tab(visible=user.is_admin))

        @friendly
        def refresh(seen_before, job_id, request: gr.Request):
            user = svc.user_from_cookie(request.cookies.get(SESSION_COOKIE))
            if user is None:
                return (gr.skip(),) * 9
            docs = svc.list_documents(user)
            key = [(d["id"], d["title"], d["status"]) for d in docs]
            if key == seen_before:
                pickers = (gr.skip(),) * 3
            else:
                every = [(d["title"], d["id"]) for d in docs]
                ready = [(d["title"], d["id"]) for d in docs if d["status"] == "ready"]
                pickers = gr.Dropdown(choices=every), gr.Dropdown(choices=ready), gr.CheckboxGroup(choices=ready)
            status, result, download, job_after = _summary_view(svc, user, job_id)
            return library_html(docs), *pickers, status, result, download, job_after, key

        @friendly
        def upload(paths, pdf_pw, request: gr.Request):
            user = user_of(request)
            if not paths:
                raise AppError("Please choose one or more files first.")
            lines = []
            for path in paths:
                name = Path(path).name
                try:
                    with open(path, "rb") as f:
                        doc = svc.upload(user, name, f, pdf_pw or None)
                    lines.append(f"**{name}**: uploaded; reading it now." if doc["status"] != "ready"
                                 else f"**{name}**: already in your library.")
                except AppError as e:
                    lines.append(f"**Not uploaded:** {e.message}")
                finally:
                    Path(path).unlink(missing_ok=True)  # Gradio's copy: the blob store has it now
            return "\n\n".join(lines), None, ""

        @friendly
        def delete(doc_id, request: gr.Request):
            user = user_of(request)
            if doc_id is None:
                raise AppError("Please pick the document to delete.")
            title = svc.get_document(user, doc_id)["title"]
            svc.delete_document(user, doc_id)
            return f"Deleted **{title}**.", gr.Dropdown(value=None)

        @friendly
        def ask(doc_id, q, request: gr.Request):
            user = user_of(request)
            if doc_id is None:
                raise AppError("Please pick a document first.")
            job_id = svc.ask(user, doc_id, q)
            text = ""
            yield "*Waiting for a worker…*", gr.Radio(choices=[], value=None), "", []
            for ev in svc.answer_events(user, job_id):
                if ev["event"] == "start":
                    text = ""
                elif ev["event"] == "token":
                    text += ev["text"]
                    yield text, gr.skip(), gr.skip(), gr.skip()
                elif ev["event"] == "waiting":
                    yield f"*{ev['message'] or 'Waiting for the document to be read…'}*", gr.skip(), gr.skip(), gr.skip()
                elif ev["event"] == "done":
                    pages = [f"Page {p}" for p in ev["cited_pages"]]
                    yield ev["text"] or text or "*(empty answer)*", gr.Radio(choices=pages, value=None), "", \
                        ev["passages"]
                else:
                    raise AppError(ev["message"])

        def show_passage(choice, found):
            if not choice:
                return ""
            page = int(choice.split()[-1])
            for p in found:
                first, _, last = p["pages"].partition("-")
                if int(first) <= page <= int(last or first):
                    return f"[pages {p['pages']}] {p['text']}"
            return "The passage of this page is not available."

        @friendly
        def summarise(ids, request: gr.Request):
            user = user_of(request)
            job_id = svc.summarize(user, ids or [])
            return job_id, _progress_html("Summarising", 0.0, "queued"), "", gr.DownloadButton(visible=False)

        @friendly
        def new_token(name, request: gr.Request):
            return svc.create_token(user_of(request), name)

        @friendly
        def show_usage(request: gr.Request):
            rows = svc.usage(user_of(request))
            return {"headers": ["Account", "Documents", "Uploaded", "Tokens read", "Questions", "Summaries"],
                    "data": [[r["user"] + (" (admin)" if r["admin"] else ""), r["documents"], _mb(r["bytes"]),
                              _num(r["tokens"]), r["questions"], r["summaries"]] for r in rows]}

        # -- wiring ----------------------------------------------------------------------

        login_btn.click(None, [email, password], login_msg, js=_AUTH_JS % "login")
        signup_btn.click(None, [email, password], login_msg, js=_AUTH_JS % "signup")
        password.submit(None, [email, password], login_msg, js=_AUTH_JS % "login")
        logout_btn.click(None, None, None, js=_LOGOUT_JS)
        demo.load(on_load, None, [login_col, main_col, who, usage_tab])
        timer.tick(refresh, [seen, sum_job],
                   [library, delete_pick, chat_doc, sum_docs, sum_status, sum_result, sum_file, sum_job, seen],
                   show_progress="hidden")
        upload_btn.click(upload, [files, pdf_password], [upload_msg, files, pdf_password])
        delete_btn.click(delete, delete_pick, [upload_msg, delete_pick])
        ask_event = dict(fn=ask, inputs=[chat_doc, question], outputs=[answer, citations, passage, passages],
                         concurrency_limit=None)  # answers wait on the workers, not on each other
        ask_btn.click(**ask_event)
        question.submit(**ask_event)
        citations.change(show_passage, [citations, passages], passage)
        sum_btn.click(summarise, sum_docs, [sum_job, sum_status, sum_result, sum_file])
        token_btn.click(new_token, token_name, token_out)
        usage_tab.select(show_usage, None, usage)
        usage_btn.click(show_usage, None, usage)
    return demo


def _is_generator(fn) -> bool:
    import inspect

    return inspect.isgeneratorfunction(fn)


_DOWNLOADS = Path(tempfile.mkdtemp(prefix="infini-downloads-"))


def _summary_view(svc: Services, user: User, job_id: int | None):
    """(status, result, download button, job id to keep following) of a summary job."""
    if job_id is None:
        return gr.skip(), gr.skip(), gr.skip(), gr.skip()
    job = svc.get_job(user, job_id)
    if job["state"] not in ("succeeded", "failed", "cancelled"):
        return _progress_html("Summarising", job["progress"], job["state"]), gr.skip(), gr.skip(), job_id
    markdown = svc.summary_markdown(user, job_id)
    path = _DOWNLOADS / f"summaries-{job_id}.md"  # Gradio serves a copy of it from its cache
    path.write_text(markdown)
    note = "" if not job["error"] else f"<p class='idq-error'>{html.escape(job['error'])}</p>"
    return (_progress_html("Summaries", 1.0, job["state"]) + note, markdown.split("\n", 2)[-1],
            gr.DownloadButton(value=str(path), visible=True), None)


def _progress_html(what: str, progress: float, state: str) -> str:
    return (f"<p><span class='idq-status'>{what}: {html.escape(state)}</span> "
            f"<progress value='{progress:.3f}' max='1'></progress> {progress:.0%}</p>")


def library_html(docs: list[dict]) -> str:
    if not docs:
        return "<p class='idq-muted'>Your library is empty: upload a PDF, TXT or EPUB file above.</p>"
    rows = []
    for d in docs:
        rows.append(
            f"<tr data-doc='{d['id']}'><td>{html.escape(d['title'])}</td>"
            f"<td class='idq-status' data-status='{d['status']}'>{d['status']}</td><td>{_reading(d)}</td>"
            f"<td>{d['pages'] or '–'}</td><td>{_num(d['tokens'])}</td><td>{_mb(d['snapshot_bytes'])}</td>"
            f"<td>{html.escape(d['model'] or '–')}</td></tr>")
    head = "".join(f"<th>{h}</th>" for h in ("Document", "Status", "Reading", "Pages", "Tokens", "Snapshot", "Model"))
    return f"<table class='idq-table'><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _reading(d: dict) -> str:
    job = d["ingest"]
    if d["status"] == "failed":
        return f"<span class='idq-error'>{html.escape(d['error'] or (job or {}).get('error') or 'Failed.')}</span>"
    if d["status"] == "ready":
        return "<progress value='1' max='1'></progress> done"
    if job is None:
        return "<span class='idq-muted'>waiting</span>"
    p = job["progress"] or 0.0
    bits = [f"{p:.0%}"]
    if job["tokens_per_s"]:
        bits.append(f"{job['tokens_per_s']:,.0f} tokens/s")
    if job["eta_s"] is not None and d["status"] == "reading":
        bits.append(f"ETA {_duration(job['eta_s'])}")
    return f"<progress value='{p:.3f}' max='1'></progress> {' · '.join(bits)}"


def _duration(s: float) -> str:
    s = round(s)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def _num(n: int | None) -> str:
    return "–" if n is None else f"{n:,}"


def _mb(n: int | None) -> str:
    if n is None:
        return "–"
    if n == 0:
        return "0"
    return f"{n / 1024 / 1024:.1f} MB" if n >= 100 * 1024 else f"{n / 1024:.1f} KB"
