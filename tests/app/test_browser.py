"""End to end in a real headless Chromium: `python -m app` with its real Celery worker on
the embedded broker (SQLite, local blobs, no server), the tiny model, a real PDF.

Needs Debian's Chromium at /usr/bin/chromium and the `playwright` package (its own
browser download is not used). Without them the test is skipped, and fails under CI=true.
Screenshots go to $INFINI_SCREENSHOT_DIR (e.g. docs/screenshots) or the test's tmp folder.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.app.conftest import wait_for
from tests.datasets import fetch
from tests.storage.conftest import service_unavailable
from tests.tiny_models import save_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
# the Bitcoin whitepaper, 9 pages; section 8, "Simplified Payment Verification", is on page 5
PDF = ("iscc-samples==0.6.0", "iscc_samples-0.6.0/iscc_samples/files/text/demo.pdf")
QUESTION, PAGE = "How does simplified payment verification work?", 5
PASSWORD = "correct horse battery"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        service_unavailable(f"no Chromium at {CHROMIUM}: apt-get install -y chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        service_unavailable("the browser test needs the playwright package: pip install playwright")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


class Server:
    def __init__(self, data: Path):
        self.port, self.data = free_port(), data
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("INFINI_")}
        env.update(INFINI_DATA_DIR=str(data), INFINI_MODEL=str(save_tiny_checkpoint(data / "tiny-random-llama")),
                   INFINI_SEGMENT_LEN="16", INFINI_DEVICE="cpu",
                   # frequent checkpoints: a reading long enough to watch (a few seconds)
                   INFINI_CHECKPOINT_EVERY="4", INFINI_ANSWER_MAX_TOKENS="200",
                   INFINI_SUMMARY_MAX_TOKENS="8", INFINI_SUMMARY_SECTIONS="2", INFINI_HEARTBEAT_S="1",
                   HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        self.env, self.log = env, data / "app.log"
        self.proc = subprocess.Popen([sys.executable, "-m", "app", "--port", str(self.port)], cwd=ROOT, env=env,
                                     stdout=open(self.log, "wb"), stderr=subprocess.STDOUT)
        try:
            wait_for(self._up, timeout=120, every=0.3)
        except AssertionError:
            self.stop()
            pytest.fail(f"the app did not start:\n{self.log_tail()}")

    def _up(self) -> bool:
        if self.proc.poll() is not None:
            pytest.fail(f"the app exited ({self.proc.returncode}):\n{self.log_tail()}")
        try:
            return urllib.request.urlopen(f"{self.url}/healthz", timeout=2).status == 200
        except OSError:
            return False

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def cli(self, *args: str) -> str:
        out = subprocess.run([sys.executable, "-m", "app", *args], cwd=ROOT, env=self.env, capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        return out.stdout

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # as Ctrl-C: uvicorn stops, then the worker
            try:
                self.proc.wait(40)
            except subprocess.TimeoutExpired:
                self.proc.kill()  # the worker follows it (parent-death signal)
                self.proc.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("app"))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("INFINI_SCREENSHOT_DIR") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def sign_up(page, url: str, email: str) -> None:
    page.goto(url)
    page.fill("#email input", email)
    page.fill("#password input", PASSWORD)
    page.click("#signup")
    page.wait_for_selector("#app-panel", state="visible", timeout=30_000)
    assert email in page.inner_text("#who")


def library_rows(page) -> list[dict]:
    return page.eval_on_selector_all("#library tr[data-doc]", """rows => rows.map(r => ({
        title: r.cells[0].innerText, status: r.cells[1].dataset.status,
        progress: r.querySelector('progress') ? Number(r.querySelector('progress').value) : null,
        reading: r.cells[2].innerText, pages: r.cells[3].innerText}))""")


def test_a_person_reads_asks_and_summarises_in_the_browser(browser, server, shots):
    ctx = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    page = ctx.new_page()
    page.goto(server.url)
    page.wait_for_selector("#email input")
    page.screenshot(path=shots / "01-login.png")

    page.fill("#email input", "ada@example.com")
    page.fill("#password input", "wrong password")
    page.click("#login")
    page.wait_for_function("document.querySelector('#login-msg').innerText.includes('wrong')")
    sign_up(page, server.url, "ada@example.com")

    # a file that is no document: a sentence, no traceback
    page.set_input_files("#files input[type=file]", files=[
        {"name": "notes.txt", "mimeType": "text/plain", "buffer": bytes(range(256)) * 8}])
    page.click("#upload")
    page.wait_for_function("document.querySelector('#upload-msg').innerText.includes('not a PDF')")
    assert '"notes.txt" is not a PDF, EPUB or plain-text (.txt) file.' in page.inner_text("#upload-msg")

    # upload the PDF and watch its progress bar until it is read
    page.set_input_files("#files input[type=file]", str(fetch(*PDF, sdist=True)))
    page.click("#upload")
    page.wait_for_function("document.querySelector('#upload-msg').innerText.includes('reading it now')")
    seen, shot_at = [], -1.0
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        rows = library_rows(page)
        if rows:
            seen.append((rows[0]["status"], rows[0]["progress"]))
            progress = rows[0]["progress"] or 0.0
            if rows[0]["status"] == "reading" and progress > shot_at and (shot_at <= 0 or progress < 0.9):
                page.screenshot(path=shots / "02-library-reading.png", full_page=True)  # the latest mid-way
                shot_at = progress
            if rows[0]["status"] in ("ready", "failed"):
                break
        time.sleep(0.1)
    row = library_rows(page)[0]
    assert row["status"] == "ready", (row, server.log_tail())
    assert row["progress"] == 1 and "done" in row["reading"] and row["pages"] == "9"
    assert seen[0][0] in ("queued", "reading"), seen  # the bar was there before it was done
    page.screenshot(path=shots / "03-library.png", full_page=True)

    # ask; the answer streams in, and cites the page the answer is on
    page.get_by_role("tab", name="Chat").click()
    page.click("#chat-doc input")
    page.locator("ul[role=listbox] li", has_text="demo").first.click()
    page.fill("#question textarea", QUESTION)
    page.evaluate("""() => { window.answerTexts = [];
        new MutationObserver(() => window.answerTexts.push(document.querySelector('#answer').innerText))
            .observe(document.querySelector('#answer'), {subtree: true, childList: true, characterData: true}); }""")
    page.click("#ask")
    page.wait_for_selector("#citations label", timeout=60_000)
    texts = [t for t in page.evaluate("window.answerTexts") if t.strip() and "Waiting" not in t]
    final = page.inner_text("#answer")
    grown = [t for t in dict.fromkeys(texts) if final.startswith(t.strip()[:20]) and t.strip() != final.strip()]
    assert grown, f"no partial answer was shown before the whole one: {texts!r}"
    cited = page.locator("#citations label").all_inner_texts()
    assert f"Page {PAGE}" in cited, cited
    page.locator("#citations label", has_text=f"Page {PAGE}").click()
    page.wait_for_function("document.querySelector('#passage textarea').value.length > 0")
    passage = page.input_value("#passage textarea")
    pages = re.match(r"\[pages (\d+)(?:-(\d+))?\]", passage)
    assert pages and int(pages[1]) <= PAGE <= int(pages[2] or pages[1]), passage
    assert "Simplified Payment Verification" in passage
    page.screenshot(path=shots / "04-chat.png", full_page=True)

    # summarise; the result can be downloaded as Markdown
    page.get_by_role("tab", name="Summaries").click()
    page.locator("#sum-docs label", has_text="demo").click()
    page.click("#summarise")
    page.wait_for_selector("#sum-download", state="visible", timeout=120_000)
    assert "succeeded" in page.inner_text("#sum-status")
    with page.expect_download() as download:
        page.click("#sum-download")
    markdown = Path(download.value.path()).read_text()
    assert markdown.startswith("# Summaries") and "## demo" in markdown
    page.screenshot(path=shots / "05-summaries.png", full_page=True)

    # a second person sees none of it, not even by id
    other = browser.new_context(viewport={"width": 1280, "height": 900})
    page2 = other.new_page()
    sign_up(page2, server.url, "bob@example.com")
    page2.wait_for_selector("#library p")
    assert "Your library is empty" in page2.inner_text("#library")
    assert page2.request.get(f"{server.url}/api/documents").json() == []
    doc_id = page.request.get(f"{server.url}/api/documents").json()[0]["id"]
    assert page2.request.get(f"{server.url}/api/documents/{doc_id}").status == 404
    page2.get_by_role("tab", name="Chat").click()
    page2.click("#chat-doc input")
    assert page2.locator("ul[role=listbox] li", has_text="demo").count() == 0
    page2.keyboard.press("Escape")
    page2.get_by_role("tab", name="Library").click()
    page2.screenshot(path=shots / "06-second-user.png", full_page=True)
    other.close()

    # an administrator sees the usage of every account
    assert "is now an administrator" in server.cli("make-admin", "ada@example.com")
    page.reload()
    page.get_by_role("tab", name="Usage").click()
    page.wait_for_function("document.querySelector('#usage').innerText.includes('bob@example.com')")
    page.screenshot(path=shots / "07-usage.png", full_page=True)

    # an API token for scripts, shown once
    page.get_by_role("tab", name="API tokens").click()
    page.fill("#token-name input", "my script")
    page.click("#token-create")
    page.wait_for_function("document.querySelector('#token textarea, #token input').value.startsWith('idq_')")
    token = page.input_value("#token textarea, #token input")
    script = urllib.request.Request(f"{server.url}/api/me", headers={"Authorization": f"Bearer {token}"})
    assert json.load(urllib.request.urlopen(script, timeout=10))["email"] == "ada@example.com"  # no cookie
    page.screenshot(path=shots / "08-api-tokens.png", full_page=True)
    ctx.close()
