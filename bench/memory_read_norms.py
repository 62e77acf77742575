"""How the memory's read compares with the local attention as a long text is read.

    python bench/memory_read_norms.py --out OUT/norms.jsonl --length 10485760 [--device cuda]

Reads the passkey eval's haystack (filler, the key in the middle) with the default model
and its shipped adapter, block by block, and writes per memory layer and block: the mean
norm of the local attention output, of the memory read, their cosine and the gate. A
diagnostic for reads that drift with length (the 10M-token passkey fails even for a key
in the window: docs/results.md). Eager blocks (no CUDA graph), so every layer can be seen.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

import infini_core.attention as attention
from infini_core.eval.passkey import passkey_sample
from infini_core.ingest import adds_bos, ingest, new_state
from infini_core.loading import load_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--length", type=int, default=262144)
    ap.add_argument("--block-tokens", type=int, default=32768)
    ap.add_argument("--device")
    args = ap.parse_args()
    model = load_model(device=args.device)
    sample = passkey_sample(model.tokenizer, args.length, 0.5, random.Random(0), bos=adds_bos(model.tokenizer))
    rows: list[dict] = []
    mix = attention.gate_mix

    def measured_mix(local, mem, gate):  # every memory layer's gate mix goes through here
        l, m = local.float(), mem.float()
        rows.append(dict(local=l.norm(dim=-1).mean().item(), mem=m.norm(dim=-1).mean().item(),
                         mem_max=m.norm(dim=-1).max().item(),
                         cos=torch.nn.functional.cosine_similarity(l, m, dim=-1).mean().item(),
                         gate=torch.sigmoid(gate.float()).mean().item()))
        return mix(local, mem, gate)

    attention.gate_mix = measured_mix
    state, started = new_state(model), time.perf_counter()
    segments = args.block_tokens // model.config.segment_len
    with open(args.out, "w") as out:
        for start in range(0, len(sample.ids) - args.block_tokens + 1, args.block_tokens):
            rows.clear()
            ingest(model, sample.ids[start:start + args.block_tokens], state, block_segments=segments,
                   cuda_graphs=False)
            end = start + args.block_tokens
            if start:  # (the first block also runs the start's per-segment path: not one call per layer)
                for layer, row in enumerate(rows):
                    out.write(json.dumps(dict(row, memory_layer=layer, tokens=end)) + "\n")
            mean = {k: sum(r[k] for r in rows) / len(rows) for k in ("local", "mem", "cos")}
            mean["mem_max"] = max(r["mem_max"] for r in rows)
            print(f"{end:>10,} tokens: |local| {mean['local']:.3f}  |memory read| {mean['mem']:.3f}  "
                  f"(max {mean['mem_max']:.1f})  cosine {mean['cos']:.3f}  ({time.perf_counter() - started:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
