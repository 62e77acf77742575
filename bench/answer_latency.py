"""Time to the first answer token from a document's snapshot, as the product answers: three
retrieved passages and the question after the document's memory.

    python bench/answer_latency.py --text .gpu/data/eval/botchan.txt --out OUT/latency [--unfinished 500]
    python bench/answer_latency.py --text A.txt --text B.txt --out OUT/latency --snapshot doc.infini

Reads the text (several --text files are one document, in order) once with the default
model and its adapter, saves the snapshot, then times the first token of each question
(best of --repeats). With --snapshot it answers from a snapshot of that document read
elsewhere (a GPU worker's, say) instead of reading it here; --keep-snapshot leaves
OUT/snapshot.infini for that. The ways timed:
- cold: the snapshot loaded from disk and settled (its unfinished last segment read), as
  a worker does for the first question on a document;
- warm: the settled snapshot held in memory, as the worker's cache holds it for every
  later question;
- warm, unsettled: held as loaded, so every question also reads the unfinished segment
  (how the workers answered before they settled their snapshots).
Writes OUT/answer_latency.jsonl and OUT/answer_latency.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from infini_core.answer import answer
from infini_core.ingest import document_tokens, ingest, page_texts
from infini_core.loading import load_model
from infini_core.retrieval import RetrievalIndex, chunk_pages, passages_for
from infini_core.state import MemoryState
from infini_core.stream import settle

QUESTIONS = ("Who teaches mathematics at the school?", "Where does the story take place?",
             "What does Kiyo give the narrator before he leaves?")


def first_token_seconds(prepare, question: str, index: RetrievalIndex, model) -> float:
    """Seconds from asking to the first streamed text; `prepare` gives the state to answer
    from and is timed too (loading, settling)."""
    start = time.perf_counter()
    state = prepare()
    next(answer(model, state, question, passages_for(index.search(question, 3)), max_new_tokens=4))
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--text", type=Path, action="append", required=True, help="a text file; repeat to join several")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), help="default: the model's (bf16 on a GPU or a CPU "
                    "that multiplies bf16 natively, else fp32)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--page-words", type=int, default=400)
    ap.add_argument("--snapshot", type=Path, help="answer from this snapshot of the document instead of reading it")
    ap.add_argument("--keep-snapshot", action="store_true", help="leave OUT/snapshot.infini")
    ap.add_argument("--unfinished", type=int, help="cut the text's end so this many tokens (< the segment "
                    "length) are left in its unfinished last segment: how much a question on an unsettled "
                    "snapshot reads again depends on it")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    model = load_model(device=args.device, dtype=getattr(torch, args.dtype) if args.dtype else None)
    on_gpu = model.device.type == "cuda"
    device = torch.cuda.get_device_name() if on_gpu else f"CPU, {torch.get_num_threads()} threads ({platform.machine()})"
    dtype = str(model.lm.dtype).removeprefix("torch.")
    words = [w for path in args.text for w in path.read_text(errors="replace").split()]
    name = (args.text[0].name if len(args.text) == 1
            else f"{len(args.text)} texts joined ({args.text[0].name} to {args.text[-1].name})")
    # what ingest reads, so the passages' token offsets match the stream (as the workers do)
    pages = page_texts((n + 1, " ".join(words[i:i + args.page_words]))
                       for n, i in enumerate(range(0, len(words), args.page_words)))
    index = RetrievalIndex(chunk_pages(pages, model.tokenizer))
    document = [text for _, text in pages]
    if args.unfinished is not None:
        ids = [i for piece in document_tokens(model, document, at_start=True) for i in piece]
        n = model.config.segment_len
        if not 0 <= args.unfinished < n:
            ap.error(f"--unfinished must be in [0, {n})")
        document = ids[:(len(ids) - args.unfinished) // n * n + args.unfinished]
    snap = args.snapshot or args.out / "snapshot.infini"
    load = lambda: MemoryState.load(snap, model.fingerprint, device=model.device, dtype=model.lm.dtype)
    if args.snapshot:
        state, read_s = load(), None
        tokens = sum(len(piece) for piece in document_tokens(model, document, at_start=True))
        if state.tokens != tokens:
            ap.error(f"{snap} read {state.tokens:,} tokens, the text is {tokens:,}: not a snapshot of it")
    else:
        start = time.perf_counter()
        state = ingest(model, document)
        read_s = time.perf_counter() - start
        state.save(snap)

    def loaded_and_settled():
        s = load()
        settle(model, s)
        return s

    held, settled = (state if args.snapshot else load()), loaded_and_settled()
    ways = {"cold": loaded_and_settled, "warm": lambda: settled, "warm, unsettled": lambda: held}
    rows = []
    with open(args.out / "answer_latency.jsonl", "w") as out:
        for question in QUESTIONS:
            for way, prepare in ways.items():
                secs = min(first_token_seconds(prepare, question, index, model) for _ in range(args.repeats))
                row = dict(way=way, question=question, seconds=secs, document_tokens=state.tokens,
                           unfinished_segment_tokens=len(state.pending), read_seconds=read_s, device=device,
                           dtype=dtype)
                rows.append(row)
                out.write(json.dumps(row) + "\n")
                print(json.dumps(row), flush=True)
    md = [f"Time to the first answer token, {name} ({state.tokens:,} tokens, {len(state.pending)} in "
          f"its unfinished last segment), three passages and the question; best of {args.repeats}, on {device}, "
          f"{dtype}.",
          "", "| question | " + " | ".join(ways) + " |", "|---|" + "---|" * len(ways)]
    for question in QUESTIONS:
        cells = [f"{r['seconds']:.2f} s" for r in rows if r["question"] == question]
        md.append(f"| {question} | " + " | ".join(cells) + " |")
    if read_s is not None:
        md.append(f"\nRead here in {read_s:.1f} s: {state.tokens / read_s:,.0f} tokens/s.")
    (args.out / "answer_latency.md").write_text("\n".join(md) + "\n")
    if not (args.snapshot or args.keep_snapshot):
        snap.unlink()


if __name__ == "__main__":
    main()
