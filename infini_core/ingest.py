"""Reading a document once: segment by segment into a MemoryState, no LM head."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace

import torch

from . import attention
from .attention import compiled_blocks, forced_window_kernel
from .convert import infini_layers
from .loading import InfiniModel
from .memory import chosen_impl
from .state import LAYER_TENSORS, LayerState, MemoryState, own_tensors
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
    blocks replay CUDA graphs the model keeps for every later document (`BlockGraph`).
    Every `checkpoint_every` segments `on_checkpoint` gets the live state (save it; reading
    the rest of the document into a reloaded checkpoint gives the same final state). Save
    or `clone()` it before returning: a CUDA graph overwrites its tensors with the next block.
    """
    state = state if state is not None else new_state(model)
    state.check_compatible(model.fingerprint)
    n = model.config.segment_len
    device = torch.device(model.device)
    block_segments = block_size(device, block_segments, checkpoint_every)
    if cuda_graphs is None:
        cuda_graphs = device.type == "cuda"
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
        nonlocal done, cuda_graphs
        before = state.tokens
        if cuda_graphs:
            cuda_graphs = BlockGraph.read(model, state, ids, None if total_tokens is None else total_tokens - done)
        else:
            forward(model.lm, torch.tensor([ids], device=model.device), state.layers, logits=False)
        state.tokens += len(ids)
        done += len(ids)
        report()
        every = (checkpoint_every or 0) * n
        if on_checkpoint and every and state.tokens // every > before // every:
            on_checkpoint(state)

    def next_segments(final: bool) -> int:
        """Whole segments of the buffer to read next (0: wait for more text): the lengths of
        a worker's graphs (`capture_ingest_graphs`), else blocks and the rest in one piece."""
        segments = len(buffer) // n
        if cuda_graphs and model.ingest_graphs is not None and model.ingest_graphs.capture_all:
            return graph_block(segments, block_segments, start_segments(model) if state.tokens == 0 else 0, final)
        return block_segments if segments >= block_segments else segments if final else 0

    buffer, state.pending = state.pending, []
    state.tokens -= len(buffer)  # pending tokens are counted again as they run
    with torch.no_grad(), memory_matmuls(model):
        for ids in pieces:
            buffer.extend(ids)
            while take := next_segments(final=False):
                run(buffer[:take * n])
                del buffer[:take * n]
        while take := next_segments(final=True):
            run(buffer[:take * n])
            del buffer[:take * n]
    state.pending = buffer
    state.tokens += len(state.pending)
    # tensors of its own: not views that keep a whole block's keys alive, nor the buffers of
    # a CUDA graph that the next document overwrites
    own_tensors(state.layers)
    done += len(state.pending)
    report()
    if state.tokens == 0:
        raise ValueError("the document has no text to read")
    return state


def block_size(device: torch.device, block_segments: int | None = None, checkpoint_every: int | None = None) -> int:
    """Segments per layer-parallel block: `block_segments` or the device's default, and no
    more than `checkpoint_every` (a checkpoint is taken between blocks)."""
    size = block_segments or BLOCK_SEGMENTS.get(device.type, BLOCK_SEGMENTS["cpu"])
    return min(size, checkpoint_every) if checkpoint_every else size


def start_segments(model: InfiniModel) -> int:
    """A document's first segments, which take paths of their own (the memory still empty,
    the sinks being kept); after them every memory layer takes the whole-segment path.
    0 where the window kernel reads them in a block of any length, as later ones
    (`InfiniAttention.opens_in_block`)."""
    attn = next((a for a in infini_layers(model.lm) if a.has_memory), None)
    like = torch.empty(0, device=model.device, dtype=model.lm.dtype)  # (its device and dtype decide)
    with torch.no_grad():
        opens_in_block = attn is not None and attn.opens_in_block(LayerState(), like)
    return 0 if opens_in_block else model.config.memory_lag + 1


def graph_lengths(block_segments: int) -> list[int]:
    """Every length in segments `graph_block` gives past a document's start."""
    return sorted({graph_block(s, block_segments, 0, final=True) for s in range(2, block_segments + 1)})


def graph_block(segments: int, block_segments: int, first_segments: int, final: bool) -> int:
    """How many of `segments` buffered whole segments to read next through a CUDA graph, so
    that every document, however long, reads through a few graphs kept for all documents:
    its first `first_segments` (the start of a document, 0 past it); then blocks of
    `block_segments`; then, at the end (`final`), what is left as powers of two, with one
    block of 3 where the count is odd (a single segment reads eagerly: the whole-segment
    path takes two or more). 0: wait for more text."""
    if first_segments:
        return first_segments if segments >= first_segments else segments if final else 0
    if segments >= block_segments:
        return block_segments
    if not final or segments == 0:
        return 0
    if segments % 2 and segments >= 3:
        return 3
    return 1 << (segments.bit_length() - 1)


