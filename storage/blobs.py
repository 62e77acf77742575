"""Blob store for uploaded files and memory snapshots: a local folder or S3.

Both stores stream: `put` reads its source in chunks, hashing as it goes, so a
200 MB upload never sits in memory. Writes are atomic: a reader sees the whole
blob under its key or nothing (local: temp file in the same folder, fsync,
rename; S3: an object only appears once its upload completes).

Keys look like relative paths, `documents/12/source.pdf`: parts of letters,
digits, `.`, `_`, `-`, not starting with a dot (so `..` and our temp files
can never be keys), no absolute paths or backslashes.

Missing keys raise FileNotFoundError in both stores (`delete` ignores them).
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, BinaryIO, Protocol

if TYPE_CHECKING:
    from storage.settings import Settings

CHUNK = 1024 * 1024
MAX_KEY_LEN = 1024
_PART = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")

Source = str | os.PathLike[str] | IO[bytes]


def validate_key(key: str) -> str:
    """Return `key` if it is a safe relative key, else raise ValueError."""
    if not isinstance(key, str) or not key or len(key) > MAX_KEY_LEN:
        raise ValueError(f"invalid blob key {key!r}: empty, not a string or too long")
    parts = key.split("/")
    if not all(_PART.fullmatch(p) for p in parts):
        raise ValueError(
            f"invalid blob key {key!r}: use relative paths of [A-Za-z0-9._-] parts, "
            "none empty or starting with '.'"
        )
    return key


class BlobStore(Protocol):
    def put(self, key: str, src: Source) -> tuple[int, str]:
        """Store `src` (a path or a binary file object, read from its current
        position) under `key`, replacing any blob there. Returns (bytes, sha256 hex)."""
        ...

    def open(self, key: str) -> BinaryIO:
        """A readable, seekable binary file; close it (use `with`)."""
        ...

    def get_path(self, key: str) -> Any:
        """Context manager yielding a local Path of the blob (S3: a temp copy, removed after)."""
        ...

    def exists(self, key: str) -> bool: ...

    def delete(self, key: str) -> None: ...

    def size(self, key: str) -> int: ...


@contextmanager
def _reader(src: Source) -> Iterator[IO[bytes]]:
    if isinstance(src, (str, os.PathLike)):
        with open(src, "rb") as f:
            yield f
    else:
        yield src


class _HashingReader:
    """Wraps a file object; hashes and counts what is read through it."""

    def __init__(self, f: IO[bytes]) -> None:
        self._f = f
        self.sha256 = hashlib.sha256()
        self.bytes = 0

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        if not isinstance(data, bytes):
            raise TypeError("blob sources must be opened in binary mode")
        self.sha256.update(data)
        self.bytes += len(data)
        return data


class LocalBlobStore:
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).absolute()

    def _path(self, key: str) -> Path:
        return self.root / validate_key(key)

    def put(self, key: str, src: Source) -> tuple[int, str]:
        dest = self._path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        # same folder as the destination, so the rename is atomic (same filesystem)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".tmp-")
        try:
            with _reader(src) as f, os.fdopen(fd, "wb") as out:
                h = _HashingReader(f)
                while chunk := h.read(CHUNK):
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())  # data on disk before the name points at it
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync_dir(dest.parent)  # make the rename itself durable
        return h.bytes, h.sha256.hexdigest()

    def open(self, key: str) -> BinaryIO:
        return open(self._path(key), "rb")

    @contextmanager
    def get_path(self, key: str) -> Iterator[Path]:
        path = self._path(key)
        if not path.is_file():
            raise FileNotFoundError(f"no blob {key!r}")
        yield path

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def size(self, key: str) -> int:
        return self._path(key).stat().st_size


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. platforms that can't open folders
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _boto3() -> Any:
    try:
        import boto3
    except ImportError:
        raise ImportError(
            "the S3 blob store needs boto3: `pip install boto3` (or set INFINI_BLOB_BACKEND=local)"
        ) from None
    return boto3


def _is_not_found(exc: Exception) -> bool:
    # botocore's ClientError, recognised without importing botocore
    code = getattr(exc, "response", {}).get("Error", {}).get("Code")
    return code in {"404", "NoSuchKey", "NotFound"}


class S3BlobStore:
    """Blobs in an S3 (or S3-compatible) bucket. `client` lets tests pass a fake."""

    def __init__(
        self,
        bucket: str,
        *,
        endpoint_url: str | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        region: str | None = None,
        client: Any = None,
    ) -> None:
        if not bucket:
            raise ValueError("S3 blob store needs a bucket (INFINI_S3_BUCKET)")
        self.bucket = bucket
        if client is None:
            client = _boto3().client(
                "s3",
                endpoint_url=endpoint_url,
                aws_access_key_id=access_key,
                aws_secret_access_key=secret_key,
                region_name=region,
            )
        self.client = client

    def put(self, key: str, src: Source) -> tuple[int, str]:
        validate_key(key)
        with _reader(src) as f:
            # a non-seekable reader: boto3 then reads it in order, part by part,
            # and an interrupted multipart upload is aborted, leaving no object
            h = _HashingReader(f)
            self.client.upload_fileobj(h, self.bucket, key)
        return h.bytes, h.sha256.hexdigest()

    def _head(self, key: str) -> dict[str, Any]:
        try:
            return dict(self.client.head_object(Bucket=self.bucket, Key=validate_key(key)))
        except Exception as e:
            if _is_not_found(e):
                raise FileNotFoundError(f"no blob {key!r} in s3://{self.bucket}") from e
            raise

    def _download(self, key: str, out: IO[bytes]) -> None:
        try:
            self.client.download_fileobj(self.bucket, validate_key(key), out)
        except Exception as e:
            if _is_not_found(e):
                raise FileNotFoundError(f"no blob {key!r} in s3://{self.bucket}") from e
            raise

    def open(self, key: str) -> BinaryIO:
        # a spooled local copy: parsers (pypdf) need to seek, and big files go to disk
        f = tempfile.SpooledTemporaryFile(max_size=8 * CHUNK)
        try:
            self._download(key, f)
        except BaseException:
            f.close()
            raise
        f.seek(0)
        return f  # type: ignore[return-value]

    @contextmanager
    def get_path(self, key: str) -> Iterator[Path]:
        # keep the key's suffix: parsers may pick a format from it
        fd, tmp = tempfile.mkstemp(prefix="infini-blob-", suffix=Path(key).suffix)
        try:
            with os.fdopen(fd, "wb") as out:
                self._download(key, out)
            yield Path(tmp)
        finally:
            Path(tmp).unlink(missing_ok=True)

    def exists(self, key: str) -> bool:
        try:
            self._head(key)
        except FileNotFoundError:
            return False
        return True

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=validate_key(key))

    def size(self, key: str) -> int:
        return int(self._head(key)["ContentLength"])


def blob_store_from_settings(settings: Settings | None = None) -> BlobStore:
    if settings is None:
        from storage.settings import get_settings

        settings = get_settings()
    if settings.blob_backend == "s3":
        secret = settings.s3_secret_key.get_secret_value() if settings.s3_secret_key else None
        return S3BlobStore(
            settings.s3_bucket or "",
            endpoint_url=settings.s3_endpoint_url,
            access_key=settings.s3_access_key,
            secret_key=secret,
            region=settings.s3_region,
        )
    assert settings.blob_dir is not None  # filled in by Settings
    return LocalBlobStore(settings.blob_dir)
