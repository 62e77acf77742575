"""The REST API against a real SQLite database and blob folder, the workers' functions
running the jobs (tiny model): every endpoint, accounts and who sees what."""

from __future__ import annotations

import io
import json
import uuid

import pytest
from fastapi.testclient import TestClient

from app.services import TooLarge
from tests.app.conftest import book, wait_for

PASSWORD = "correct horse battery"


def sign_up(client: TestClient, email: str = "ada@example.com") -> dict:
    r = client.post("/api/auth/signup", json={"email": email, "password": PASSWORD})
    assert r.status_code == 201, r.text
    return r.json()


def other_client(client: TestClient, email: str = "bob@example.com") -> TestClient:
    """A second browser on the same app, signed in as someone else."""
    other = TestClient(client.app)
    sign_up(other, email)
    return other


def upload(client: TestClient, *files: tuple[str, bytes], **form) -> list[dict]:
    r = client.post("/api/documents", files=[("files", (n, io.BytesIO(b))) for n, b in files], data=form)
    assert r.status_code == 201, r.text
    return r.json()


def wait_ready(client: TestClient, doc_id: int) -> dict:
    def ready():
        d = client.get(f"/api/documents/{doc_id}").json()
        assert d["status"] != "failed", d
        return d if d["status"] == "ready" else None
    return wait_for(ready)


def sse_events(response) -> list[tuple[str, dict]]:
    """Parse a text/event-stream body: (event name, data) pairs."""
    events = []
    for block in response.text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines())
        events.append((fields["event"], json.loads(fields["data"])))
    return events


def test_every_endpoint_wants_a_login(make_client):
    client = make_client()
    calls = [("get", "/api/me"), ("get", "/api/documents"), ("post", "/api/documents"),
             ("get", "/api/documents/1"), ("delete", "/api/documents/1"), ("post", "/api/documents/1/ask"),
             ("post", "/api/summaries"), ("get", "/api/jobs/1"), ("get", "/api/jobs/1/summary.md"),
             ("post", "/api/tokens"), ("get", "/api/tokens"), ("delete", "/api/tokens/1"),
             ("get", "/api/admin/usage")]
    for method, path in calls:
        r = client.request(method, path)
        assert r.status_code == 401, (method, path, r.status_code)
        assert r.headers["www-authenticate"] == "Bearer"
        assert r.json()["detail"].startswith("Please log in")
    r = client.get("/api/documents", headers={"Authorization": "Bearer idq_not-a-token"})
    assert r.status_code == 401 and "not valid" in r.json()["detail"]


def test_accounts_sign_up_log_in_log_out(make_client):
    client = make_client()
    me = sign_up(client, "Ada@Example.com")
    assert me["email"] == "ada@example.com" and not me["is_admin"]
    assert client.get("/api/me").json()["email"] == "ada@example.com"

    again = TestClient(client.app)
    assert again.post("/api/auth/signup", json={"email": "ada@example.com", "password": PASSWORD}).status_code == 409
    bad = again.post("/api/auth/signup", json={"email": "not-an-email", "password": PASSWORD})
    assert bad.status_code == 400 and "valid email" in bad.json()["detail"]
    short = again.post("/api/auth/signup", json={"email": "c@example.com", "password": "short"})
    assert short.status_code == 400 and "at least 8" in short.json()["detail"]
    wrong = again.post("/api/auth/login", json={"email": "ada@example.com", "password": "wrong password"})
    assert wrong.status_code == 401 and wrong.json()["detail"] == "The email or the password is wrong."
    assert again.post("/api/auth/login", json={"email": "nobody@example.com", "password": PASSWORD}).status_code == 401
    assert again.post("/api/auth/login", json={"email": "ADA@example.com", "password": PASSWORD}).status_code == 200
    assert again.get("/api/me").status_code == 200

    # the cookie is signed: editing it logs nobody in
    cookie = again.cookies.get("infini_session")
    forged = TestClient(client.app, cookies={"infini_session": cookie[:-2] + "xx"})
    assert forged.get("/api/me").status_code == 401

    assert again.post("/api/auth/logout").status_code == 204
    assert again.get("/api/me").status_code == 401

    # the password hash is argon2id, never the password
    svc = client.app.state.services
    from storage.models import User

    with svc.session() as s:
        stored = s.query(User).one().password_hash
    assert stored.startswith("$argon2id$") and PASSWORD not in stored


