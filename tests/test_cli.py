"""The `infini` command end to end, as a user types it (tiny model; one slow test with the default)."""

import subprocess
import sys
from pathlib import Path

import pytest

from tests.datasets import fetch
from tests.tiny_models import save_tiny_checkpoint

INFINI = str(Path(sys.executable).parent / "infini")


def infini(*args, cwd=None):
    return subprocess.run([INFINI, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=600)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


@pytest.fixture()
def book(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text("\n\n".join(f"Chapter {i}. The lighthouse keeper read the old book in the lamp room." for i in range(30)))
    return path


def test_ingest_info_ask(tiny, book, tmp_path):
    snap = tmp_path / "book.infini"
    done = infini("ingest", book, "-o", snap, "--model", tiny, "--segment-len", "32")
    assert done.returncode == 0, done.stderr
    assert "tokens from" in done.stdout and snap.exists()
    assert "tok/s" in done.stderr  # the progress bar shows the rate

    info = infini("info", snap)
    assert info.returncode == 0, info.stderr
    fields = dict(line.split(None, 1) for line in info.stdout.strip().splitlines())
    assert int(fields["tokens"].replace(",", "")) > 300
    assert fields["model"].startswith(str(tiny)) and "segments of 32 tokens" in fields["memory"]
    assert len(fields["sha256"]) == 64

    # the snapshot remembers its model and conversion: no options needed to ask it
    asked = infini("ask", snap, "What did the keeper read?", "--max-new-tokens", "5")
    assert asked.returncode == 0, asked.stderr
    assert asked.stdout.rstrip().splitlines()[-1] == "[pages 1]"  # the retrieved passage's page
    assert fields["retrieval"].endswith("book.infini.index.zip")


def one_line_error(result, *needles):
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("infini: error:"), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_errors_are_one_clear_line(tiny, book, tmp_path):
    one_line_error(infini("ingest", tmp_path / "missing.txt", "--model", tiny), "missing.txt", "no such file")

    empty = tmp_path / "empty.txt"
    empty.write_text("   \n\n ")
    one_line_error(infini("ingest", empty, "--model", tiny), "empty.txt")

    locked = fetch("pypdf==7.1.0", "pypdf-7.1.0/resources/encryption/r4-user-password.pdf", sdist=True)
    one_line_error(infini("ingest", locked, "--model", tiny), "r4-user-password.pdf", "password")

    one_line_error(infini("info", book), "not a memory snapshot")
    one_line_error(infini("ask", tmp_path / "nothing.infini", "q?"), "no such snapshot")

    snap = tmp_path / "book.infini"
    assert infini("ingest", book, "-o", snap, "--model", tiny, "-q").returncode == 0
    other = save_tiny_checkpoint(tmp_path / "other", seed=7)
    one_line_error(infini("ask", snap, "q?", "--model", other), "another model")


def test_encrypted_pdf_with_password(tiny, tmp_path):
    locked = fetch("pypdf==7.1.0", "pypdf-7.1.0/resources/encryption/r4-user-password.pdf", sdist=True)
    done = infini("ingest", locked, "--password", "asdfzxcv", "--model", tiny, "-q", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "r4-user-password.infini").exists()


@pytest.mark.slow
def test_default_model_on_a_pdf(tmp_path):
    """The Bitcoin whitepaper (9 pages) read by the default model, then a question on it."""
    pdf = fetch("iscc-samples==0.6.0", "iscc_samples-0.6.0/iscc_samples/files/text/demo.pdf", sdist=True)
    snap = tmp_path / "bitcoin.infini"
    done = infini("ingest", pdf, "-o", snap, "-q")
    assert done.returncode == 0, done.stderr
    assert "from 9 pages" in done.stdout
    asked = infini("ask", snap, "How does simplified payment verification work?", "--max-new-tokens", "30")
    assert asked.returncode == 0, asked.stderr
    cited = asked.stdout.rstrip().splitlines()[-1]
    assert cited.startswith("[pages ") and "5" in cited  # section 8, on page 5


def test_train_is_a_command_with_its_own_options(tmp_path):
    listed = infini("--help")
    assert listed.returncode == 0 and "train" in listed.stdout
    helped = infini("train", "--help")
    assert helped.returncode == 0 and "--max-minutes" in helped.stdout and "--data" in helped.stdout
    missing = infini("train", "--data", tmp_path / "none", "--out", tmp_path / "out")
    assert missing.returncode == 2 and "no such folder" in missing.stderr


def test_train_says_what_is_wrong_with_its_options(tiny, tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "book.txt").write_text("The keeper lit the lamp every night. " * 200)
    bad = infini("train", "--data", tmp_path / "data", "--out", tmp_path / "out", "--model", tiny,
                 "--segment-len", 16, "--prefix-per-row", "true")
    assert bad.returncode == 1 and bad.stderr.strip().splitlines()[-1] == (
        "infini: error: prefix_per_row needs prefix_tokens of at least one segment (16 tokens)")
    assert "Traceback" not in bad.stderr
