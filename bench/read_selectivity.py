"""How selectively does the memory read, beside attention over the same tokens? For the
last segment of a span of T tokens of a long text, every query's weights over the tokens
the memory holds (all but the last two segments, the document's first 4 tokens left out):
the memory's are sigma(Q) sigma(K_t), the kernel its read normalises by (DESIGN.md); full
attention's, the base model reading the span whole, are its softmax probabilities on those
same tokens, renormalised. Reported per layer, averaged over queries and heads: the
effective number of tokens a read mixes, (sum w)^2 / sum w^2, and the share of its weight
on its 32 heaviest tokens; and how much of attention's probability falls on those tokens
at all. JSON lines and a markdown table.

    python bench/read_selectivity.py --texts .gpu/data/eval/milton.txt --positions 81920 --out OUT/selectivity
"""

import argparse
import json
import statistics
from pathlib import Path

import torch

from infini_core.attention import InfiniAttention, rotate
from infini_core.eval.perplexity import base_model
from infini_core.loading import DEFAULT_MODEL, load_model
from infini_core.memory import feature_map

SINKS = 4  # the document's first tokens: every memory layer's window holds them anyway
HEAVIEST = 32


def inputs_of(layers, run) -> list[tuple]:
    """(hidden states, keyword arguments) each of `layers` is called with during `run()`."""
    seen, hooks = [], [layer.register_forward_pre_hook(lambda m, a, kw: seen.append((a[0] if a else kw["hidden_states"], kw)),
                                                      with_kwargs=True) for layer in layers]
    try:
        with torch.no_grad():
            run()
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def spread(weights: torch.Tensor) -> tuple[float, float]:
    """weights [..., tokens] >= 0: the mean effective number of tokens, and the mean share of
    the weight on the heaviest ones."""
    w = weights.double()
    total = w.sum(-1)
    effective = total ** 2 / (w ** 2).sum(-1)
    top = w.topk(min(HEAVIEST, w.shape[-1]), dim=-1).values.sum(-1) / total
    return effective.mean().item(), top.mean().item()


def memory_weights(model, ids: list[int], held: slice) -> list[torch.Tensor]:
    """Per memory layer, the last segment's query features against the held tokens' key
    features: [query heads, queries, held tokens]."""
    layers = [m for m in model.lm.modules() if isinstance(m, InfiniAttention) and m.has_memory]
    x = torch.tensor([ids], device=model.device)
    n = model.config.segment_len
    out = []
    for attn, (hidden, _) in zip(layers, inputs_of(layers, lambda: model.lm(input_ids=x, use_cache=False))):
        with torch.no_grad():
            *_, mq, mk = attn._project(hidden)
            sq, sk = feature_map(mq[0, :, -n:]), feature_map(mk[0, :, held])
            groups = sq.shape[0] // sk.shape[0]
            out.append(sq @ sk.repeat_interleave(groups, 0).transpose(-1, -2))
    return out


def attention_weights(base, ids: list[int], held: slice, queries: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer of the base model reading `ids` whole, the last `queries` tokens' softmax
    probabilities on the held tokens: [query heads, queries, held tokens], and the share of
    each row that falls there."""
    layers = [layer.self_attn for layer in base.model.layers]
    x = torch.tensor([ids], device=base.device)
    out = []
    for attn, (hidden, kw) in zip(layers, inputs_of(layers, lambda: base(input_ids=x, use_cache=False))):
        with torch.no_grad():
            cos, sin = (t[0] for t in kw["position_embeddings"])
            d = attn.head_dim
            q = attn.q_proj(hidden)[0].view(len(ids), -1, d).transpose(0, 1)
            k = attn.k_proj(hidden)[0].view(len(ids), -1, d).transpose(0, 1)
            q, k = rotate(q[:, -queries:], cos[-queries:], sin[-queries:]), rotate(k, cos, sin)
            k = k.repeat_interleave(q.shape[0] // k.shape[0], 0)
            scores = (q.float() @ k.float().transpose(-1, -2)) * attn.scaling
            causal = torch.arange(len(ids), device=q.device) > torch.arange(len(ids) - queries, len(ids), device=q.device)[:, None]
            probs = scores.masked_fill(causal, float("-inf")).softmax(-1)[..., held]
            out.append((probs, probs.sum(-1)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--texts", type=Path, nargs="+", required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--adapter", default="default")
    ap.add_argument("--positions", default="40960,81920", help="where each span ends, in tokens")
    ap.add_argument("--spans", default="2048,4096,8192", help="span lengths T (at most the base model's context)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args()
    model = load_model(DEFAULT_MODEL, adapter=args.adapter, dtype=getattr(torch, args.dtype))
    base = base_model(model)
    n = model.config.segment_len
    args.out.mkdir(parents=True, exist_ok=True)
    md = [f"Adapter {args.adapter}, {args.dtype}. Weights of the last segment's queries over the tokens the memory "
          f"holds (all but the last two segments of the span, the first {SINKS} left out), per layer, median over "
          f"the {len(base.model.layers)} layers: the effective number of tokens a read mixes, and the share of its "
          f"weight on its {HEAVIEST} heaviest tokens.", "",
          "| text | span end | T | tokens held | memory: effective tokens | attention: effective tokens "
          f"| memory: top-{HEAVIEST} share | attention: top-{HEAVIEST} share | attention's probability on them |",
          "|---|---|---|---|---|---|---|---|---|"]
    with open(args.out / "read_selectivity.jsonl", "a") as log:
        for path in args.texts:
            ids = model.tokenizer(path.read_text(errors="replace"), add_special_tokens=False).input_ids
            for end in (int(p) for p in args.positions.split(",")):
                for span in (int(t) for t in args.spans.split(",")):
                    if span > end or span % n or span < 3 * n:
                        continue
                    window = ids[end - span:end]
                    held = slice(SINKS, span - 2 * n)
                    memory = [spread(w) for w in memory_weights(model, window, held)]
                    attention = [(*spread(p), mass.mean().item()) for p, mass in attention_weights(base, window, held, n)]
                    row = {"text": path.name, "end": end, "span": span, "held": held.stop - held.start,
                           "dtype": args.dtype, "adapter": args.adapter,
                           "memory_effective": [m[0] for m in memory], "memory_top": [m[1] for m in memory],
                           "attention_effective": [a[0] for a in attention], "attention_top": [a[1] for a in attention],
                           "attention_mass": [a[2] for a in attention]}
                    log.write(json.dumps(row) + "\n")
                    log.flush()
                    med = {k: statistics.median(v) for k, v in row.items() if isinstance(v, list)}
                    md.append(f"| {path.name} | {end:,} | {span:,} | {row['held']:,} | {med['memory_effective']:.0f} | "
                              f"{med['attention_effective']:.0f} | {med['memory_top']:.2f} | {med['attention_top']:.2f} | "
                              f"{med['attention_mass']:.3f} |")
                    (args.out / "read_selectivity.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