def test_api_tokens(make_client):
    client = make_client()
    sign_up(client)
    token = client.post("/api/tokens", json={"name": "script"}).json()["token"]
    assert token.startswith("idq_")
    script = TestClient(client.app, headers={"Authorization": f"Bearer {token}"})
    assert script.get("/api/me").json()["email"] == "ada@example.com"
    listed = client.get("/api/tokens").json()
    assert [t["name"] for t in listed] == ["script"] and listed[0]["last_used_at"] is not None
    assert "token" not in listed[0]  # shown once, at creation only

    other = other_client(client)
    assert other.delete(f"/api/tokens/{listed[0]['id']}").status_code == 404  # not theirs
    assert client.delete(f"/api/tokens/{listed[0]['id']}").status_code == 204
    assert script.get("/api/me").status_code == 401


def test_upload_read_list_get_delete(make_client):
    client = make_client()
    sign_up(client)
    a, b = book(1).encode(), book(2).encode()
    docs = upload(client, ("harbour.txt", a), ("cliff.txt", b))
    assert [d["title"] for d in docs] == ["harbour", "cliff"]
    assert all(d["status"] in ("queued", "reading", "ready") for d in docs)

    ready = wait_ready(client, docs[0]["id"])
    assert ready["pages"] >= 1 and ready["tokens"] > 100
    assert ready["snapshot_bytes"] > 0 and ready["model"]
    ingest = ready["ingest"]
    assert ingest["state"] == "succeeded" and ingest["progress"] == 1.0
    assert ingest["tokens_done"] == ready["tokens"] and ingest["tokens_per_s"] > 0
    wait_ready(client, docs[1]["id"])

    assert {d["id"] for d in client.get("/api/documents").json()} == {d["id"] for d in docs}
    # the same file again is the same document, not a second reading
    assert upload(client, ("copy.txt", a))[0]["id"] == docs[0]["id"]

    svc = client.app.state.services
    from storage.models import Snapshot

    with svc.session() as s:
        keys = [k for (k,) in s.query(Snapshot.blob_key).filter(Snapshot.document_id == docs[0]["id"])]
    assert keys and all(svc.ctx.blobs.exists(k) for k in keys)
    assert client.delete(f"/api/documents/{docs[0]['id']}").status_code == 204
    assert client.get(f"/api/documents/{docs[0]['id']}").status_code == 404
    assert not any(svc.ctx.blobs.exists(k) for k in keys)
    assert [d["id"] for d in client.get("/api/documents").json()] == [docs[1]["id"]]


def test_encrypted_pdf_needs_its_password(make_client):
    from tests.datasets import fetch

    locked = fetch("pypdf==7.1.0", "pypdf-7.1.0/resources/encryption/r4-user-password.pdf", sdist=True).read_bytes()
    client = make_client()
    sign_up(client)
    doc = upload(client, ("locked.pdf", locked))[0]
    failed = wait_for(lambda: (d := client.get(f"/api/documents/{doc['id']}").json())["status"] == "failed" and d)
    assert "password" in failed["error"] and failed["error"].endswith(".")  # a sentence for the person
    # the same file again, with its password: the same document, read this time
    again = upload(client, ("locked.pdf", locked), password="asdfzxcv")[0]
    assert again["id"] == doc["id"]
    assert wait_ready(client, doc["id"])["pages"] >= 1


