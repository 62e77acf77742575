"""Answering from a snapshot: the memory holds the document, passages sit in the local
window, the answer streams token by token. The stored state is never changed."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from .ingest import adds_bos
from .loading import InfiniModel
from .state import MemoryState
from .prompt_graph import prompt_logits

SYSTEM_PROMPT = "You answer questions about a document you have read. Answer briefly and only from the document."


@dataclass(frozen=True)
class Passage:
    text: str
    pages: str  # a label such as "12" or "12-13"


def build_prompt(question: str, passages: Sequence[Passage] = ()) -> list[dict]:
    """The chat messages of a question, with its passages (and their pages) before it."""
    parts = []
    if passages:
        parts.append("Passages from the document:")
        parts += [f"[page {p.pages}] {p.text.strip()}" for p in passages]
        parts.append("")
    parts.append(f"Question: {question.strip()}")
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": "\n".join(parts)}]


def prompt_ids(model: InfiniModel, question: str, passages: Sequence[Passage], mid_stream: bool) -> list[int]:
    tok = model.tokenizer
    messages = build_prompt(question, passages)
    if getattr(tok, "chat_template", None):
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    else:
        text = "\n\n".join(m["content"] for m in messages) + "\nAnswer:"
    ids = tok(text, add_special_tokens=False).input_ids
    if not mid_stream and adds_bos(tok) and ids[:1] != [tok.bos_token_id]:
        ids = [tok.bos_token_id] + ids
    # a chat template may open with BOS: inside a document's stream it does not belong
    if mid_stream and tok.bos_token_id is not None and adds_bos(tok) and ids[:1] == [tok.bos_token_id]:
        ids = ids[1:]
    return ids


def answer(
    model: InfiniModel,
    state: MemoryState,
    question: str,
    passages: Sequence[Passage] = (),
    *,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    seed: int | None = None,
) -> Iterator[str]:
    """Stream the answer's text as it is generated (greedy unless temperature > 0)."""
    if not question.strip():
        raise ValueError("the question is empty")
    state.check_compatible(model.fingerprint)
    work = state.fork()  # many questions may run on one snapshot
    tok = model.tokenizer
    generator = torch.Generator(device=model.device).manual_seed(seed) if seed is not None else None
    ids = prompt_ids(model, question, passages, mid_stream=state.tokens > 0)
    generated: list[int] = []
    shown = ""
    with torch.no_grad():
        logits = prompt_logits(model, work, ids)[0, -1]
        for _ in range(max_new_tokens):
            if temperature > 0:
                probs = torch.softmax(logits.float() / temperature, -1)
                next_id = int(torch.multinomial(probs, 1, generator=generator))
            else:
                next_id = int(logits.argmax())
            if next_id in model.stop_ids:
                break
            generated.append(next_id)
            text = tok.decode(generated, skip_special_tokens=True)
            if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                yield text[len(shown):]
                shown = text
            logits = prompt_logits(model, work, [next_id])[0, -1]
    rest = tok.decode(generated, skip_special_tokens=True)[len(shown):]
    if rest:  # whatever was held back for a character that never completed
        yield rest
