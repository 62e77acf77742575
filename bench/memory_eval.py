"""Does the memory remember? Passkey retrieval and long-text perplexity of the default model
with and without its adapter (and the base model where the text fits its context).

    python bench/memory_eval.py --out OUT --eval-texts DIR [--adapter A] [--passkey 32768,...]
        [--recall 32768,...] [--short 1024,4096]

Writes OUT/memory_eval.jsonl and OUT/memory_eval.md.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from infini_core import InfiniConfig
from infini_core.eval.passkey import passkey_table, run_passkey
from infini_core.eval.recall import run_recall
from infini_core.eval.perplexity import (base_model, bucketed_perplexity, full_context_nll, gain_by_half, perplexity,
                                         stream_nll)
from infini_core.loading import DEFAULT_MODEL, load_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--eval-texts", type=Path, required=True, help="folder of held-out .txt files")
    ap.add_argument("--adapter", type=Path)
    ap.add_argument("--paper-adapter", type=Path, help="an adapter trained with `infini train --paper`, "
                    "for the perplexity of the paper's formulation beside ours")
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--passkey", default="32768,131072,262144,524288,1048576")
    ap.add_argument("--trials", type=int, default=1)
    ap.add_argument("--bucket", type=int, default=8192)
    ap.add_argument("--recall", default="32768,131072", help="lengths of the many-facts recall test ('' skips)")
    ap.add_argument("--facts", type=int, default=10)
    ap.add_argument("--short", default="1024,4096", help="tokens of the short-text excerpts, one check per length")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    log = open(args.out / "memory_eval.jsonl", "a")
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"

    def record(**row):
        row["gpu"] = gpu
        log.write(json.dumps(row) + "\n")
        log.flush()
        print(json.dumps(row), flush=True)

    trained = load_model(args.model, adapter=args.adapter) if args.adapter else None
    paper = load_model(args.model, adapter=args.paper_adapter) if args.paper_adapter else None
    # gate closed: segment-only
    closed = load_model(args.model, infini=trained.config if trained else InfiniConfig(), adapter=None)
    # the unconverted model, for its full context where the text fits
    base = base_model(closed)
    md = [f"GPU: {gpu}. Model {args.model}, adapter {args.adapter or 'none'}.", ""]

    def write_md():  # after every part: a run cut short by a time limit keeps what it measured
        (args.out / "memory_eval.md").write_text("\n".join(md) + "\n")

    if trained and args.passkey:
        lengths = [int(x) for x in args.passkey.split(",")]
        start = time.perf_counter()
        results = run_passkey(trained, lengths, trials=args.trials, on_result=lambda r: record(kind="passkey", **r))
        md += [f"Passkey retrieval ({args.trials} trial(s) per cell, {time.perf_counter() - start:.0f} s):", "",
               passkey_table(results), ""]
        write_md()

    texts = sorted(args.eval_texts.glob("*.txt"))
    if trained and args.recall:
        book = closed.tokenizer(texts[0].read_text(errors="replace"), add_special_tokens=False).input_ids
        start = time.perf_counter()
        rows = run_recall(trained, book, [int(x) for x in args.recall.split(",")], facts=args.facts,
                          on_result=lambda r: record(kind="recall", text=texts[0].name, **r))
        md += [f"Recall of {args.facts} facts spread through {texts[0].name} (repeated to length), all asked "
               f"after reading it once ({time.perf_counter() - start:.0f} s):", "",
               "| length | found | by depth (first to last) |", "|---|---|---|"]
        for n in sorted({r["length"] for r in rows}):
            got = [r["found"] for r in rows if r["length"] == n]
            md.append(f"| {n:,} | {sum(got)}/{len(got)} | {''.join('x' if g else '.' for g in got)} |")
        md.append("")
        write_md()

    md += ["Perplexity of held-out texts read in one stream (lower is better):", "",
           "| text | tokens | base, first 8K | segment-only | with memory | paper's formulation | "
           "memory's gain, first / second half | by position (segment-only -> memory) |",
           "|---|---|---|---|---|---|---|---|"]
    short = [int(x) for x in args.short.split(",")] if args.short else []
    short_rows = {n: [] for n in short}
    for path in texts:
        ids = closed.tokenizer(path.read_text(errors="replace"), add_special_tokens=False).input_ids
        base8k = perplexity(full_context_nll(base, ids[:8192], closed.device))
        seg = stream_nll(closed, ids)
        row = {"text": path.name, "tokens": len(ids), "base_first_8k": base8k, "segment_only": perplexity(seg),
               "segment_only_first_8k": perplexity(seg[:8191]),
               "segment_only_buckets": bucketed_perplexity(seg, args.bucket)}
        if trained:
            mem = stream_nll(trained, ids)
            row.update(memory=perplexity(mem), memory_first_8k=perplexity(mem[:8191]),
                       memory_buckets=bucketed_perplexity(mem, args.bucket))
            if len(row["memory_buckets"]) > 2:  # (the #10 target: a gap that grows with position)
                row["gain_first_half"], row["gain_second_half"] = gain_by_half(row["segment_only_buckets"],
                                                                             row["memory_buckets"])
        if paper:
            row["paper"] = perplexity(stream_nll(paper, ids))
        record(kind="perplexity", **row)
        buckets = " ".join(f"{a:.1f}->{b:.1f}" for a, b in zip(row["segment_only_buckets"], row.get("memory_buckets", [])))
        md.append(f"| {path.name} | {len(ids):,} | {base8k:.2f} | {row['segment_only']:.2f} | "
                  f"{row.get('memory', float('nan')):.2f} | {row.get('paper', float('nan')):.2f} | "
                  + (f"{row['gain_first_half']:.1f}% / {row['gain_second_half']:.1f}%" if "gain_first_half" in row else "-")
                  + f" | {buckets} |")
        write_md()
        # short texts: excerpts, each read from scratch, against the base model's full context
        for n in short:
            for start in range(0, min(len(ids), 16 * n), n):
                piece = ids[start:start + n]
                if len(piece) == n:
                    full = full_context_nll(base, piece, closed.device).mean().item()
                    alone = stream_nll(closed, piece).mean().item()
                    ours = stream_nll(trained, piece).mean().item() if trained else alone
                    short_rows[n].append((full, alone, ours))
    if any(short_rows.values()):
        md += ["", "Short texts (excerpts of the held-out texts, each read from scratch; perplexity):", "",
               "| tokens | excerpts | base model, full context | segment-only | with memory | memory vs base |",
               "|---|---|---|---|---|---|"]
    for n, rows in short_rows.items():
        if rows:
            full, alone, ours = (math.exp(sum(r[i] for r in rows) / len(rows)) for i in range(3))
            record(kind="short_text", excerpts=len(rows), tokens=n, base=full, segment_only=alone, ours=ours)
            md.append(f"| {n:,} | {len(rows)} | {full:.3f} | {alone:.3f} | {ours:.3f} | {100 * (ours / full - 1):+.2f}% |")
    write_md()


if __name__ == "__main__":
    main()
