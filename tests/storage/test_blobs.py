"""Blob stores: local folder (atomic, streaming) and S3 (against an in-memory fake client)."""

from __future__ import annotations

import hashlib
import io
import sys
from pathlib import Path
from typing import IO, Any

import pytest

from storage import blobs
from storage.blobs import LocalBlobStore, S3BlobStore, blob_store_from_settings, validate_key
from storage.settings import Settings

DATA = bytes(range(256)) * 10_000  # 2.5 MB: several chunks
SHA = hashlib.sha256(DATA).hexdigest()


class ChunkedReader(io.RawIOBase):
    """A source that records its reads and can fail after `fail_after` bytes."""

    def __init__(self, data: bytes, fail_after: int | None = None) -> None:
        self._buf = io.BytesIO(data)
        self.fail_after = fail_after
        self.reads: list[int] = []

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        self.reads.append(n)
        if self.fail_after is not None and self._buf.tell() >= self.fail_after:
            raise OSError("connection reset by peer")
        return self._buf.read(n)


@pytest.fixture
def store(tmp_path: Path) -> LocalBlobStore:
    return LocalBlobStore(tmp_path / "blobs")


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


# --- keys ------------------------------------------------------------------------

GOOD_KEYS = ["a", "documents/12/source.pdf", "snapshots/3/ckpt-000512.infini", "x_y-Z.9"]
BAD_KEYS = [
    "",
    "/etc/passwd",
    "../x",
    "a/../b",
    "a/./b",
    "..",
    "a//b",
    "a/b/",
    ".hidden",
    "a/.tmp-x",
    "a\\b",
    "c:/x",
    "a b",
    "a\x00b",
    "x" * 2000,
    "é",
]


@pytest.mark.parametrize("key", GOOD_KEYS)
def test_good_keys(key: str) -> None:
    assert validate_key(key) == key


@pytest.mark.parametrize("key", BAD_KEYS)
def test_bad_keys_are_refused_everywhere(key: str, store: LocalBlobStore) -> None:
    with pytest.raises(ValueError):
        validate_key(key)
    for call in (store.open, store.exists, store.delete, store.size):
        with pytest.raises(ValueError):
            call(key)
    with pytest.raises(ValueError):
        store.put(key, io.BytesIO(b"x"))
    assert not store.root.exists() or files_under(store.root) == []


# --- local store ---------------------------------------------------------------------


def test_put_open_size_from_fileobj_and_path(store: LocalBlobStore, tmp_path: Path) -> None:
    assert store.put("docs/1/a.bin", io.BytesIO(DATA)) == (len(DATA), SHA)
    src = tmp_path / "upload.bin"
    src.write_bytes(DATA)
    assert store.put("docs/1/b.bin", src) == (len(DATA), SHA)
    assert store.put("docs/1/c.bin", str(src)) == (len(DATA), SHA)
    for key in ("docs/1/a.bin", "docs/1/b.bin", "docs/1/c.bin"):
        assert store.exists(key) and store.size(key) == len(DATA)
        with store.open(key) as f:
            assert f.read() == DATA
        with store.get_path(key) as p:
            assert p.read_bytes() == DATA
    assert files_under(store.root) == ["docs/1/a.bin", "docs/1/b.bin", "docs/1/c.bin"]


def test_put_reads_from_current_position_and_replaces(store: LocalBlobStore) -> None:
    f = io.BytesIO(b"headerDATA")
    f.seek(6)
    assert store.put("k", f) == (4, hashlib.sha256(b"DATA").hexdigest())
    store.put("k", io.BytesIO(b"new"))
    with store.open("k") as g:
        assert g.read() == b"new"


def test_empty_blob(store: LocalBlobStore) -> None:
    assert store.put("empty", io.BytesIO(b"")) == (0, hashlib.sha256(b"").hexdigest())
    assert store.size("empty") == 0


def test_put_streams_in_chunks(store: LocalBlobStore) -> None:
    src = ChunkedReader(DATA)
    store.put("big", src)
    # never "read everything": bounded reads only
    assert src.reads and all(0 < n <= blobs.CHUNK for n in src.reads)


def test_failed_put_leaves_nothing(store: LocalBlobStore) -> None:
    with pytest.raises(OSError, match="reset"):
        store.put("docs/1/source.pdf", ChunkedReader(DATA, fail_after=blobs.CHUNK))
    assert not store.exists("docs/1/source.pdf")
    assert files_under(store.root) == []  # no temp file left behind


def test_failed_overwrite_keeps_the_old_blob(store: LocalBlobStore) -> None:
    store.put("k", io.BytesIO(b"old"))
    with pytest.raises(OSError):
        store.put("k", ChunkedReader(DATA, fail_after=blobs.CHUNK))
    with store.open("k") as f:
        assert f.read() == b"old"
    assert files_under(store.root) == ["k"]


