"""How far back does the memory's help reach? The perplexity of a stretch of a long text at
position P, read as a new stream that starts only W tokens before P (the memory then
holds at most those W tokens), for several W, beside the window alone. Where a short W
gains as much as a long one, the memory's help on that text comes from its last W tokens.
JSON lines and a markdown table.

    python bench/memory_horizon.py --texts .gpu/data/eval/histories-henriad.txt --out OUT/horizon
"""

import argparse
import json
import math
from pathlib import Path

from infini_core.eval.perplexity import stream_nll
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
    args = ap.parse_args()
    closed = load_model(DEFAULT_MODEL, adapter=None)
    memory = load_model(DEFAULT_MODEL, adapter=args.adapter)
    windows = [int(w) for w in args.windows.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    md = [f"Adapter {args.adapter}; perplexity of {args.stretch} tokens at each position, window alone, "
          "then with the memory of only the last W tokens before it.", "",
          "| text | position | window alone | " + " | ".join(f"memory of the last {w:,}" for w in windows) + " |",
          "|---|---|---|" + "---|" * len(windows)]
    with open(args.out / "memory_horizon.jsonl", "a") as log:
        for path in args.texts:
            ids = closed.tokenizer(path.read_text(errors="replace"), add_special_tokens=False).input_ids
            for position in (int(p) for p in args.positions.split(",")):
                # (the window alone sees a segment back: 2,048 tokens before are plenty)
                row = {"text": path.name, "position": position, "stretch": args.stretch,
                       "segment_only": stretch_perplexity(closed, ids, position, 2048, args.stretch)}
                for w in windows:  # (a window longer than the text before the stretch is left out)
                    if w <= position:
                        row[f"memory_last_{w}"] = stretch_perplexity(memory, ids, position, w, args.stretch)
                log.write(json.dumps(row) + "\n")
                log.flush()
                base = row["segment_only"]
                md.append(f"| {path.name} | {position:,} | {base:.2f} | " + " | ".join(
                    f"{row[f'memory_last_{w}']:.2f} ({100 * (row[f'memory_last_{w}'] / base - 1):+.1f}%)"
                    if f"memory_last_{w}" in row else "-" for w in windows) + " |")
                (args.out / "memory_horizon.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