def test_another_users_document_and_jobs_are_not_found(make_client):
    client = make_client()
    sign_up(client)
    doc = upload(client, ("harbour.txt", book(3).encode()))[0]
    wait_ready(client, doc["id"])
    job = client.post("/api/summaries", json={"document_ids": [doc["id"]]}).json()["job_id"]

    other = other_client(client)
    assert other.get("/api/documents").json() == []
    for method, path, body in [("get", f"/api/documents/{doc['id']}", None),
                               ("delete", f"/api/documents/{doc['id']}", None),
                               ("post", f"/api/documents/{doc['id']}/ask", {"question": "Where?"}),
                               ("post", "/api/summaries", {"document_ids": [doc["id"]]}),
                               ("get", f"/api/jobs/{job}", None),
                               ("get", f"/api/jobs/{job}/summary.md", None),
                               ("get", f"/api/jobs/{doc['ingest']['job_id']}", None),
                               ("get", "/api/documents/999999", None)]:
        r = other.request(method, path, json=body)
        assert r.status_code == 404, (method, path, r.text)  # the same answer as for no such id
    assert client.get(f"/api/documents/{doc['id']}").status_code == 200  # still there for its owner


def test_oversize_upload_is_413_and_stores_nothing(make_client):
    client = make_client(max_upload_mb=1)
    sign_up(client)
    big = (book(4) + "\n\n") * 600  # ~1.4 MB of text
    assert len(big) > 1024 * 1024
    r = client.post("/api/documents", files=[("files", ("big.txt", io.BytesIO(big.encode())))])
    assert r.status_code == 413
    assert r.json()["detail"] == '"big.txt" is larger than the 1 MB upload limit.'
    assert client.get("/api/documents").json() == []
    blobs = client.app.state.services.settings.blob_dir
    assert not any(p.is_file() for p in blobs.rglob("*"))  # the partial upload was removed

    # a stream of unknown length is cut off at the limit
    class Stream:
        def __init__(self, data: bytes):
            self.f = io.BytesIO(data)

        def read(self, n: int = -1) -> bytes:
            return self.f.read(n)

    svc = client.app.state.services
    with pytest.raises(TooLarge):
        svc.upload(svc.user_from_cookie(client.cookies.get("infini_session")), "big.txt", Stream(big.encode()))
    assert not any(p.is_file() for p in blobs.rglob("*"))
    assert client.get("/api/documents").json() == []

    # a request far over any number of files is refused from its Content-Length, unread
    huge = client.post("/api/documents", content=b"x", headers={"Content-Type": "multipart/form-data; boundary=x",
                                                               "Content-Length": str(50 * 1024 * 1024)})
    assert huge.status_code == 413 and "too large" in huge.json()["detail"]


@pytest.mark.parametrize("name, data", [
    ("report.docx", b"PK\x03\x04 word document"),
    ("photo.pdf", b"\x89PNG\r\n\x1a\n" + bytes(range(256))),
    ("notes.txt", bytes(range(256)) * 4),
    ("page.html", b"<html><body>hello</body></html>"),
])
def test_wrong_type_is_415(make_client, name, data):
    client = make_client()
    sign_up(client)
    r = client.post("/api/documents", files=[("files", (name, io.BytesIO(data)))])
    assert r.status_code == 415
    assert r.json()["detail"] == f'"{name}" is not a PDF, EPUB or plain-text (.txt) file.'
    assert client.get("/api/documents").json() == []


