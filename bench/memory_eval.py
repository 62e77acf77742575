"""Does the memory remember? Passkey retrieval and long-text perplexity of the default model
with and without its adapter (and the base model where the text fits its context).

    python bench/memory_eval.py --out OUT --eval-texts DIR [--adapter A] [--passkey 32768,...]

Writes OUT/memory_eval.jsonl and OUT/memory_eval.md.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from infini_core import InfiniConfig
from infini_core.eval.passkey import passkey_table, run_passkey
from infini_core.eval.perplexity import bucketed_perplexity, full_context_nll, perplexity, stream_nll
from infini_core.loading import DEFAULT_MODEL, checkpoint_dir, load_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--eval-texts", type=Path, required=True, help="folder of held-out .txt files")
    ap.add_argument("--adapter", type=Path)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--passkey", default="32768,131072,262144,524288,1048576")
    ap.add_argument("--trials", type=int, default=1)
    ap.add_argument("--bucket", type=int, default=8192)
    ap.add_argument("--short", type=int, default=1024, help="tokens of each short-text excerpt")
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
    closed = load_model(args.model, infini=trained.config if trained else InfiniConfig())  # gate closed: segment-only
    # the unconverted model, for its full context where the text fits
    base = AutoModelForCausalLM.from_pretrained(checkpoint_dir(args.model), dtype=closed.lm.dtype,
                                                attn_implementation="sdpa").to(closed.device).eval()
    md = [f"GPU: {gpu}. Model {args.model}, adapter {args.adapter or 'none'}.", ""]

    if trained and args.passkey:
        lengths = [int(x) for x in args.passkey.split(",")]
        start = time.perf_counter()
        results = run_passkey(trained, lengths, trials=args.trials, on_result=lambda r: record(kind="passkey", **r))
        md += [f"Passkey retrieval ({args.trials} trial(s) per cell, {time.perf_counter() - start:.0f} s):", "",
               passkey_table(results), ""]

    md += ["Perplexity of held-out texts read in one stream (lower is better):", "",
           "| text | tokens | base, first 8K | segment-only | with memory | by position (segment-only -> memory) |",
           "|---|---|---|---|---|---|"]
    short_rows = []
    for path in sorted(args.eval_texts.glob("*.txt")):
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
        record(kind="perplexity", **row)
        buckets = " ".join(f"{a:.1f}->{b:.1f}" for a, b in zip(row["segment_only_buckets"], row.get("memory_buckets", [])))
        md.append(f"| {path.name} | {len(ids):,} | {base8k:.2f} | {row['segment_only']:.2f} | "
                  f"{row.get('memory', float('nan')):.2f} | {buckets} |")
        # short texts: excerpts the length of `--short`, each read from scratch
        for start in range(0, min(len(ids), 16 * args.short), args.short):
            piece = ids[start:start + args.short]
            if len(piece) == args.short:
                full = full_context_nll(base, piece, closed.device).mean().item()
                ours = stream_nll(trained or closed, piece).mean().item()
                short_rows.append((full, ours))
    if short_rows:
        full = math.exp(sum(b for b, _ in short_rows) / len(short_rows))
        ours = math.exp(sum(o for _, o in short_rows) / len(short_rows))
        record(kind="short_text", excerpts=len(short_rows), tokens=args.short, base=full, ours=ours)
        md += ["", f"Short texts ({len(short_rows)} excerpts of {args.short} tokens, each read from scratch): "
               f"base model {full:.3f}, {'with adapter' if trained else 'converted'} {ours:.3f} "
               f"({100 * (ours / full - 1):+.2f}%)."]
    (args.out / "memory_eval.md").write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
