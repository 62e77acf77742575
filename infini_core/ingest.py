"""Reading a document once: segment by segment into a MemoryState, no LM head."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace

import torch

from .attention import compiled_blocks
from .convert import infini_layers
from .loading import InfiniModel
from .memory import chosen_impl
from .state import LAYER_TENSORS, LayerState, MemoryState
from .stream import forward, new_layer_states

log = logging.getLogger(__name__)

# segments per layer-parallel block: a GPU needs big blocks to be busy (32K tokens keep the
# peak near 3 GiB for the default model); a CPU gains little from them and reports progress
# less often
BLOCK_SEGMENTS = {"cuda": 64, "cpu": 8}

# A 16-bit model reading on CUDA runs its fp32 matmuls (the memory's, nothing else) on TF32
# tensor cores: the delta rule's decays and scan took 18% of an H200's time on plain fp32
# units (docs/benchmarks.md, ninth session: speed and passkeys). False: IEEE fp32. An fp32
# model keeps IEEE fp32 throughout.
TF32_MEMORY = True


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
    block_segments: int | None = None,
    cuda_graphs: bool | None = None,
    checkpoint_every: int | None = None,
    on_checkpoint: Callable[[MemoryState], None] | None = None,
    on_progress: Callable[[Progress], None] | None = None,
) -> MemoryState:
    """Stream `document` through the model after whatever `state` already holds.

    Whole segments go through in blocks of `block_segments` (default: BLOCK_SEGMENTS for
    the model's device), so memory use is bounded by the block, not by the document; the
    unfinished last segment waits in `state.pending`. On CUDA (or with `cuda_graphs`) the
    blocks of a long document replay one captured CUDA graph (`BlockGraph`).
    Every `checkpoint_every` segments `on_checkpoint` gets the live state (save it; reading
    the rest of the document into a reloaded checkpoint gives the same final state). Save
    or `clone()` it before returning: a CUDA graph overwrites its tensors with the next block.
    """
    state = state if state is not None else new_state(model)
    state.check_compatible(model.fingerprint)
    n = model.config.segment_len
    device = torch.device(model.device)
    if block_segments is None:
        block_segments = BLOCK_SEGMENTS.get(device.type, BLOCK_SEGMENTS["cpu"])
    if cuda_graphs is None:
        cuda_graphs = device.type == "cuda"
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
    graph: BlockGraph | None = None

    def report() -> None:
        if on_progress:
            rate = done / max(time.perf_counter() - started, 1e-9)
            eta = max(total_tokens - done, 0) / rate if total_tokens is not None and rate else None
            on_progress(Progress(done, total_tokens, rate, eta))

    def run(ids: list[int]) -> None:
        """Whole segments through the model (no LM head)."""
        nonlocal done, graph, cuda_graphs
        before = state.tokens
        left = None if total_tokens is None else total_tokens - done
        first = cuda_graphs and len(ids) == block and before == 0  # (a document's first block)
        kept_first = BlockGraph.first_for(model, len(ids)) if first else None
        steady = cuda_graphs and len(ids) == block and graph is None and BlockGraph.steady(model, state)
        if steady:  # an earlier document's graph, if it fits this state
            graph = BlockGraph.reuse(model, state.layers, len(ids))
        if kept_first is not None:
            kept_first.replay(ids, state.layers)
        elif first:  # (the capture reads ids eagerly)
            BlockGraph.capture(model, state.layers, ids, first=True)
        elif graph is not None and len(ids) == graph.length:
            graph.replay(ids, state.layers)
        # (a capture costs about one eager block of launches: worth it when 2+ replays follow)
        elif steady and (left is None or left >= 3 * block):
            graph = BlockGraph.capture(model, state.layers, ids)
            cuda_graphs = graph is not None  # shapes that change from block to block: eager
        else:
            forward(model.lm, torch.tensor([ids], device=model.device), state.layers, logits=False)
        state.tokens += len(ids)
        done += len(ids)
        report()
        every = (checkpoint_every or 0) * n
        if on_checkpoint and every and state.tokens // every > before // every:
            on_checkpoint(state)

    buffer, state.pending = state.pending, []
    state.tokens -= len(buffer)  # pending tokens are counted again as they run
    with torch.no_grad(), memory_matmuls(model):
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
    # tensors of its own: not views that keep a whole block's keys alive, nor the buffers of
    # a CUDA graph that the next document overwrites
    for layer in state.layers:
        layer.own_tensors()
    done += len(state.pending)
    report()
    if state.tokens == 0:
        raise ValueError("the document has no text to read")
    return state


@contextlib.contextmanager
def memory_matmuls(model: InfiniModel):
    """fp32 matmuls as TF32 inside, for a 16-bit model on CUDA where TF32_MEMORY says so."""
    if model.device.type != "cuda" or model.lm.dtype == torch.float32 or not TF32_MEMORY:
        yield
        return
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


class BlockGraph:
    """One block's forward captured as a CUDA graph and replayed for every later block of the
    same length. A block is thousands of small kernels, and launching them one by one from
    Python kept the GPU idle more than half the time (docs/benchmarks.md). The layer states
    move into buffers of the graph's own, which each replay reads and overwrites in place.
    The model keeps the latest graph (`InfiniModel.block_graph`): a later document of the
    same block length loads its state into the buffers and replays it from its second block
    on, without a new capture.

    A document's first block takes other paths (the memory still empty, the sinks being
    kept), so it has a graph of its own, captured from an empty state, uncompiled (a block
    read once per document is not worth compiling its shapes), and kept as
    `InfiniModel.first_block_graph`. Its buffers are the state it leaves, which the next
    block's graph copies into its own before replaying; that graph shares its memory pool."""

    # the decoder layers' norms and MLP compiled too, not only the memory layers' step
    # (False: the fourth session's graph, which bench/ingest.py measures beside it)
    compile_decoder = True

    def __init__(self, model: InfiniModel, layers: list[LayerState], length: int, first: bool = False):
        self.length, self.first, self.key = length, first, self.key_for(length, first)
        self.segments = length // model.config.segment_len
        self.ids = torch.zeros(1, length, dtype=torch.long, device=model.device)
        # what the capture binds, per layer: name -> tensor (None where the layer has none)
        self.buffers = [{name: getattr(layer, name) for name in LAYER_TENSORS} for layer in layers]
        self.graph = torch.cuda.CUDAGraph()

    @classmethod
    def key_for(cls, length: int, first: bool = False) -> tuple:
        """What a graph is captured for: the block's length and the code it runs."""
        return length, first, not first and cls.compile_decoder, chosen_impl(), TF32_MEMORY

    @classmethod
    def first_for(cls, model: InfiniModel, length: int) -> "BlockGraph | None":
        """The kept graph of a document's first block of this length, if there is one."""
        graph = model.first_block_graph
        return graph if graph is not None and graph.key == cls.key_for(length, first=True) else None

    @staticmethod
    def steady(model: InfiniModel, state: MemoryState) -> bool:
        """Whether every later block takes the same path with the same shapes: all memory
        layers past the start (whole-segment path, sinks kept), and on a segment boundary."""
        lag = model.config.memory_lag
        return all(layer.segments > lag and layer.seg_k is not None and layer.seg_k.shape[2] == 0
                   for attn, layer in zip(infini_layers(model.lm), state.layers) if attn.has_memory)

    @classmethod
    def capture(cls, model: InfiniModel, layers: list[LayerState], ids: list[int],
                first: bool = False) -> "BlockGraph | None":
        """Read `ids` eagerly on a side stream (the warm-up capture needs: cuBLAS, cuDNN and
        torch.compile set themselves up on first use), then capture the next block's
        forward, compiled (`compiled_blocks`), or with `first` (`layers` of a new document)
        a first block's, uncompiled. Returns None, having read `ids`, if the state's shapes
        would change from block to block."""
        side = model.side_stream()
        side.wait_stream(torch.cuda.current_stream())
        block = torch.tensor([ids], device=model.device)
        for layer in layers:  # the warm-up sees the layout the capture will: compiled code is specialised to it
            layer.own_tensors()
        before = [replace(l) for l in layers]
        compiled, decoder = not first, model.lm if cls.compile_decoder else None
        with torch.cuda.stream(side):
            try:
                with compiled_blocks(decoder) if compiled else contextlib.nullcontext():
                    forward(model.lm, block, layers, logits=False)
            except Exception as error:  # no working compiler here: the same graph, uncompiled
                log.warning("torch.compile failed (%s); reading with uncompiled CUDA graphs", error)
                layers[:] = before  # (what the failed forward replaced, put back)
                forward(model.lm, block, layers, logits=False)
                compiled = False
        torch.cuda.current_stream().wait_stream(side)
        for layer in layers:  # the graph's buffers: none a view of a block it no longer holds
            layer.own_tensors()
        self = cls(model, layers, len(ids), first)
        # what the capture binds: the same tensors with counters of their own, or a new state
        shadow = [LayerState() for _ in layers] if first else [replace(l) for l in layers]
        # a block's graph takes the memory pool of the first block's graph of the same length
        other = None if first else model.first_block_graph
        shared = other is not None and other.length == len(ids)
        with compiled_blocks(decoder) if compiled else contextlib.nullcontext(), \
                torch.cuda.graph(self.graph, pool=other.graph.pool() if shared else None):
            forward(model.lm, self.ids, shadow, logits=False)
            if first:  # the state it leaves, the buffers each replay writes
                self.buffers = [{name: getattr(after, name) for name in LAYER_TENSORS} for after in shadow]
            else:
                for layer, after in zip(layers, shadow):
                    for name in LAYER_TENSORS:
                        old, new = getattr(layer, name), getattr(after, name)
                        if new is old:
                            continue
                        if old is None or new.shape != old.shape:
                            return None  # (captured nothing that has run; the caller reads eagerly)
                        old.copy_(new)
        # kept once the capture has ended: the graph this one replaces is destroyed here, and a
        # graph destroyed during a capture breaks it (on the device: "operation not permitted
        # when stream is capturing", then "operation failed due to a previous error during capture")
        if first:
            model.first_block_graph = self
        else:
            model.block_graph = self  # (the latest only: each holds a memory pool)
        return self

    @classmethod
    def reuse(cls, model: InfiniModel, layers: list[LayerState], length: int) -> "BlockGraph | None":
        """The graph an earlier read captured for blocks of this length, its buffers loaded
        with these states (which then read through them), or None if there is none or the
        states' shapes differ from its buffers'."""
        self = model.block_graph
        if self is None or self.key != cls.key_for(length) or len(self.buffers) != len(layers) or not all(
                _same_layout(getattr(layer, name), buffer) for layer, buffers in zip(layers, self.buffers)
                for name, buffer in buffers.items()):
            return None
        for layer, buffers in zip(layers, self.buffers):
            for name, buffer in buffers.items():
                if buffer is not None:
                    setattr(layer, name, buffer.copy_(getattr(layer, name)))
        return self

    def replay(self, ids: list[int], layers: list[LayerState]) -> None:
        """Read the next block into `layers`, whose tensors are this graph's buffers (or,
        for a first block, become them)."""
        self.ids.copy_(torch.tensor([ids]))
        self.graph.replay()
        for layer, buffers in zip(layers, self.buffers):
            if self.first:
                for name, buffer in buffers.items():
                    setattr(layer, name, buffer)
            layer.segments += self.segments


def _same_layout(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is b
    return a.shape == b.shape and a.dtype == b.dtype