def test_text_source_is_refused(store: LocalBlobStore) -> None:
    with pytest.raises(TypeError, match="binary"):
        store.put("k", io.StringIO("text"))  # type: ignore[arg-type]
    assert files_under(store.root) == []


def test_missing_blob(store: LocalBlobStore) -> None:
    assert not store.exists("nope")
    store.delete("nope")  # idempotent
    with pytest.raises(FileNotFoundError):
        store.open("nope")
    with pytest.raises(FileNotFoundError):
        store.size("nope")
    with pytest.raises(FileNotFoundError):
        with store.get_path("nope"):
            pass


def test_delete(store: LocalBlobStore) -> None:
    store.put("a/b", io.BytesIO(b"x"))
    store.delete("a/b")
    assert not store.exists("a/b")


# --- S3 store, against a fake client -----------------------------------------------------


class FakeClientError(Exception):
    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.response = {"Error": {"Code": code}}


class FakeS3:
    """The few boto3 client calls S3BlobStore makes, over a dict."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str], bytes] = {}

    def upload_fileobj(self, fileobj: Any, bucket: str, key: str) -> None:
        parts = []
        while chunk := fileobj.read(blobs.CHUNK):  # like s3transfer: part by part
            parts.append(chunk)
        self.objects[bucket, key] = b"".join(parts)  # only a complete upload appears

    def download_fileobj(self, bucket: str, key: str, fileobj: IO[bytes]) -> None:
        if (bucket, key) not in self.objects:
            raise FakeClientError("404")
        fileobj.write(self.objects[bucket, key])

    def head_object(self, Bucket: str, Key: str) -> dict[str, Any]:
        if (Bucket, Key) not in self.objects:
            raise FakeClientError("404")
        return {"ContentLength": len(self.objects[Bucket, Key])}

    def delete_object(self, Bucket: str, Key: str) -> None:
        self.objects.pop((Bucket, Key), None)


@pytest.fixture
def s3() -> S3BlobStore:
    return S3BlobStore("bucket", client=FakeS3())


def test_s3_store(s3: S3BlobStore) -> None:
    assert s3.put("snapshots/1/final.infini", io.BytesIO(DATA)) == (len(DATA), SHA)
    assert s3.exists("snapshots/1/final.infini") and s3.size("snapshots/1/final.infini") == len(
        DATA
    )
    with s3.open("snapshots/1/final.infini") as f:
        assert f.seekable() and f.read() == DATA
    with s3.get_path("snapshots/1/final.infini") as p:
        assert p.suffix == ".infini" and p.read_bytes() == DATA
    assert not p.exists()  # the temp copy is removed
    s3.delete("snapshots/1/final.infini")
    assert not s3.exists("snapshots/1/final.infini")


def test_s3_missing_and_failures(s3: S3BlobStore) -> None:
    for call in (s3.open, s3.size):
        with pytest.raises(FileNotFoundError):
            call("nope")
    with pytest.raises(FileNotFoundError):
        with s3.get_path("nope.pdf"):
            pass
    with pytest.raises(OSError):
        s3.put("k", ChunkedReader(DATA, fail_after=blobs.CHUNK))
    assert not s3.exists("k")
    with pytest.raises(ValueError):
        s3.put("../k", io.BytesIO(b"x"))


def test_s3_other_errors_propagate(s3: S3BlobStore) -> None:
    s3.client.head_object = lambda **kw: (_ for _ in ()).throw(FakeClientError("AccessDenied"))
    with pytest.raises(FakeClientError):
        s3.exists("k")


def test_s3_without_boto3_says_how_to_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "boto3", None)  # makes `import boto3` fail
    with pytest.raises(ImportError, match="pip install boto3"):
        S3BlobStore("bucket")


# --- from settings -------------------------------------------------------------------


def test_blob_store_from_settings(settings_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    local = blob_store_from_settings(Settings())
    assert isinstance(local, LocalBlobStore) and local.root == settings_env / "blobs"

    made: dict[str, Any] = {}

    class FakeBoto3:
        @staticmethod
        def client(service: str, **kw: Any) -> FakeS3:
            made.update(kw, service=service)
            return FakeS3()

    monkeypatch.setattr(blobs, "_boto3", lambda: FakeBoto3)
    s = Settings(
        blob_backend="s3",
        s3_bucket="docs",
        s3_endpoint_url="http://127.0.0.1:9000",
        s3_access_key="ak",
        s3_secret_key="sk",
        s3_region="eu-west-1",
    )
    store = blob_store_from_settings(s)
    assert isinstance(store, S3BlobStore) and store.bucket == "docs"
    assert made == {
        "service": "s3",
        "endpoint_url": "http://127.0.0.1:9000",
        "aws_access_key_id": "ak",
        "aws_secret_access_key": "sk",
        "region_name": "eu-west-1",
    }
    with pytest.raises(ValueError, match="bucket"):
        blob_store_from_settings(Settings(blob_backend="s3"))
