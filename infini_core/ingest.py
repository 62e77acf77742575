"""Reading a document once: segment by segment into a MemoryState, no LM head."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from .loading import InfiniModel
from .state import MemoryState
from .stream import forward, new_layer_states


@dataclass(frozen=True)
class Progress:
    tokens_done: int  # of this call
    tokens_total: int | None  # None while a streamed document's length is unknown
    tokens_per_s: float
    eta_s: float | None


def new_state(model: InfiniModel) -> MemoryState:
    return MemoryState(new_layer_states(model.lm), dict(model.fingerprint))


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer starts a text with BOS (Llama 3 does; SmolLM2 does not)."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a").input_ids[:1] == [bos]


PAGE_SEPARATOR = "\n\n"  # a page break reads as a paragraph break


def page_texts(pages) -> list[tuple[int, str]]:
    """A paged document as the texts `ingest` reads: (number, the page's text followed by
    PAGE_SEPARATOR). Read these (`document_tokens`) and chunk these (`chunk_pages`), and
    the chunks' token offsets are offsets of the stream read. `pages`: objects with
    .number and .text, or (number, text) pairs."""
    pairs = ((p.number, p.text) if hasattr(p, "number") else p for p in pages)
    return [(int(number), text + PAGE_SEPARATOR) for number, text in pairs]


def document_tokens(model: InfiniModel, document, at_start: bool) -> Iterable[list[int]]:
    """Token ids of a text, of an iterable of texts (pages, streamed) or of ids as given.
    BOS, where the model uses one, only at the very start of the stream."""
    tok = model.tokenizer
    piece = 1 << 20  # a long document goes in pieces, so the reader's buffer stays small
    if isinstance(document, torch.Tensor):
        flat = document.flatten()
        for i in range(0, len(flat), piece):
            yield flat[i:i + piece].tolist()
        return
    if isinstance(document, Sequence) and not isinstance(document, str) and all(isinstance(t, int) for t in document[:1]):
        for i in range(0, len(document), piece):
            yield list(document[i:i + piece])
        return
    if at_start and adds_bos(tok):
        yield [tok.bos_token_id]
    for text in [document] if isinstance(document, str) else document:
        if text:
            yield tok(text, add_special_tokens=False).input_ids


def ingest(
    model: InfiniModel,
    document: str | Iterable[str] | Sequence[int] | torch.Tensor,
    state: MemoryState | None = None,
    *,
    total_tokens: int | None = None,
    block_segments: int = 8,
    checkpoint_every: int | None = None,
    on_checkpoint: Callable[[MemoryState], None] | None = None,
    on_progress: Callable[[Progress], None] | None = None,
) -> MemoryState:
    """Stream `document` through the model after whatever `state` already holds.

    Whole segments go through in blocks of `block_segments`, so memory use is bounded by
    the block, not by the document; the unfinished last segment waits in `state.pending`.
    Every `checkpoint_every` segments `on_checkpoint` gets the live state (save it; reading
    the rest of the document into a reloaded checkpoint gives the same final state).
    """
    state = state if state is not None else new_state(model)
    state.check_compatible(model.fingerprint)
    n = model.config.segment_len
    block = block_segments * n
    if checkpoint_every:
        block = min(block, checkpoint_every * n)
    pieces = document_tokens(model, document, state.tokens == 0)
    if total_tokens is None and isinstance(document, torch.Tensor):
        total_tokens = document.numel()
    elif total_tokens is None and isinstance(document, (str, Sequence)):
        pieces = list(pieces)
        total_tokens = sum(map(len, pieces))

    done, started = 0, time.perf_counter()

    def report() -> None:
        if on_progress:
            rate = done / max(time.perf_counter() - started, 1e-9)
            eta = max(total_tokens - done, 0) / rate if total_tokens is not None and rate else None
            on_progress(Progress(done, total_tokens, rate, eta))

    def run(ids: list[int]) -> None:
        """Whole segments through the model (no LM head)."""
        nonlocal done
        before = state.tokens
        forward(model.lm, torch.tensor([ids], device=model.device), state.layers, logits=False)
        state.tokens += len(ids)
        done += len(ids)
        report()
        every = (checkpoint_every or 0) * n
        if on_checkpoint and every and state.tokens // every > before // every:
            on_checkpoint(state)

    buffer, state.pending = state.pending, []
    state.tokens -= len(buffer)  # pending tokens are counted again as they run
    with torch.no_grad():
        for ids in pieces:
            buffer.extend(ids)
            while len(buffer) >= block:
                run(buffer[:block])
                del buffer[:block]
        whole = len(buffer) // n * n
        if whole:
            run(buffer[:whole])
    state.pending = buffer[whole:]
    state.tokens += len(state.pending)
    done += len(state.pending)
    report()
    if state.tokens == 0:
        raise ValueError("the document has no text to read")
    return state
