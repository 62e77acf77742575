"""Reading past the local window with and without attention sinks (the document's first
tokens kept at the front of every window), against Hugging Face reading the whole text in
one forward; optionally with a memory adapter. Runs on a CPU in a few minutes:

    python bench/attention_sinks.py --text botchan.txt --tokens 6144 --out OUT [--adapter A]

Appends to OUT/attention_sinks.jsonl and prints a markdown table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path

import torch

from infini_core.eval.perplexity import base_model, full_context_nll, stream_nll
from infini_core.loading import load_adapter_tensors, load_model, read_adapter


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--text", type=Path, required=True)
    ap.add_argument("--tokens", type=int, default=6144, help="tokens of the text read (the base model's context is 8K)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--adapter", type=Path, help="also read with this memory adapter, with and without sinks")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    tensors, config = read_adapter(args.adapter) if args.adapter else (None, None)
    closed = load_model(adapter=None, device=args.device, infini=config)
    ids = closed.tokenizer(args.text.read_text(errors="replace"), add_special_tokens=False).input_ids[:args.tokens]
    runs = {"Hugging Face, whole text in context": full_context_nll(base_model(closed), ids, closed.device)}
    for adapter in ([False, True] if tensors else [False]):
        for sinks in (0, closed.config.sink_tokens or 4):
            model = load_model(adapter=None, device=args.device, infini=dataclasses.replace(closed.config, sink_tokens=sinks))
            if adapter:
                load_adapter_tensors(model.lm, tensors, args.adapter)
            name = f"{'memory adapter' if adapter else 'segment-only (gates closed)'}, {sinks} sink tokens"
            runs[name] = stream_nll(model, ids)
    args.out.mkdir(parents=True, exist_ok=True)
    lines = [f"{args.text.name}, first {len(ids):,} tokens, {args.device}:", "",
             "| reading | perplexity, all | first 1,024 tokens | after 1,024 tokens |", "|---|---|---|---|"]
    with open(args.out / "attention_sinks.jsonl", "a") as log:
        for name, nll in runs.items():
            row = {"text": args.text.name, "tokens": len(ids), "reading": name, "device": args.device,
                   "adapter": str(args.adapter) if args.adapter else None,
                   **{k: math.exp(v.mean().item()) for k, v in (("all", nll), ("first_1024", nll[:1023]),
                                                                 ("after_1024", nll[1023:]))}}
            log.write(json.dumps(row) + "\n")
            lines.append(f"| {name} | {row['all']:.2f} | {row['first_1024']:.2f} | {row['after_1024']:.2f} |")
    print("\n".join(lines))


if __name__ == "__main__":
    with torch.no_grad():
        main()
