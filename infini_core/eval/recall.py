"""Recall of many facts spread through a book: each fact ("The code of the red fox is
41325.") is written into a held-out text at its own depth; after reading the whole text
once, every fact is asked for from that one snapshot, as a user's questions would be."""

from __future__ import annotations

import random

from .passkey import found, greedy_continuation

COLORS = ("red", "blue", "green", "yellow", "black", "white", "grey", "golden", "silver", "purple")
ANIMALS = ("fox", "owl", "cat", "horse", "whale", "crow", "wolf", "bear", "hare", "eagle")
FACT = "\nThe code of the {name} is {code}. Remember: the {name} has code {code}.\n"
QUESTION = "\nWhat is the code of the {name}? The code of the {name} is"


def recall_sample(tokenizer, book_ids: list[int], length: int, facts: int, rng: random.Random):
    """`length` tokens of the book (repeated if short) with `facts` facts at evenly spread
    depths; returns (ids, [(name, code, depth)])."""
    enc = lambda text: tokenizer(text, add_special_tokens=False).input_ids
    names = rng.sample([f"{c} {a}" for c in COLORS for a in ANIMALS], facts)
    items = [(name, str(rng.randint(10000, 99999))) for name in names]
    inserts = [enc(FACT.format(name=n, code=c)) for n, c in items]
    body = length - sum(map(len, inserts))
    text = (book_ids * (body // len(book_ids) + 1))[:body]
    ids, placed, at = [], [], 0
    for i, ((name, code), fact) in enumerate(zip(items, inserts)):
        cut = round((i + 0.5) / facts * body)
        ids += text[at:cut] + fact
        placed.append((name, code, cut / body))
        at = cut
    return ids + text[at:], placed


def run_recall(model, book_ids: list[int], lengths: list[int], facts: int = 10, seed: int = 0,
               block_segments: int = 128, on_result=None) -> list[dict]:
    """Read each sample once, then ask for every fact from a copy of the snapshot."""
    from ..ingest import ingest, new_state

    rng = random.Random(seed)
    enc = lambda text: model.tokenizer(text, add_special_tokens=False).input_ids
    rows = []
    for length in lengths:
        ids, placed = recall_sample(model.tokenizer, book_ids, length, facts, rng)
        state = ingest(model, ids, new_state(model), block_segments=block_segments)
        for name, code, depth in placed:
            text = greedy_continuation(model, state.fork(), enc(QUESTION.format(name=name)), 7)
            row = {"length": length, "depth": round(depth, 3), "name": name, "key": code, "generated": text,
                   "found": found(text, code)}
            rows.append(row)
            if on_result:
                on_result(row)
    return rows