def check_answer_stream(client: TestClient, doc_id: int, page: int) -> None:
    r = client.post(f"/api/documents/{doc_id}/ask", json={"question": "Where was the treasure hidden?"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r)
    names = [name for name, _ in events]
    assert names[0] == "start" and names[-1] == "done" and "token" in names, names
    tokens = "".join(data["text"] for name, data in events if name == "token")
    done = events[-1][1]
    assert done["text"] == tokens and tokens
    assert page in done["cited_pages"]
    assert any("treasure" in p["text"] for p in done["passages"])
    job = client.get(f"/api/jobs/{done['job_id']}").json()
    assert job["state"] == "succeeded" and job["answer"] == tokens and page in job["cited_pages"]


def test_ask_streams_server_sent_events(make_client):
    client = make_client()
    sign_up(client)
    # ~3000 characters a synthetic page: the treasure is on the last of several pages
    doc = upload(client, ("sea.txt", book(5, paragraphs=40, topic="treasure").encode()))[0]
    doc = wait_ready(client, doc["id"])
    assert doc["pages"] >= 3
    check_answer_stream(client, doc["id"], doc["pages"])

    assert client.post(f"/api/documents/{doc['id']}/ask", json={"question": "  "}).status_code == 400
    queued = upload(client, ("later.txt", book(6).encode()))[0]  # the worker is busy reading it
    r = client.post(f"/api/documents/{queued['id']}/ask", json={"question": "What?"})
    assert r.status_code == 409 and "not ready yet" in r.json()["detail"]


def test_ask_streams_through_redis(make_client, redis_url):
    """With Redis the tokens come from the worker's answer stream, passages included."""
    client = make_client(redis_url=redis_url, namespace=f"infini-app-test-{uuid.uuid4().hex[:8]}")
    sign_up(client)
    doc = upload(client, ("sea.txt", book(7, paragraphs=40, topic="treasure").encode()))[0]
    doc = wait_ready(client, doc["id"])
    check_answer_stream(client, doc["id"], doc["pages"])


def test_summaries_one_and_batch(make_client):
    client = make_client()
    sign_up(client)
    docs = upload(client, ("north.txt", book(8).encode()), ("south.txt", book(9).encode()))
    for d in docs:
        wait_ready(client, d["id"])

    def finished(job_id):
        return wait_for(lambda: (j := client.get(f"/api/jobs/{job_id}").json())["state"] in ("succeeded", "failed")
                        and j)

    one = client.post("/api/summaries", json={"document_ids": [docs[0]["id"]]})
    assert one.status_code == 202
    job = finished(one.json()["job_id"])
    assert job["kind"] == "summarize" and job["state"] == "succeeded" and job["summary"]

    batch = finished(client.post("/api/summaries", json={"document_ids": [d["id"] for d in docs]}).json()["job_id"])
    assert batch["kind"] == "batch_summarize" and batch["state"] == "succeeded" and batch["progress"] == 1.0
    assert [c["title"] for c in batch["children"]] == ["north", "south"]
    assert all(c["state"] == "succeeded" and c["summary"] for c in batch["children"])

    md = client.get(f"/api/jobs/{batch['id']}/summary.md")
    assert md.status_code == 200 and md.headers["content-type"].startswith("text/markdown")
    assert md.text.startswith("# Summaries") and "## north" in md.text and "## south" in md.text

    assert client.post("/api/summaries", json={"document_ids": []}).status_code == 422
    assert client.post("/api/summaries", json={"document_ids": [12345]}).status_code == 404


def test_admin_sees_usage(make_client):
    client = make_client()
    sign_up(client)
    assert client.get("/api/admin/usage").status_code == 404  # not an admin: nothing there
    svc = client.app.state.services
    svc.set_admin("ada@example.com")
    other_client(client)
    rows = client.get("/api/admin/usage").json()
    assert [r["user"] for r in rows] == ["ada@example.com", "bob@example.com"]
    assert rows[0]["admin"] and set(rows[0]) >= {"documents", "bytes", "tokens", "questions", "summaries"}


def test_openapi_is_served(make_client):
    client = make_client()
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/api/documents", "/api/documents/{document_id}", "/api/documents/{document_id}/ask",
            "/api/summaries", "/api/jobs/{job_id}"} <= set(paths)
    assert client.get("/").status_code == 200  # the Gradio page


def test_the_web_app_imports_no_torch(tmp_path):
    """The web process never runs a model: importing one would cost seconds and memory."""
    import subprocess
    import sys
    from pathlib import Path

    probe = ("import sys; from app.main import create_app; from app.services import make_services; "
             "create_app(make_services()); print(sorted({'torch', 'transformers', 'infini_core'} & set(sys.modules)))")
    env = {"PATH": "/usr/bin:/bin", "INFINI_DATA_DIR": str(tmp_path), "GRADIO_ANALYTICS_ENABLED": "False"}
    out = subprocess.run([sys.executable, "-c", probe], cwd=Path(__file__).resolve().parents[2], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
