"""Passkey retrieval in the paper's format: a 5-digit key hidden in filler text at a chosen
depth, asked for at the end. The paper (Munkhdalai et al. 2024, Table 2) reports the share
of keys found for inputs of 32K to 1M tokens with the key at the start, middle or end."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
         "I will quiz you about the important information there.\n")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n"
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key.\n"
QUESTION = "What is the pass key? The pass key is"


@dataclass(frozen=True)
class PasskeySample:
    ids: list[int]
    key: str
    key_token: int  # index of the needle's first token in ids
    answer_ids: list[int]  # the tokens of " {key}" that should follow


def passkey_sample(tokenizer, length: int, depth: float, rng: random.Random, bos: bool = False) -> PasskeySample:
    """About `length` tokens with the needle at `depth` (0 = right after the intro, 1 = just
    before the question) of the filler."""
    enc = lambda text: tokenizer(text, add_special_tokens=False).input_ids
    key = f"{rng.randint(10000, 99999)}"
    intro, filler, needle, question = enc(INTRO), enc(FILLER), enc(NEEDLE.format(key=key)), enc(QUESTION)
    head = ([tokenizer.bos_token_id] if bos else []) + intro
    units = max(1, (length - len(head) - len(needle) - len(question)) // len(filler))
    before = round(depth * units)
    ids = head + filler * before
    key_token = len(ids)
    ids += needle + filler * (units - before) + question
    return PasskeySample(ids, key, key_token, enc(f" {key}"))


def found(generated: str, key: str) -> bool:
    """The first five digits the model produced are the key."""
    digits = "".join(ch for ch in generated if ch.isdigit())
    return digits[:5] == key


def greedy_continuation(model, state, prompt: list[int], new_tokens: int) -> str:
    """Greedy decoding of `new_tokens` after `prompt`, continuing `state` (which it changes)."""
    from ..prompt_graph import prompt_logits

    out, nxt = [], prompt
    with torch.no_grad():
        for _ in range(new_tokens):
            token = int(prompt_logits(model, state, nxt)[0, -1].argmax())
            out.append(token)
            nxt = [token]
    return model.tokenizer.decode(out, skip_special_tokens=True)


def run_passkey(model, lengths: list[int], depths=(0.0, 0.5, 1.0), trials: int = 1, seed: int = 0,
                block_segments: int | None = None, on_result=None) -> list[dict]:
    """Ingest each sample (all but the question), then decode the key greedily from the
    snapshot, as a user's question would."""
    from ..ingest import adds_bos, ingest, new_state

    rng = random.Random(seed)
    results = []
    for length in lengths:
        for depth in depths:
            for trial in range(trials):
                s = passkey_sample(model.tokenizer, length, depth, rng, bos=adds_bos(model.tokenizer))
                q = len(model.tokenizer(QUESTION, add_special_tokens=False).input_ids)
                state = ingest(model, s.ids[:-q], new_state(model), block_segments=block_segments)
                text = greedy_continuation(model, state, s.ids[-q:], len(s.answer_ids) + 2)
                row = {"length": len(s.ids), "target_length": length, "depth": depth, "trial": trial,
                       "key": s.key, "generated": text, "found": found(text, s.key)}
                results.append(row)
                if on_result:
                    on_result(row)
    return results


def passkey_table(results: list[dict]) -> str:
    """The paper's table: rows = key depth, columns = length, cells = share found."""
    lengths = sorted({r["target_length"] for r in results})
    depths = sorted({r["depth"] for r in results})
    name = {0.0: "start", 0.5: "middle", 1.0: "end"}
    fmt = lambda n: str(n) if n < 1024 else f"{n // 1024}K" if n < 1 << 20 else f"{n / (1 << 20):g}M"
    lines = ["| key at | " + " | ".join(fmt(n) for n in lengths) + " |", "|---|" + "---|" * len(lengths)]
    for d in depths:
        cells = []
        for n in lengths:
            rows = [r for r in results if r["target_length"] == n and r["depth"] == d]
            cells.append(f"{100 * sum(r['found'] for r in rows) / len(rows):.0f}%" if rows else "-")
        lines.append(f"| {name.get(d, d)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
