"""How far back does the memory's help reach? The perplexity of a stretch of a long text at
position P, read as a new stream that starts only W tokens before P (the memory then
holds at most those W tokens), for several W, beside the window alone. Where a short W
gains as much as a long one, the memory's help on that text comes from its last W tokens.
With --full-attention, also the base model reading the same W tokens and the stretch in
one forward, where they fit its context: what a reader that forgets nothing of them gains.
JSON lines and a markdown table.

    python bench/memory_horizon.py --texts .gpu/data/eval/histories-henriad.txt --out OUT/horizon
"""

import argparse
import json
import math
from pathlib import Path

from infini_core.eval.perplexity import base_model, full_context_nll, stream_nll
from infini_core.loading import DEFAULT_MODEL, load_model


def stretch_perplexity(model, ids: list[int], position: int, before: int, stretch: int) -> float:
    """Perplexity of ids[position:position + stretch], read after `before` tokens of what precedes it."""
    if before > position:
        raise ValueError(f"{before} tokens do not precede position {position}")
    return math.exp(stream_nll(model, ids[position - before:position + stretch])[-stretch:].mean().item())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--texts", type=Path, nargs="+", required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--adapter", default="default")
    ap.add_argument("--positions", default="40960,122880", help="where the stretches start, in tokens")
    ap.add_argument("--windows", default="2048,8192,32768", help="tokens read before a stretch (W)")
    ap.add_argument("--stretch", type=int, default=2048)
    ap.add_argument("--full-attention", action="store_true", help="also the base model over each W that fits its context")
    args = ap.parse_args()
    closed = load_model(DEFAULT_MODEL, adapter=None)
    memory = load_model(DEFAULT_MODEL, adapter=args.adapter)
    windows = [int(w) for w in args.windows.split(",")]
    base = base_model(memory) if args.full_attention else None
    context = base.config.max_position_embeddings if base else 0
    full = [w for w in windows if w + args.stretch <= context]
    args.out.mkdir(parents=True, exist_ok=True)
    md = [f"Adapter {args.adapter}; perplexity of {args.stretch} tokens at each position, window alone, "
          "then with the memory of only the last W tokens before it.", "",
          "| text | position | window alone | " + " | ".join(f"memory of the last {w:,}" for w in windows)
          + "".join(f" | full attention over the last {w:,}" for w in full) + " |",
          "|---|---|---|" + "---|" * (len(windows) + len(full))]
    with open(args.out / "memory_horizon.jsonl", "a") as log:
        for path in args.texts:
            ids = closed.tokenizer(path.read_text(errors="replace"), add_special_tokens=False).input_ids
            for position in (int(p) for p in args.positions.split(",")):
                if position + args.stretch > len(ids):  # (a short text has no stretch there)
                    continue
                # (the window alone sees a segment back: 2,048 tokens before are plenty)
                row = {"text": path.name, "position": position, "stretch": args.stretch,
                       "segment_only": stretch_perplexity(closed, ids, position, 2048, args.stretch)}
                for w in windows:  # (a window longer than the text before the stretch is left out)
                    if w <= position:
                        row[f"memory_last_{w}"] = stretch_perplexity(memory, ids, position, w, args.stretch)
                for w in (w for w in full if w <= position):
                    nll = full_context_nll(base, ids[position - w:position + args.stretch], memory.device)
                    row[f"full_last_{w}"] = math.exp(nll[-args.stretch:].mean().item())
                log.write(json.dumps(row) + "\n")
                log.flush()
                alone = row["segment_only"]
                keys = [f"memory_last_{w}" for w in windows] + [f"full_last_{w}" for w in full]
                md.append(f"| {path.name} | {position:,} | {alone:.2f} | " + " | ".join(
                    f"{row[k]:.2f} ({100 * (row[k] / alone - 1):+.1f}%)" if k in row else "-" for k in keys) + " |")
                (args.out / "memory_horizon.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