def capture_ingest_graphs(model: InfiniModel, block_segments: int | None = None,
                          checkpoint_every: int | None = None) -> bool:
    """Capture (and compile) every graph `ingest` reads through, as a worker does when it
    loads its model, so that no document waits for one: short documents of made-up tokens,
    one for each block length `graph_block` gives (for the blocks that `ingest` with these
    arguments reads). False where ingest reads eagerly."""
    if model.device.type != "cuda":
        return False
    n, first = model.config.segment_len, start_segments(model)
    block_segments = block_size(model.device, block_segments, checkpoint_every)
    model.ingest_graphs = model.ingest_graphs or KeptGraphs()
    model.ingest_graphs.capture_all = True
    made_up, vocab = torch.Generator().manual_seed(0), model.lm.get_input_embeddings().num_embeddings
    for size in graph_lengths(block_segments):
        # a document's start (where the window kernel opens documents in blocks: a block of
        # this length), then a block of this length
        state = ingest(model, torch.randint(0, vocab, ((first or size) * n,), generator=made_up),
                       block_segments=block_segments)
        ingest(model, torch.randint(0, vocab, (size * n,), generator=made_up), state, block_segments=block_segments)
    return len(model.ingest_graphs.graphs) > 0


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
    """A block's forward captured as a CUDA graph and replayed for every later block of the
    same length and state layout, in this document and later ones. A block is thousands of
    small kernels, and launching them one by one from Python kept the GPU idle more than
    half the time (docs/benchmarks.md); a document shorter than a block read eagerly at a
    tenth of the speed of a long one.

    A document reads through a few kept graphs (`graph_block`): its first segments (the
    memory still empty, the sinks being kept: captured from an empty state; where the
    window kernel runs, a first block of any of the lengths below, else the first two
    segments, a path of their own), then blocks of `block_segments`, then its end in
    powers of two and a 3. A
    worker captures them all when it starts (`capture_ingest_graphs`); a one-off read
    captures only lengths that 2 more blocks of follow, and reads the rest eagerly. All of
    a model's graphs read and write one set of state buffers per layout (`KeptGraphs`), so
    a document moves from one to the next without copies, and they share one memory pool:
    none keeps a tensor of the pool alive, so the pool is as large as the largest block
    needs, not the sum."""

    # the decoder layers compiled around their attention too (norms, MLP, residual adds), not
    # only the memory layers' blocks
    # (False: the fourth session's graph, which bench/ingest.py measures beside it)
    compile_decoder = True

    def __init__(self, model: InfiniModel, length: int, first: bool, buffers: list[dict]):
        self.length, self.first, self.buffers = length, first, buffers
        self.segments = length // model.config.segment_len
        self.ids = torch.zeros(1, length, dtype=torch.long, device=model.device)
        self.graph = torch.cuda.CUDAGraph()

    @classmethod
    def key_for(cls, length: int, first: bool, layout: tuple) -> tuple:
        """What a graph is captured for: the block's length, the layout of the state it
        reads, and the code it runs."""
        return (length, first, layout, cls.compile_decoder, chosen_impl(), TF32_MEMORY, forced_window_kernel(),
                attention.JOIN_PROJECTIONS)

    @classmethod
    def read(cls, model: InfiniModel, state: MemoryState, ids: list[int], left: int | None) -> bool:
        """Read `ids` (whole segments; `left` tokens of the document from them on, None if
        unknown) into `state` through a kept graph, or capture one (which reads them eagerly
        first) where it pays, or eagerly. False once the state's shapes change from block to
        block (read the rest of the document eagerly)."""
        layers, n = state.layers, model.config.segment_len
        fresh = state.tokens == 0 and all(layer.segments == 0 and layer.win_k is None for layer in layers)
        start = start_segments(model) if fresh else None  # (asked only at a document's start)
        first = fresh and (len(ids) == start * n if start else len(ids) >= 2 * n)
        kept = model.ingest_graphs
        graph = None
        if first or (len(ids) >= 2 * n and cls.steady(model, state)):
            graph = kept and kept.graphs.get(cls.key_for(len(ids), first, () if first else layout_of(layers)))
            # compiling and capturing a length costs more than a short document's eager read:
            # only for a worker (it reads many) or where 2 more blocks of it follow (replays)
            if graph is None and ((kept and kept.capture_all) or (not first and (left is None or left >= 3 * len(ids)))):
                kept = model.ingest_graphs = kept or KeptGraphs()
                return cls.capture(model, kept, layers, ids, first) is not None
        if graph is not None:
            graph.replay(ids, layers)
        else:
            forward(model.lm, torch.tensor([ids], device=model.device), layers, logits=False)
        return True

    @staticmethod
    def steady(model: InfiniModel, state: MemoryState) -> bool:
        """Whether the next block takes the steady path: all memory layers past the start
        (whole-segment path, sinks kept), and on a segment boundary."""
        return all(attn.past_start(layer) for attn, layer in zip(infini_layers(model.lm), state.layers)
                   if attn.has_memory)

    @classmethod
    def capture(cls, model: InfiniModel, kept: "KeptGraphs", layers: list[LayerState], ids: list[int],
                first: bool) -> "BlockGraph | None":
        """Read `ids` eagerly on a side stream (the warm-up capture needs: cuBLAS, cuDNN and
        torch.compile set themselves up on first use), then capture a block's forward,
        compiled (`compiled_blocks`): with `first` (`layers` of a new document), a first
        block's from an empty state. Returns None, having read `ids`, if the state's shapes
        would change from block to block."""
        block = torch.tensor([ids], device=model.device)
        own_tensors(layers)  # (the warm-up sees the layout the capture will: compiled code is specialised to it)
        before = [replace(l) for l in layers]
        compiled, decoder = True, model.lm if cls.compile_decoder else None
        with model.warming_up():
            try:
                with compiled_blocks(decoder):
                    forward(model.lm, block, layers, logits=False)
            except Exception as error:  # no working compiler here: the same graph, uncompiled
                log.warning("torch.compile failed (%s); reading with uncompiled CUDA graphs", error)
                layers[:] = before  # (what the failed forward replaced, put back)
                forward(model.lm, block, layers, logits=False)
                compiled = False
        # the graph reads (a later block) the state's tensors, which become the buffers of
        # their layout; a first block's graph only writes them
        own_tensors(layers)
        reads = () if first else layout_of(layers)
        buffers = kept.buffers_for(layers)
        if not first:
            move_into(buffers, layers)
        self = cls(model, len(ids), first, buffers)
        shadow = [LayerState() for _ in layers] if first else [replace(l) for l in layers]
        with compiled_blocks(decoder) if compiled else contextlib.nullcontext(), \
                torch.cuda.graph(self.graph, pool=kept.pool):
            forward(model.lm, self.ids, shadow, logits=False)
            for after, targets in zip(shadow, buffers):
                for name, old in targets.items():
                    new = getattr(after, name)
                    if new is old:
                        continue
                    if old is None or new is None or new.shape != old.shape:
                        return None  # (captured nothing that has run; the caller reads eagerly)
                    old.copy_(new)
        del shadow  # (nothing of the pool outlives the capture)
        kept.graphs[cls.key_for(len(ids), first, reads)] = self
        return self

    def replay(self, ids: list[int], layers: list[LayerState]) -> None:
        """Read the next block into `layers`, whose tensors then are this graph's buffers."""
        if not self.first:  # (a state from elsewhere, a loaded snapshot say, moves in)
            move_into(self.buffers, layers)
        # from pinned memory, without waiting: the copy waits on the GPU for the block before
        # (a plain copy would keep the CPU waiting for it, and the GPU then for the CPU)
        self.ids.copy_(torch.tensor([ids], pin_memory=True), non_blocking=True)
        self.graph.replay()
        for layer, buffers in zip(layers, self.buffers):
            for name, buffer in buffers.items():
                setattr(layer, name, buffer)
            layer.segments += self.segments


