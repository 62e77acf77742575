"""Does "both" lose to retrieval alone because the document's last words sit in the local
window beside the passages? The same questions answered by retrieval alone, by "both" from
the snapshot, and by "both" from the snapshot with its window written into the memory
(`window_into_memory`). JSON lines (one per question) and the mean F1 of each mode.

    python bench/qa_window.py --length 32768 --questions 30 --out OUT/qa_window.jsonl
"""

import argparse
import json
from pathlib import Path

import torch

from infini_core.answer import answer
from infini_core.eval.qa import build_samples, exact_match, f1, find_data
from infini_core.ingest import ingest, new_state, page_texts
from infini_core.loading import load_model
from infini_core.retrieval import RetrievalIndex, chunk_pages, passages_for
from infini_core.stream import window_into_memory

MODES = ("retrieval", "both", "both_window_in_memory")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--length", type=int, default=32768)
    ap.add_argument("--questions", type=int, default=30)
    ap.add_argument("--adapter", default="default")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    model = load_model("smollm2-135m-instruct", adapter=args.adapter)
    samples = build_samples(find_data(), model.tokenizer, [args.length], args.questions, dataset="squad", seed=0,
                            page_words=400)
    rows = []
    with open(args.out, "a") as log:
        for s in samples:
            texts = page_texts(s.pages)
            snapshot = ingest(model, [t for _, t in texts], new_state(model), block_segments=8)
            passages = passages_for(RetrievalIndex(chunk_pages(texts, model.tokenizer)).search(s.question, 3))
            row = {"id": s.id, "depth": s.depth, "length": args.length, "answers": s.answers,
                   "device": str(model.device)}
            for mode, state in zip(MODES, (new_state(model), snapshot, window_into_memory(model, snapshot))):
                with torch.no_grad():
                    pred = "".join(answer(model, state, s.question, passages, max_new_tokens=32)).strip()
                row[mode] = {"pred": pred, "f1": f1(pred, s.answers), "em": exact_match(pred, s.answers)}
            rows.append(row)
            log.write(json.dumps(row) + "\n")
            log.flush()
    print(f"| mode | n | F1 | answers the same as both |\n|---|---|---|---|")
    for mode in MODES:
        same = sum(r[mode]["pred"] == r["both"]["pred"] for r in rows)
        print(f"| {mode} | {len(rows)} | {100 * sum(r[mode]['f1'] for r in rows) / len(rows):.1f} | {same} |")


if __name__ == "__main__":
    main()