def layout_of(layers: list[LayerState]) -> tuple:
    """The shapes and dtypes of the layers' tensors: what a graph's buffers must match."""
    return tuple(None if (t := getattr(layer, name)) is None else (tuple(t.shape), t.dtype)
                 for layer in layers for name in LAYER_TENSORS)


@dataclass
class KeptGraphs:
    """A model's ingest graphs (`InfiniModel.ingest_graphs`), kept for later documents: by
    `BlockGraph.key_for`, with the state buffers they read and write (per layout) and the
    memory pool they share."""

    graphs: dict = field(default_factory=dict)
    buffers: dict = field(default_factory=dict)  # layout -> per layer: name -> tensor
    pool: object = field(default_factory=lambda: torch.cuda.graph_pool_handle())
    # a worker's (`capture_ingest_graphs`): capture every block length met, not only those
    # that pay for themselves within one document
    capture_all: bool = False

    def buffers_for(self, layers: list[LayerState]) -> list[dict]:
        """The buffers of the layers' layout (their own tensors become them if there are none)."""
        layout = layout_of(layers)
        if layout not in self.buffers:
            self.buffers[layout] = [{name: getattr(layer, name) for name in LAYER_TENSORS} for layer in layers]
        return self.buffers[layout]


def move_into(buffers: list[dict], layers: list[LayerState]) -> None:
    """The layers' state copied into `buffers` of the same layout, which the layers then hold."""
    for layer, named in zip(layers, buffers):
        for name, buffer in named.items():
            if buffer is not None and getattr(layer, name) is not buffer:
                setattr(layer, name, buffer.copy_(getattr(layer, name)))
